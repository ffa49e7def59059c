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

echo "test.sh: building Kiln (release, used inside the nested host)" >&2
cargo build --release --locked -p kiln -p kiln-agent
echo "test.sh: fetching the default guest" >&2
"$KILN_BIN" guest fetch

cargo nextest run --workspace --locked --no-fail-fast
