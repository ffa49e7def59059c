#!/usr/bin/env bash
# Installs the peer of the daemon benchmark (kiln-bench-daemon,
# docs/benchmarks.md): Debian's libvirt with its QEMU driver and Python
# binding. The benchmark starts virtlogd and libvirtd itself when they are
# not running (these machines have no systemd).
set -euo pipefail
need=()
for p in libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients python3-libvirt; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need+=("$p")
done
if [ "${#need[@]}" -gt 0 ]; then
    echo "bench-daemon-setup: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "${need[@]}" </dev/null
fi
