#!/usr/bin/env bash
# Fuzzes every guest-facing parser of Kiln's devices (the cargo-fuzz
# targets in fuzz/) for SECONDS_PER_TARGET seconds each (default 10).
# Corpora grow in fuzz/corpus/<target> and are reused by the next run;
# crashing inputs land in fuzz/artifacts/<target>/. Exits non-zero, naming
# the target and the artifact, if any target crashes, leaks, hangs or runs
# out of memory. See docs/fuzzing.md.
#
# KILN_FUZZ_ARGS adds libFuzzer flags to every run (e.g. "-max_len=8192";
# not -jobs, whose output goes to fuzz-N.log files); see docs/fuzzing.md.
#
# Only stable Rust here: RUSTC_BOOTSTRAP=1 lets it take the -Z flags
# cargo-fuzz passes (sanitizer, coverage instrumentation).
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${1:-10}"
if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: scripts/fuzz.sh [SECONDS_PER_TARGET]" >&2
    exit 2
fi

CARGO_FUZZ_VERSION=0.13.2
export RUSTC_BOOTSTRAP=1
triple="$(rustc -vV | sed -n 's/^host: //p')"
bin_dir="fuzz/target/$triple/release"
log_dir="fuzz/target/logs"

if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz: installing cargo-fuzz $CARGO_FUZZ_VERSION" >&2
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked
fi

# cargo fuzz build has no --locked: check the lock file is current first.
if ! cargo metadata --locked --format-version 1 --manifest-path fuzz/Cargo.toml >/dev/null; then
    echo "fuzz: fuzz/Cargo.lock is out of date; run 'cargo update --manifest-path fuzz/Cargo.toml -w' and commit it" >&2
    exit 1
fi

echo "fuzz: building the targets (address sanitizer)" >&2
start=$SECONDS
cargo fuzz build --fuzz-dir fuzz --sanitizer address
echo "fuzz: built in $((SECONDS - start)) s" >&2

mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
mkdir -p "$log_dir"
failed=()
for t in "${targets[@]}"; do
    mkdir -p "fuzz/corpus/$t" "fuzz/artifacts/$t"
    log="$log_dir/$t.log"
    rc=0
    # timeout: a hang in one input is reported by libFuzzer after -timeout;
    # the outer limit only guards against libFuzzer itself wedging.
    timeout --kill-after=10 $((seconds + 120)) \
        "$bin_dir/$t" "fuzz/corpus/$t" \
        -max_total_time="$seconds" -rss_limit_mb=2048 -timeout=10 \
        -artifact_prefix="fuzz/artifacts/$t/" -print_final_stats=1 ${KILN_FUZZ_ARGS:-} \
        >"$log" 2>&1 || rc=$?
    done_line="$(grep -E '^Done [0-9]+ runs in [0-9]+ second' "$log" | tail -1 || true)"
    runs="$(sed -E 's/^Done ([0-9]+) runs in ([0-9]+) second.*/\1/' <<<"$done_line")"
    secs="$(sed -E 's/^Done ([0-9]+) runs in ([0-9]+) second.*/\2/' <<<"$done_line")"
    corpus="$(find "fuzz/corpus/$t" -type f | wc -l)"
    if [ "$rc" -eq 0 ] && [ -n "$done_line" ]; then
        rate=$((runs / (secs > 0 ? secs : 1)))
        echo "fuzz: $t: ok, $runs runs in $secs s ($rate exec/s), corpus $corpus inputs"
    else
        artifact="$(sed -nE 's/.*Test unit written to (\S+).*/\1/p' "$log" | tail -1)"
        echo "fuzz: $t: FAILED (exit $rc), artifact ${artifact:-none}, log $log" >&2
        # The sanitizer or panic report and the stack trace.
        grep -m1 -B2 -A40 -E '^==[0-9]+==ERROR|panicked at|^==[0-9]+== ERROR|ALARM|out-of-memory|deadly signal' "$log" >&2 || tail -40 "$log" >&2
        [ -n "$artifact" ] && echo "fuzz: reproduce with: RUSTC_BOOTSTRAP=1 cargo fuzz run --fuzz-dir fuzz $t $artifact" >&2
        failed+=("$t${artifact:+ ($artifact)}")
    fi
done

if [ "${#failed[@]}" -ne 0 ]; then
    echo "fuzz: crashed: ${failed[*]}" >&2
fi
echo "fuzz: $(( ${#targets[@]} - ${#failed[@]} )) passed, ${#failed[@]} failed"
[ "${#failed[@]}" -eq 0 ]
