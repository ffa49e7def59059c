//! `kiln-run-default-guest [--interactive] [KILN VM CREATE ARGS...]`: boots
//! the default guest through the Kiln daemon and shows its console on this
//! terminal. On hardware KVM Kiln runs here; otherwise inside the nested KVM
//! host (said plainly first).
//!
//! It starts `kiln serve`, creates and starts the default guest through the
//! REST API (`kiln vm create --start`), attaches to its serial console
//! (`kiln vm console`), then shuts it down with the ACPI power button
//! (`kiln vm shutdown`) and stops the daemon it started. By default a short
//! session is typed into the guest's shell through the console (uname,
//! CPUs, memory, the virtio devices: a scratch disk, rng and balloon), so
//! the whole path is shown and the run ends by itself. `--interactive`
//! hands the console to you instead (Ctrl-] detaches; the guest is then
//! shut down).

use kiln_integration_tests::{run, HostKvm, Scenario};

const SESSION: &[&str] = &[
    "uname -a",
    "echo \"CPUs: $(nproc)\"; grep -m1 'model name' /proc/cpuinfo",
    "free -m",
    "ls /sys/bus/virtio/drivers",
    "ls /sys/bus/pci/devices; cat /proc/interrupts | grep -c PCI-MSI",
    "echo \"disk vda: $(( $(cat /sys/block/vda/size) / 2048 )) MiB, rng: $(cat /sys/class/misc/hw_random/rng_current)\"",
    "dd if=/dev/urandom of=/dev/vda bs=1M count=8 conv=fsync 2>&1 | tail -1",
    // Computed, so the echo of the typed line does not match.
    "echo \"KILN_SESSION_$((40+2))_DONE\"",
];

fn quote(a: &str) -> String {
    format!("'{}'", a.replace('\'', "'\\''"))
}

fn main() {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    let interactive = args.first().is_some_and(|a| a == "--interactive");
    if interactive {
        args.remove(0);
    }
    let host = HostKvm::detect();
    eprintln!("kiln: this host has {}", host.describe());
    if host != HostKvm::Hardware {
        eprintln!("kiln: starting the nested KVM host (QEMU with a software-emulated CPU; the guest's console appears in about a minute)");
    }
    let extra: Vec<String> = args.iter().map(|a| quote(a)).collect();
    // The daemon and its VM live in the run's work directory.
    let mut script = format!(
        "set -e\n\
         d=$PWD/kiln; mkdir -p $d; export KILN_SOCKET=$d/kiln.sock\n\
         echo 'kiln: starting the daemon: kiln serve --socket '$KILN_SOCKET\n\
         \"$KILN\" serve --socket $KILN_SOCKET --state-dir $d/state --run-dir $d/run --vmm-binary \"$KILN_VMM\" 2>$d/daemon.log &\n\
         daemon=$!\n\
         i=0; until \"$KILN\" host info >/dev/null 2>&1; do i=$((i+1)); [ $i -gt 100 ] && {{ cat $d/daemon.log; exit 1; }}; sleep 0.1; done\n\
         truncate -s 64M $d/scratch.img\n\
         echo '$ kiln vm create default --start ...'\n\
         \"$KILN\" vm create default --kernel \"$GUEST_BZIMAGE\" --initrd \"$GUEST_INITRD\" --cpus 2 --memory 512M \
           --disk path=$d/scratch.img --rng --balloon stats=5 --start {}\n\
         echo '$ kiln vm list'; \"$KILN\" vm list\n\
         i=0; until \"$KILN\" vm console default --log | grep -q KILN_SHELL_READY; do i=$((i+1)); [ $i -gt 600 ] && break; sleep 0.5; done\n",
        extra.join(" ")
    );
    if interactive {
        script.push_str(
            "echo 'kiln: attached to the console of VM default (Ctrl-] detaches, then it is shut down)'\n\
             \"$KILN\" vm console default || true\n",
        );
    } else {
        script.push_str(
            "echo '$ kiln vm console default --log | tail -n 3  (the end of its boot log)'\n\
             \"$KILN\" vm console default --log | tail -n 3\n\
             echo '$ kiln vm console default  (a short session typed into its shell)'\n",
        );
        script.push_str("{ sleep 1;");
        for cmd in SESSION {
            script.push_str(&format!(" echo {}; sleep 2;", quote(cmd)));
        }
        script.push_str(
            " } | \"$KILN\" vm console default --until KILN_SESSION_42_DONE --timeout 300\necho\n",
        );
    }
    script.push_str(
        "echo '$ kiln vm shutdown default'; \"$KILN\" vm shutdown default --timeout 60\n\
         echo '$ kiln vm list'; \"$KILN\" vm list\n\
         echo 'kiln: stopping the daemon'; kill $daemon; wait $daemon || true\n",
    );
    let mut s = Scenario::new("run_default_guest", &script);
    s.interactive = true;
    s.timeout = std::time::Duration::from_secs(u64::MAX / 4);
    match run(&s) {
        Ok(out) => std::process::exit(out.exit_code),
        Err(e) => {
            eprintln!("kiln: error: {e}");
            std::process::exit(1);
        }
    }
}
