#!/bin/sh
# Builds the Windows test programs into ${1:-build/} next to this script.
# Needs Debian's gcc-mingw-w64-x86-64 (apt-get install gcc-mingw-w64-x86-64).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
out=${1:-$here/build}
if ! command -v x86_64-w64-mingw32-gcc >/dev/null 2>&1; then
    echo "windows-tests: x86_64-w64-mingw32-gcc not found; install gcc-mingw-w64-x86-64" >&2
    exit 1
fi
make -s -C "$here" OUT="$out"
echo "windows-tests: built $out/kiln-console-test.exe $out/kiln-gui-test.exe"
