//! The README's and `docs/`'s commands and paths still work.
//!
//! Their Rust examples run as doctests (`src/lib.rs`, `ReadmeDoctests`).
//! This suite checks the rest against the repository itself: every `cargo`
//! command in a `sh` block names a package, target and feature that exist
//! (read from `cargo metadata`, and from the cargo-fuzz manifest for `cargo
//! fuzz`), and passes the features its target requires; every script it runs
//! exists and is executable; every repository path written in the text
//! exists; the README's Rust example for kvm-glue is a verbatim excerpt of
//! kvm-glue's crate-doc example, which runs as kvm-glue's doctest; and
//! `.ci/run` runs the test command the README gives.

use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// README.md, kvm-glue's README (its crates.io page) and every
/// `docs/*.md`, as (name, text).
fn documents() -> Vec<(String, String)> {
    let mut names = vec![PathBuf::from("README.md"), PathBuf::from("kvm-glue/README.md")];
    let mut docs: Vec<PathBuf> = fs::read_dir(root().join("docs"))
        .map(|dir| {
            dir.map(|e| e.expect("readable docs/ entry").path())
                .filter(|p| p.extension().is_some_and(|x| x == "md"))
                .map(|p| p.strip_prefix(root()).expect("under the root").to_path_buf())
                .collect()
        })
        .unwrap_or_default();
    docs.sort();
    names.extend(docs);
    names
        .into_iter()
        .map(|n| {
            let text = fs::read_to_string(root().join(&n)).unwrap_or_else(|e| panic!("{}: {e}", n.display()));
            (n.display().to_string(), text)
        })
        .collect()
}

/// The fenced blocks of a Markdown text whose info string starts with
/// `lang`, as (info string, body).
fn blocks(text: &str, lang: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut current: Option<(String, String)> = None;
    for line in text.lines() {
        let trimmed = line.trim_start();
        match current.as_mut() {
            None if trimmed.starts_with("```") => current = Some((trimmed[3..].trim().to_string(), String::new())),
            None => {}
            Some(_) if trimmed.starts_with("```") => {
                let (info, body) = current.take().expect("in a block");
                if info.split([',', ' ']).next() == Some(lang) {
                    out.push((info, body));
                }
            }
            Some((_, body)) => {
                body.push_str(line);
                body.push('\n');
            }
        }
    }
    assert!(current.is_none(), "an unterminated code block");
    out
}

/// The commands of the `sh` blocks: comments dropped, one per line.
fn commands(text: &str) -> Vec<String> {
    blocks(text, "sh")
        .iter()
        .flat_map(|(_, body)| body.lines().map(str::to_string).collect::<Vec<_>>())
        .map(|line| match line.find(" #") {
            Some(i) => line[..i].trim().to_string(),
            None if line.trim_start().starts_with('#') => String::new(),
            None => line.trim().to_string(),
        })
        .filter(|l| !l.is_empty())
        .collect()
}

/// Splits a command line into words, honouring single and double quotes.
fn words(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut word = String::new();
    let mut quote = None;
    let mut in_word = false;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    out.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    assert!(quote.is_none(), "unbalanced quote in {line:?}");
    if in_word {
        out.push(word);
    }
    out
}

fn metadata(manifest: &Path) -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--no-deps", "--format-version", "1", "--manifest-path"])
        .arg(manifest)
        .output()
        .expect("run cargo metadata");
    assert!(
        out.status.success(),
        "cargo metadata: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// One package as `cargo metadata` describes it.
struct Package {
    name: String,
    features: BTreeSet<String>,
    /// (kind, name, required features)
    targets: Vec<(String, String, Vec<String>)>,
}

fn packages(manifest: &Path) -> Vec<Package> {
    let meta = metadata(manifest);
    let strings = |v: &Value| -> Vec<String> {
        v.as_array()
            .map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_string)).collect())
            .unwrap_or_default()
    };
    meta["packages"]
        .as_array()
        .expect("packages")
        .iter()
        .map(|p| Package {
            name: p["name"].as_str().expect("name").to_string(),
            features: p["features"].as_object().expect("features").keys().cloned().collect(),
            targets: p["targets"]
                .as_array()
                .expect("targets")
                .iter()
                .flat_map(|t| {
                    let name = t["name"].as_str().expect("target name").to_string();
                    let required = strings(&t["required-features"]);
                    strings(&t["kind"])
                        .into_iter()
                        .map(move |k| (k, name.clone(), required.clone()))
                })
                .collect(),
        })
        .collect()
}

