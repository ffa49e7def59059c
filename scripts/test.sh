#!/usr/bin/env bash
# The whole test suite, from a fresh Debian 12 machine: installs what it
# needs, builds Kiln, fetches guest artifacts by package name into
# .cache/kiln, and runs every test (the end-to-end ones on hardware KVM or
# inside the nested KVM host, whichever this machine offers).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

scripts/install-deps.sh
echo "test.sh: setting up the ONNX Runtime (PyPI onnxruntime wheel)" >&2
ORT_DYLIB_PATH="$(policy/training/setup.sh | tail -1)"
export ORT_DYLIB_PATH

echo "test.sh: building Kiln, the guest agent and the Clay shell (release; used inside the nested host and the guest images)" >&2
cargo build --release --locked -p kiln -p kiln-agent -p clay-shell
echo "test.sh: fetching the default guest" >&2
"$KILN_BIN" guest fetch

# A short fuzz of every guest-facing device parser (docs/fuzzing.md); a
# crash fails the run, after the tests have run too.
echo "test.sh: fuzzing the device parsers (${KILN_FUZZ_SECONDS:-5} s per target)" >&2
fuzz_status=0
scripts/fuzz.sh "${KILN_FUZZ_SECONDS:-5}" || fuzz_status=$?

cargo nextest run --workspace --locked --no-fail-fast
if [ "$fuzz_status" -ne 0 ]; then
    echo "test.sh: fuzzing found a crash; see the 'fuzz:' lines above and fuzz/artifacts/" >&2
    exit "$fuzz_status"
fi
