#!/usr/bin/env bash
# Kiln's main job on the default guest: builds Kiln, fetches the default
# guest (Debian cloud kernel + busybox initramfs) by package name, and boots
# it through the daemon (kiln serve, its REST API, kiln vm create/console/
# shutdown) with its console on this terminal -- on hardware KVM directly,
# otherwise inside the nested KVM host. Extra arguments go to
# `kiln vm create`.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh
scripts/install-deps.sh
cargo build --release --locked -p kiln -p kiln-vmm -p kiln-integration-tests
"$KILN_BIN" guest fetch >/dev/null
exec target/release/kiln-run-default-guest "$@"
