#!/usr/bin/env bash
# Creates (once) the Python environment for kiln-policy: the ONNX Runtime shared
# library used by the `ort` crate at run time, and the training stack.
# Idempotent: a stamp file records the pinned requirements; a second run with the
# same pins only prints the library path.
#
# Prints the ORT_DYLIB_PATH value on stdout (last line) and writes it to
# <repo>/.cache/kiln-policy-venv/ort_dylib_path. Progress goes to stderr.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/.cache/kiln-policy-venv"
reqs="$here/requirements.txt"
stamp="$venv/.requirements.stamp"

if ! command -v python3 >/dev/null || ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    echo "setup.sh: needs python3 with venv and ensurepip (Debian: apt-get install python3 python3-venv)" >&2
    exit 1
fi
if [[ ! -f "$stamp" ]] || ! cmp -s "$reqs" "$stamp"; then
    echo "setup.sh: creating Python venv in $venv" >&2
    python3 -m venv "$venv" >&2
    "$venv/bin/pip" install --quiet --disable-pip-version-check -r "$reqs" >&2
    cp "$reqs" "$stamp"
fi

lib="$("$venv/bin/python" - <<'PY'
import glob, os, onnxruntime
capi = os.path.join(os.path.dirname(onnxruntime.__file__), "capi")
libs = sorted(glob.glob(os.path.join(capi, "libonnxruntime.so*")))
if not libs:
    raise SystemExit("setup.sh: no libonnxruntime.so* in " + capi)
print(libs[0])
PY
)"
echo "$lib" > "$venv/ort_dylib_path"
echo "$lib"
