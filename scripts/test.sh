#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what it
# needs, builds Kiln, fetches guest artifacts by package name into
# .cache/kiln, and runs every test (the end-to-end ones on hardware KVM or
# inside the nested KVM host, whichever this machine offers). Campaigns
# longer than a minute are in the slow tier: scripts/test-slow.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
suite_start=$SECONDS

scripts/install-deps.sh
echo "test.sh: setting up the ONNX Runtime (PyPI onnxruntime wheel)" >&2
ORT_DYLIB_PATH="$(policy/training/setup.sh | tail -1)"
export ORT_DYLIB_PATH

echo "test.sh: building Kiln, the guest agent and the Clay shell (release; used inside the nested host and the guest images)" >&2
cargo build --release --locked -p kiln -p kiln-vmm -p kiln-agent -p clay-shell -p kiln-integration-tests
echo "test.sh: fetching the default guest" >&2
"$KILN_BIN" guest fetch

# A short fuzz of every guest-facing device parser (docs/fuzzing.md); a
# crash fails the run, after the tests have run too.
echo "test.sh: fuzzing the device parsers (${KILN_FUZZ_SECONDS:-5} s per target)" >&2
fuzz_status=0
scripts/fuzz.sh "${KILN_FUZZ_SECONDS:-5}" || fuzz_status=$?

# Test groups, priorities and the JUnit report: .config/nextest.toml.
test_status=0
cargo nextest run --workspace --locked --no-fail-fast || test_status=$?

# Schemathesis against a running daemon (api/openapi.yaml; docs/api.md).
echo "test.sh: fuzzing the REST API with schemathesis" >&2
api_fuzz_status=0
scripts/api-fuzz.sh || api_fuzz_status=$?

# One quick boot benchmark: Kiln and the QEMU peer once each, figures
# only, no assertions (the full one: kiln-bench-boot 5, docs/benchmarks.md).
echo "test.sh: quick boot benchmark (one run each; figures only)" >&2
bench_status=0
target/release/kiln-bench-boot --quick || bench_status=$?

echo "test.sh: whole suite took $(( (SECONDS - suite_start) / 60 )) min $(( (SECONDS - suite_start) % 60 )) s" >&2
scripts/test-summary.py target/nextest/default/junit.xml . || true
if [ "$fuzz_status" -ne 0 ]; then
    echo "test.sh: fuzzing found a crash; see the 'fuzz:' lines above and fuzz/artifacts/" >&2
fi
if [ "$api_fuzz_status" -ne 0 ]; then
    echo "test.sh: the REST API fuzz failed (exit $api_fuzz_status): see the 'api-fuzz:' lines above" >&2
fi
if [ "$bench_status" -ne 0 ]; then
    echo "test.sh: the quick boot benchmark failed (exit $bench_status): a guest did not reach its init marker; see its output above" >&2
fi
if [ "$test_status" -ne 0 ]; then
    echo "test.sh: tests failed (nextest exit $test_status); see the summary above" >&2
    exit "$test_status"
fi
[ "$fuzz_status" -eq 0 ] || exit "$fuzz_status"
[ "$api_fuzz_status" -eq 0 ] || exit "$api_fuzz_status"
exit "$bench_status"
