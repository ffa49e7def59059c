#!/usr/bin/env bash
# Installs Kiln into a prefix (default /usr/local):
#   PREFIX/bin/kiln, PREFIX/bin/kiln-vmm
#   PREFIX/share/kiln/models/   the policy models: <lever>.onnx, .schema.json, .md (model card)
#   PREFIX/lib/kiln/            ONNX Runtime: libonnxruntime.so.X.Y.Z and libonnxruntime.so
# An installed kiln finds its models and ONNX Runtime there by itself
# (kiln_policy::install; `kiln policy models` shows what it found).
#
# Usage: scripts/install.sh [--prefix DIR] [--from DIR]
#   --from DIR  take kiln and kiln-vmm from DIR instead of building them
#               (cargo build --release into target/release).
# ONNX Runtime comes from $ORT_DYLIB_PATH if set, else from
# policy/training/setup.sh (PyPI's onnxruntime wheel, cached in .cache/).
set -euo pipefail
cd "$(dirname "$0")/.."

prefix=/usr/local
from=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --prefix) prefix="${2:?--prefix needs a directory}"; shift 2 ;;
        --from) from="${2:?--from needs a directory}"; shift 2 ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "install.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
    esac
done

if [[ -z "$from" ]]; then
    echo "install.sh: building kiln and kiln-vmm (release)" >&2
    cargo build --release --locked -p kiln -p kiln-vmm >&2
    from=target/release
fi
for bin in kiln kiln-vmm; do
    [[ -x "$from/$bin" ]] || { echo "install.sh: $from/$bin not found" >&2; exit 1; }
done

ort="${ORT_DYLIB_PATH:-}"
if [[ -z "$ort" ]]; then
    echo "install.sh: setting up ONNX Runtime (policy/training/setup.sh)" >&2
    ort="$(policy/training/setup.sh | tail -1)"
fi
[[ -f "$ort" ]] || { echo "install.sh: ONNX Runtime library $ort not found" >&2; exit 1; }
ort_real="$(readlink -f "$ort")"
ort_name="$(basename "$ort_real")"

models="$prefix/share/kiln/models"
libdir="$prefix/lib/kiln"
install -d "$prefix/bin" "$models" "$libdir"
install -m 0755 "$from/kiln" "$from/kiln-vmm" "$prefix/bin/"
# Replace the whole set, so a lever dropped upstream does not linger.
rm -f "$models"/*.onnx "$models"/*.schema.json "$models"/*.md
install -m 0644 policy/models/*.onnx policy/models/*.schema.json policy/models/*.md "$models/"
install -m 0644 "$ort_real" "$libdir/$ort_name"
[[ "$ort_name" == libonnxruntime.so ]] || ln -sfn "$ort_name" "$libdir/libonnxruntime.so"

echo "install.sh: installed into $prefix; what the installed kiln finds:" >&2
# Without the developer's variables, as a user would run it; fails unless
# every model loads.
env -u ORT_DYLIB_PATH -u KILN_MODELS_DIR "$prefix/bin/kiln" policy models --check
