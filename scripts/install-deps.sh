#!/usr/bin/env bash
# Installs what Kiln's build, guests and tests need on a fresh Debian 12
# machine. Idempotent: installs only what is missing.
set -euo pipefail

packages=(
    python3-venv         # the policy engine's ONNX Runtime / training venv
    fonts-dejavu-core    # text in the policy report's PNG plots
    gcc-mingw-w64-x86-64 # Windows test programs (guests/windows-tests)
    mmdebstrap           # guest image builder (guests/images) and its tests
    e2fsprogs            # mkfs.ext4 -d for guest root disks
    cpio                 # guest image tests read initramfs listings
    pkg-config           # finds libxkbcommon for the Clay shell's build
    libxkbcommon-dev     # Clay shell keyboard handling (smithay-client-toolkit)
    libwayland-dev       # Clay shell's Wayland client
    fio                  # guest tools for the virtio tests and kiln-bench-io (guest kits):
    iperf3               #   block and network benchmarks,
    socat                #   TCP/vsock/Unix-socket plumbing (guest and nested host),
    stress-ng            #   memory pressure
)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
    echo "install-deps: installing ${missing[*]}" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# The outer QEMU, which runs the nested KVM host: QEMU 10.0 from Debian's
# bookworm-backports suite (integration-tests/README.md, "The outer QEMU",
# has the figures behind the choice). The QEMU *peer* that runs inside the
# nested host is another one: the rig fetches a pinned 7.2 into its cache
# (integration-tests/src/peer.rs).
qemu_suite=bookworm-backports
qemu_major=10
if ! grep -rqs "^Suites:.*\b${qemu_suite}\b" /etc/apt/sources.list.d/ &&
    ! grep -qs "^deb .* ${qemu_suite} " /etc/apt/sources.list; then
    echo "install-deps: adding the ${qemu_suite} suite (/etc/apt/sources.list.d/${qemu_suite}.sources)" >&2
    cat >"/etc/apt/sources.list.d/${qemu_suite}.sources" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: ${qemu_suite}
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
    apt-get update -qq
fi
qemu_installed=$(dpkg-query -W -f='${Status} ${Version}' qemu-system-x86 2>/dev/null || true)
case "$qemu_installed" in
"install ok installed 1:${qemu_major}."*) ;;
*)
    echo "install-deps: installing qemu-system-x86 ${qemu_major}.x from ${qemu_suite} (now: ${qemu_installed:-none})" >&2
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq -t "$qemu_suite" qemu-system-x86 </dev/null >/dev/null
    ;;
esac
