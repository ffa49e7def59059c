#!/usr/bin/env bash
# Installs what Kiln's build, guests and tests need on a fresh Debian 12
# machine. Idempotent: installs only what is missing.
set -euo pipefail

packages=(
    qemu-system-x86      # the nested KVM host (and the QEMU peer in benchmarks)
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
