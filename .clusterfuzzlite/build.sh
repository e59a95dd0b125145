#!/bin/bash -eu
# Builds every cargo-fuzz target of the project for ClusterFuzzLite/OSS-Fuzz
# and leaves one binary per target in $OUT, with its seed corpus beside it
# as <target>_seed_corpus.zip.
#
# OSS-Fuzz's `compile` runs this with $SRC, $OUT, $SANITIZER, RUSTFLAGS
# (`--cfg fuzzing -Zsanitizer=...`), CUSTOM_LIBFUZZER_PATH and a pinned
# nightly in RUSTUP_TOOLCHAIN already set; .ci/oss-fuzz-build runs it as a
# plain script with the same variables, outside Docker.
#
# Every target: each directory holding a cargo-fuzz manifest (`cargo-fuzz =
# true`: fuzz/ and any <crate>/fuzz/) and every [[bin]] it declares (what
# `cargo fuzz list` names), so a new target is built without touching this
# script.

project="$SRC/x86-debugreg"
triple="${CARGO_BUILD_TARGET:-x86_64-unknown-linux-gnu}"
out="$(cd "$OUT" && pwd)"
cd "$project"

# cargo fuzz's own sanitizer flag must agree with the one OSS-Fuzz put in
# RUSTFLAGS; the sanitizers Rust has no -Zsanitizer for build with none.
case "${SANITIZER:-address}" in
    address | memory | thread | leak) sanitizer="${SANITIZER:-address}" ;;
    *) sanitizer=none ;;
esac

fuzz_dirs=()
for manifest in fuzz/Cargo.toml */fuzz/Cargo.toml; do
    if [ -f "$manifest" ] && grep -q '^cargo-fuzz *= *true' "$manifest"; then
        fuzz_dirs+=("$(dirname "$manifest")")
    fi
done
if [ "${#fuzz_dirs[@]}" -eq 0 ]; then
    echo "build.sh: no cargo-fuzz directory under $project" >&2
    exit 1
fi

built=()
for dir in "${fuzz_dirs[@]}"; do
    # How OSS-Fuzz builds Rust: release, with debug assertions and overflow
    # checks, for the sanitizer in RUSTFLAGS / $SANITIZER.
    cargo fuzz build --fuzz-dir "$dir" -O --debug-assertions --sanitizer "$sanitizer" --target "$triple"
    # cargo fuzz builds into the fuzz workspace's target directory unless
    # CARGO_TARGET_DIR says otherwise (relative to here, as cargo reads it).
    release="${CARGO_TARGET_DIR:-$dir/target}/$triple/release"
    # The targets are the manifest's [[bin]]s, as `cargo fuzz list` says;
    # read through cargo metadata where jq exists (the image has it), since
    # the image's cargo wrapper turns every `cargo fuzz` of a coverage build
    # into a plain build that lists nothing.
    if command -v jq > /dev/null 2>&1; then
        targets="$(cargo metadata --no-deps --format-version 1 --manifest-path "$dir/Cargo.toml" |
            jq -r '.packages[].targets[] | select(.kind | index("bin")) | .name')"
    else
        targets="$(cargo fuzz list --fuzz-dir "$dir")"
    fi
    if [ -z "$targets" ]; then
        echo "build.sh: cargo fuzz list names no target in $dir" >&2
        exit 1
    fi
    for target in $targets; do
        for seen in "${built[@]+"${built[@]}"}"; do
            if [ "$seen" = "$target" ]; then
                echo "build.sh: two fuzz targets named $target" >&2
                exit 1
            fi
        done
        cp "$release/$target" "$out/$target"
        corpus="$dir/corpus/$target"
        if [ -d "$corpus" ] && [ -n "$(ls -A "$corpus")" ]; then
            rm -f "$out/${target}_seed_corpus.zip"
            (cd "$corpus" && zip -q -r "$out/${target}_seed_corpus.zip" .)
        fi
        built+=("$target")
    done
done
echo "build.sh: built ${built[*]} into $out"
