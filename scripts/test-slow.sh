#!/usr/bin/env bash
# The slow tier: campaigns longer than a minute that scripts/test.sh leaves
# out (integration-tests/README.md, "Test budget"). Each part prints its
# own figures or test summary; the script fails if any part fails.
#
#   scripts/test-slow.sh [PART ...]     default: images bench
#
# Parts:
#   images   the image builder's slow tier: reproducibility, QEMU boots, the
#            Clay screendump (cargo nextest -p kiln-images --run-ignored)
#   bench    kiln-bench-boot 5 and kiln-bench-io 3 (docs/benchmarks.md)
#   daemon   kiln-bench-daemon: kiln serve against libvirtd on this machine,
#            and launch to init against libvirt's QEMU command line in the
#            nested host (scripts/bench-daemon-setup.sh installs libvirt)
#   fuzz     every fuzz target for 60 s (scripts/fuzz.sh; docs/fuzzing.md)
#   hardware the tests that need hardware KVM (VT-x/AMD-V); on a machine
#            without it they fail, saying so
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/env.sh

parts=("$@")
[ "${#parts[@]}" -gt 0 ] || parts=(images bench)

scripts/install-deps.sh
cargo build --release --locked -p kiln -p kiln-vmm -p kiln-agent -p clay-shell -p kiln-integration-tests
"$KILN_BIN" guest fetch >/dev/null

failed=()
for part in "${parts[@]}"; do
    echo "test-slow.sh: $part" >&2
    start=$SECONDS
    rc=0
    case "$part" in
        images) cargo nextest run --locked -p kiln-images --run-ignored ignored-only || rc=$? ;;
        bench)
            target/release/kiln-bench-boot 5 || rc=$?
            target/release/kiln-bench-io 3 || rc=$?
            ;;
        daemon)
            scripts/bench-daemon-setup.sh
            target/release/kiln-bench-daemon all || rc=$?
            ;;
        fuzz) scripts/fuzz.sh 60 || rc=$? ;;
        hardware)
            cargo nextest run --locked -p kiln-integration-tests --run-ignored ignored-only \
                -E 'test(/hardware_kvm/)' || rc=$?
            ;;
        *)
            echo "test-slow.sh: unknown part '$part' (images, bench, daemon, fuzz, hardware)" >&2
            exit 2
            ;;
    esac
    echo "test-slow.sh: $part: $([ "$rc" -eq 0 ] && echo ok || echo "FAILED (exit $rc)") in $((SECONDS - start)) s" >&2
    [ "$rc" -eq 0 ] || failed+=("$part")
done
if [ "${#failed[@]}" -ne 0 ]; then
    echo "test-slow.sh: failed: ${failed[*]}" >&2
    exit 1
fi