/// What is wrong with one `cargo` command, if anything.
fn check_cargo(words: &[String], workspace: &[Package], fuzz: &[Package]) -> Result<(), String> {
    let mut args = words.iter().map(String::as_str).skip_while(|w| w.starts_with('+'));
    let sub = args.next().ok_or("no cargo subcommand")?;
    let rest: Vec<&str> = args.collect();
    if sub == "fuzz" {
        // cargo fuzz run|build|list [TARGET] ...: the target is a [[bin]] of fuzz/.
        let target = rest.iter().skip(1).find(|w| !w.starts_with('-'));
        let fuzz = fuzz.first().ok_or("no cargo-fuzz manifest")?;
        return match target {
            Some(t) if !fuzz.targets.iter().any(|(k, n, _)| k == "bin" && n == t) => {
                Err(format!("fuzz target `{t}` is not a [[bin]] of fuzz/Cargo.toml"))
            }
            _ => Ok(()),
        };
    }
    let value = |flag: &str| -> Vec<&str> { rest.windows(2).filter(|w| w[0] == flag).map(|w| w[1]).collect() };
    let mut selected: Vec<&str> = value("-p");
    selected.extend(value("--package"));
    let workspace_wide = rest.contains(&"--workspace");
    let package = match selected.as_slice() {
        [] => "x86-debugreg", // the root manifest's own package
        [one] => one,
        _ => return Ok(()),
    };
    let package = workspace
        .iter()
        .find(|p| p.name == package)
        .ok_or_else(|| format!("no package `{package}` in the workspace"))?;
    let features: BTreeSet<&str> = value("--features")
        .iter()
        .chain(value("-F").iter())
        .flat_map(|f| f.split([',', ' ']))
        .filter(|f| !f.is_empty())
        .collect();
    for f in &features {
        if !package.features.contains(*f) {
            return Err(format!("package `{}` has no feature `{f}`", package.name));
        }
    }
    for (flag, kind) in [
        ("--example", "example"),
        ("--test", "test"),
        ("--bench", "bench"),
        ("--bin", "bin"),
    ] {
        for name in value(flag) {
            let target = package
                .targets
                .iter()
                .find(|(k, n, _)| k == kind && n == name)
                .ok_or_else(|| format!("package `{}` has no {kind} `{name}`", package.name))?;
            if let Some(missing) = target.2.iter().find(|f| !features.contains(f.as_str())) {
                return Err(format!(
                    "{kind} `{name}` needs `--features {missing}`, which the command does not pass"
                ));
            }
        }
    }
    if workspace_wide && !selected.is_empty() {
        return Err("both --workspace and -p".into());
    }
    Ok(())
}

