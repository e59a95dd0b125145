//! The suites' knobs (`SM_CASES`, `EXHAUSTIVE_DEPTH`, `PROPTEST_CASES`, …):
//! a value that is not a positive integer is refused with a message naming
//! the knob, never silently replaced by the default or by zero cases.

mod common;

use common::parse_count;

#[test]
fn knobs_accept_positive_integers() {
    assert_eq!(parse_count("SM_CASES", "250"), Ok(250));
    assert_eq!(parse_count("SM_CASES", " 7\n"), Ok(7));
    assert_eq!(parse_count("EXHAUSTIVE_DEPTH", "1"), Ok(1));
}

#[test]
fn knobs_refuse_zero_with_a_clear_message() {
    let e = parse_count("EXHAUSTIVE_DEPTH", "0").unwrap_err();
    assert!(e.contains("EXHAUSTIVE_DEPTH=0") && e.contains("nothing"), "{e}");
}

#[test]
fn knobs_refuse_what_does_not_parse() {
    for v in ["", "many", "-3", "1e3", "4294967296", "12 cases"] {
        let e = parse_count("SM_CASES", v).unwrap_err();
        assert!(
            e.contains("SM_CASES=") && e.contains("not a positive integer"),
            "{v:?}: {e}"
        );
    }
}
