# Sourced by the project's scripts: cache location and the ONNX Runtime path.
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export KILN_CACHE_DIR="${KILN_CACHE_DIR:-$repo/.cache/kiln}"
export KILN_BIN="${KILN_BIN:-$repo/target/release/kiln}"