#[test]
fn every_cargo_command_names_a_real_package_target_and_feature() {
    let workspace = packages(&root().join("Cargo.toml"));
    let fuzz = packages(&root().join("fuzz/Cargo.toml"));
    let mut checked = 0;
    let mut failures = Vec::new();
    for (doc, text) in documents() {
        for line in commands(&text) {
            let w = words(&line);
            // Leading VAR=value assignments are the command's environment.
            let w: Vec<String> = w
                .into_iter()
                .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                .collect();
            if w.first().map(String::as_str) == Some("cargo") {
                checked += 1;
                if let Err(e) = check_cargo(&w[1..], &workspace, &fuzz) {
                    failures.push(format!("{doc}: `{line}`: {e}"));
                }
            }
        }
    }
    println!("checked {checked} cargo commands");
    assert!(checked >= 2, "the README's two commands, at least");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn every_script_a_command_runs_exists_and_is_executable() {
    use std::os::unix::fs::PermissionsExt;
    let mut failures = Vec::new();
    for (doc, text) in documents() {
        for line in commands(&text) {
            let w = words(&line);
            let Some(script) = w.iter().find(|w| !w.contains('=')) else {
                continue;
            };
            if !script.starts_with(".ci/") && !script.starts_with(".clusterfuzzlite/") {
                continue;
            }
            match fs::metadata(root().join(script)) {
                Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {}
                Ok(_) => failures.push(format!("{doc}: `{line}`: {script} is not an executable file")),
                Err(e) => failures.push(format!("{doc}: `{line}`: {script}: {e}")),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

/// Top-level entries a path written in the docs may start with.
const TOP: [&str; 13] = [
    "src/",
    "tests/",
    "benches/",
    "examples/",
    "kvm-glue/",
    "fuzz/",
    "docs/",
    "proptest-regressions/",
    ".ci/",
    ".cargo/",
    ".clusterfuzzlite/",
    ".github/",
    "CHANGELOG.md",
];

/// `a/{b,c}.rs` -> `a/b.rs`, `a/c.rs` (one brace group).
fn expand(path: &str) -> Vec<String> {
    match (path.find('{'), path.find('}')) {
        (Some(open), Some(close)) if open < close => path[open + 1..close]
            .split(',')
            .map(|alt| format!("{}{}{}", &path[..open], alt, &path[close + 1..]))
            .collect(),
        _ => vec![path.to_string()],
    }
}

/// Repository paths written in a text: inline code spans and link targets.
fn paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut in_block = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            in_block = !in_block;
            continue;
        }
        if in_block {
            continue;
        }
        let spans = line.split('`').skip(1).step_by(2);
        let links = line.split("](").skip(1).filter_map(|rest| rest.split(')').next());
        for candidate in spans.chain(links) {
            let candidate = candidate.split(['#', ' ']).next().unwrap_or("");
            let candidate = candidate.trim_start_matches("../");
            if TOP.iter().any(|t| candidate.starts_with(t)) && !candidate.contains('<') && !candidate.contains('*') {
                out.extend(expand(candidate.trim_end_matches([',', '.', ':'])));
            }
        }
    }
    out
}

#[test]
fn every_repository_path_the_docs_name_exists() {
    let mut checked = 0;
    let mut failures = Vec::new();
    for (doc, text) in documents() {
        // docs/x.md links relative to docs/, kvm-glue/README.md to kvm-glue/.
        let base = match doc.split_once('/') {
            Some((dir, _)) => root().join(dir),
            None => root().to_path_buf(),
        };
        for path in paths(&text) {
            checked += 1;
            let exists = root().join(&path).exists() || base.join(&path).exists();
            if !exists {
                failures.push(format!("{doc}: `{path}` does not exist"));
            }
        }
    }
    println!("checked {checked} paths");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn ci_runs_the_test_command_the_readme_gives() {
    let readme = fs::read_to_string(root().join("README.md")).expect("README.md");
    let test = commands(&readme)
        .into_iter()
        .find(|c| c.starts_with("cargo test"))
        .expect("the README gives a test command");
    let ci = fs::read_to_string(root().join(".ci/run")).expect(".ci/run");
    assert!(
        ci.lines().any(|l| l.trim() == test),
        "the README's test command `{test}` is not a line of .ci/run"
    );
}

#[test]
fn the_readme_kvm_glue_example_is_the_one_kvm_glue_runs_as_a_doctest() {
    let readme = fs::read_to_string(root().join("README.md")).expect("README.md");
    let lib = fs::read_to_string(root().join("kvm-glue/src/lib.rs")).expect("kvm-glue/src/lib.rs");
    // kvm-glue's crate docs: its `//!` lines, with rustdoc's hidden `# ` lines dropped.
    let crate_docs: String = lib
        .lines()
        .filter_map(|l| l.strip_prefix("//!"))
        .map(|l| l.strip_prefix(' ').unwrap_or(l))
        .map(|l| format!("{l}\n"))
        .collect();
    let doctests: Vec<Vec<String>> = blocks(&crate_docs, "")
        .into_iter()
        .chain(blocks(&crate_docs, "rust"))
        .map(|(_, body)| {
            body.lines()
                .filter(|l| !(l.trim_start().starts_with("# ") || l.trim() == "#"))
                .map(str::to_string)
                .collect()
        })
        .collect();
    // The README's Rust blocks are the core's doctests, which cannot build
    // kvm_glue code: its kvm-glue example is an `rs` block, checked here.
    assert!(
        !blocks(&readme, "rust")
            .iter()
            .any(|(_, body)| body.contains("kvm_glue")),
        "a `rust` block of the README uses kvm_glue: the core's doctest cannot build it"
    );
    let examples: Vec<Vec<String>> = blocks(&readme, "rs")
        .into_iter()
        .map(|(_, body)| body.lines().map(str::to_string).collect())
        .collect();
    assert_eq!(examples.len(), 1, "one kvm-glue example in the README");
    let example = &examples[0];
    let found = doctests
        .iter()
        .any(|d| d.windows(example.len()).any(|w| w == example.as_slice()));
    assert!(
        found,
        "the README's kvm-glue example is not a verbatim excerpt of a doctest in kvm-glue/src/lib.rs:\n{}",
        example.join("\n")
    );
}
