//! One guest with virtio-pci devices, as a shell command for Kiln or for
//! QEMU (the peer the end-to-end tests and the I/O benchmark compare
//! against), plus the host-side shell functions that hide the two VMMs'
//! differences (control socket, vsock host side).
//!
//! Kiln's flags (`kiln run`):
//! `--disk path=IMG[,readonly=on][,serial=S]` (repeatable),
//! `--net tap=NAME[,mac=MAC]`, `--vsock cid=3,uds=PATH` (Firecracker's
//! convention: a host client connects to PATH and writes `CONNECT <port>\n`,
//! gets `OK <port>\n`; a guest connecting to CID 2 port P reaches the Unix
//! listener at `PATH_P`), `--balloon deflate_on_oom=on,stats=1[,free_page_reporting=on]`,
//! `--rng`, `--virtio-console file=PATH`, `--control PATH` (the VMM control
//! protocol, spoken by `kiln vmm-ctl`: `set_balloon_target mib=<MiB in the
//! balloon>` → `{"target_mib":N,...}`, `balloon_stats` → `{...,"stats":{"free_memory":N,...}}`,
//! `status`, `workers`, `set_worker_placement ...`).
//!
//! QEMU: the pinned peer ([`crate::peer`]: scripts get it from
//! [`crate::PeerQemu::add_to`]) with `-M microvm,pcie=on` (a PCIe host
//! bridge, no legacy devices, quick to boot) and the matching
//! `virtio-*-pci` devices; its QMP socket stands
//! in for the control socket and vhost-vsock (AF_VSOCK in the host) for the
//! Unix-socket vsock.

use crate::peer::PEER_COMMAND;

/// The two VMMs side by side.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vmm {
    Kiln,
    Qemu,
}

impl Vmm {
    pub fn name(self) -> &'static str {
        match self {
            Vmm::Kiln => "kiln",
            Vmm::Qemu => "qemu",
        }
    }
}

/// A disk image: `path` is a shell word (it may use `$WORKDIR`).
#[derive(Clone, Debug)]
pub struct Disk {
    pub path: String,
    pub readonly: bool,
    pub serial: String,
}

/// What the guest gets. Paths are shell words, double-quoted in the
/// command, so `$WORKDIR/x` works.
#[derive(Clone, Debug)]
pub struct VmSpec {
    /// The kernel (default `$GUEST_BZIMAGE`, the default guest's).
    pub kernel: String,
    /// The initramfs (a guest kit).
    pub initrd: String,
    pub cpus: u32,
    pub memory_mib: u32,
    /// Appended to `console=ttyS0 reboot=k panic=1`.
    pub cmdline_extra: String,
    pub disks: Vec<Disk>,
    /// Tap interface name (the VMM creates it; the host side is set up by
    /// the script, see [`HOST_PRELUDE`]'s `tap_up`).
    pub tap: Option<String>,
    pub mac: String,
    /// Kiln: the vsock Unix socket; QEMU: vhost-vsock, guest CID 3 either way.
    pub vsock_uds: Option<String>,
    pub balloon: bool,
    /// With `balloon`: free page reporting (on by default; freed guest
    /// memory then leaves the VMM's RSS without any inflation).
    pub balloon_free_page_reporting: bool,
    pub rng: bool,
    /// File that receives the guest's `/dev/hvc0`.
    pub virtio_console: Option<String>,
    /// Kiln: the control socket; QEMU: its QMP socket.
    pub control: Option<String>,
}

impl VmSpec {
    pub fn new(initrd: &str) -> VmSpec {
        VmSpec {
            kernel: "$GUEST_BZIMAGE".into(),
            initrd: initrd.into(),
            cpus: 1,
            memory_mib: 256,
            cmdline_extra: "quiet".into(),
            disks: Vec::new(),
            tap: None,
            mac: "52:54:00:12:34:56".into(),
            vsock_uds: None,
            balloon: false,
            balloon_free_page_reporting: true,
            rng: false,
            virtio_console: None,
            control: None,
        }
    }

    fn cmdline(&self, vmm: Vmm) -> String {
        // QEMU's microvm resets through the keyboard controller it lacks:
        // triple-fault instead (reboot=t), as the rig self-test does.
        let reboot = if vmm == Vmm::Qemu {
            "reboot=t"
        } else {
            "reboot=k"
        };
        format!("console=ttyS0 {reboot} panic=1 {}", self.cmdline_extra)
            .trim()
            .to_string()
    }

    /// The command line for `vmm` (one line of shell, no redirections).
    pub fn command(&self, vmm: Vmm) -> String {
        match vmm {
            Vmm::Kiln => self.kiln_command(),
            Vmm::Qemu => self.qemu_command(),
        }
    }

    fn kiln_command(&self) -> String {
        let mut c = format!(
            "\"$KILN\" run --kernel \"{}\" --initrd \"{}\" --cpus {} --memory {}M --cmdline '{}'",
            self.kernel,
            self.initrd,
            self.cpus,
            self.memory_mib,
            self.cmdline(Vmm::Kiln)
        );
        for d in &self.disks {
            c.push_str(&format!(
                " --disk \"path={}{},serial={}\"",
                d.path,
                if d.readonly { ",readonly=on" } else { "" },
                d.serial
            ));
        }
        if let Some(tap) = &self.tap {
            c.push_str(&format!(" --net tap={tap},mac={}", self.mac));
        }
        if let Some(uds) = &self.vsock_uds {
            c.push_str(&format!(" --vsock \"cid=3,uds={uds}\""));
        }
        if self.balloon {
            c.push_str(" --balloon deflate_on_oom=on,stats=1");
            if self.balloon_free_page_reporting {
                c.push_str(",free_page_reporting=on");
            }
        }
        if self.rng {
            c.push_str(" --rng");
        }
        if let Some(path) = &self.virtio_console {
            c.push_str(&format!(" --virtio-console \"file={path}\""));
        }
        if let Some(path) = &self.control {
            c.push_str(&format!(" --control \"{path}\""));
        }
        c
    }

    fn qemu_command(&self) -> String {
        let mut c = format!(
            "{PEER_COMMAND} -enable-kvm -M microvm,pcie=on,rtc=off -cpu host -smp {} -m {} -nodefaults -no-user-config -nographic -serial stdio -no-reboot -kernel \"{}\" -initrd \"{}\" -append '{}'",
            self.cpus,
            self.memory_mib,
            self.kernel,
            self.initrd,
            self.cmdline(Vmm::Qemu)
        );
        for (i, d) in self.disks.iter().enumerate() {
            // Errors go to the guest (Kiln's behaviour); QEMU's default
            // stops the VM on ENOSPC.
            c.push_str(&format!(
                " -drive \"file={},format=raw,if=none,id=disk{i},werror=report,rerror=report{}\" -device virtio-blk-pci,drive=disk{i},serial={}",
                d.path,
                if d.readonly { ",readonly=on" } else { "" },
                d.serial
            ));
        }
        if let Some(tap) = &self.tap {
            c.push_str(&format!(
                " -netdev tap,id=net0,ifname={tap},script=no,downscript=no -device virtio-net-pci,netdev=net0,mac={},romfile=",
                self.mac
            ));
        }
        if self.vsock_uds.is_some() {
            c.push_str(" -device vhost-vsock-pci,guest-cid=3");
        }
        if self.balloon {
            let fpr = if self.balloon_free_page_reporting {
                "on"
            } else {
                "off"
            };
            c.push_str(&format!(
                " -device virtio-balloon-pci,id=balloon0,deflate-on-oom=on,free-page-reporting={fpr},guest-stats-polling-interval=1"
            ));
        }
        if self.rng {
            c.push_str(" -device virtio-rng-pci");
        }
        if let Some(path) = &self.virtio_console {
            c.push_str(&format!(" -device virtio-serial-pci -chardev \"file,id=vcon0,path={path}\" -device virtconsole,chardev=vcon0"));
        }
        if let Some(path) = &self.control {
            c.push_str(&format!(" -qmp \"unix:{path},server=on,wait=off\""));
        }
        c
    }

    /// Shell: the host-side functions for `vmm` (see [`HOST_PRELUDE`])
    /// with `VM_MEM_MIB`, `VM_CTL` and `VM_VSOCK` set for this guest.
    pub fn host_prelude(&self, vmm: Vmm) -> String {
        let specific = match vmm {
            Vmm::Kiln => KILN_HOST_FUNCTIONS,
            Vmm::Qemu => QEMU_HOST_FUNCTIONS,
        };
        format!(
            "VM_MEM_MIB={}\nVM_CTL=\"{}\"\nVM_VSOCK=\"{}\"\nVMM={}\n{HOST_PRELUDE}\n{specific}\n",
            self.memory_mib,
            self.control.as_deref().unwrap_or(""),
            self.vsock_uds.as_deref().unwrap_or(""),
            vmm.name()
        )
    }

    /// Shell: starts the guest in the background with its stdin on fd 3
    /// (`say WORD` writes a line there), console output in `PREFIX.out`,
    /// VMM stderr in `PREFIX.err` (`$VM_OUT`, `$VM_ERR`), its PID in `$vm`.
    pub fn start(&self, vmm: Vmm, prefix: &str) -> String {
        format!(
            "VM_OUT={prefix}.out VM_ERR={prefix}.err\nrm -f {prefix}.in; mkfifo {prefix}.in\n{} < {prefix}.in > {prefix}.out 2> {prefix}.err &\nvm=$!\nexec 3> {prefix}.in\n",
            self.command(vmm)
        )
    }
}

/// Host-side shell functions, the same for both VMMs (busybox `sh`).
pub const HOST_PRELUDE: &str = r#"
# wait_for PATTERN FILE [SECONDS]: until grep finds PATTERN in FILE; fails
# at once when the VMM ($vm, if set) has exited.
wait_for() {
  _n=$(( ${3:-120} * 5 ))
  while ! grep -q -- "$1" "$2" 2>/dev/null; do
    _n=$((_n-1)); [ $_n -le 0 ] && { echo "HOST_TIMEOUT_WAITING_FOR=$1"; return 1; }
    [ -n "$vm" ] && ! kill -0 "$vm" 2>/dev/null && ! grep -q -- "$1" "$2" 2>/dev/null && { echo "HOST_VM_GONE_WAITING_FOR=$1"; return 1; }
    sleep 0.2
  done
}
# bail REASON: stop the VMM, show its console and stderr, fail the script.
bail() { echo "HOST_BAIL=$1"; kill -9 "$vm" 2>/dev/null; cat "$VM_OUT"; sed 's/^/VMM_ERR: /' "$VM_ERR"; exit 1; }
# A VMM that died must not kill the script through SIGPIPE on its stdin.
trap '' PIPE
# say WORD: a line to the guest's console (its kit script reads it with wait_host).
say() { echo "$1" >&3; }
# vm_wait PID [SECONDS]: its exit status, or 137 after killing it when it overstays.
vm_wait() { ( sleep "${2:-120}"; kill -9 "$1" ) 2>/dev/null & _w=$!; wait "$1"; _rc=$?; kill $_w 2>/dev/null; return $_rc; }
rss_kib() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
# tap_up NAME: once the VMM has created the tap, the host's side of $NET.0/24 (default 10.0.2.0/24).
tap_up() { _n=300; while ! ip link show "$1" >/dev/null 2>&1; do _n=$((_n-1)); [ $_n -le 0 ] && { echo "HOST_NO_TAP=$1"; return 1; }; [ -n "$vm" ] && ! kill -0 "$vm" 2>/dev/null && { echo "HOST_VM_GONE_NO_TAP=$1"; return 1; }; sleep 0.2; done; ip addr add "${NET:-10.0.2}.1/24" dev "$1" && ip link set "$1" up; }
"#;

/// Kiln: the control protocol through `kiln vmm-ctl`, vsock over its Unix socket.
const KILN_HOST_FUNCTIONS: &str = r#"
# vm_ctl KIND [key=value...]: one control request, its JSON result (or `kiln: error: ...`) on stdout.
vm_ctl() { "$KILN" vmm-ctl --socket "$VM_CTL" "$@" 2>&1; }
# vsock_connect PORT: stdin to the guest's vsock PORT, its answer on stdout (handshake checked and stripped).
vsock_connect() { { printf 'CONNECT %s\n' "$1"; cat; } | socat -t 20 -T 60 - "UNIX-CONNECT:$VM_VSOCK" | { read -r _ok; case "$_ok" in "OK "*) cat ;; *) echo "VSOCK_BAD_HANDSHAKE=$_ok"; cat ;; esac; }; }
# vsock_listen_addr PORT: the socat address where guest connections to CID 2 PORT arrive.
vsock_listen_addr() { echo "UNIX-LISTEN:${VM_VSOCK}_$1,fork,backlog=256"; }
# vsock_echo_many PORT N: N concurrent echo checks against guest PORT ($VSOCK_ECHO is kiln-vsock-echo).
vsock_echo_many() { "$VSOCK_ECHO" --uds "$VM_VSOCK" "$1" "$2"; }
"#;

/// QEMU: QMP stands in for the control socket (answers shaped like Kiln's
/// for the fields the tests read), vhost-vsock for the Unix socket.
const QEMU_HOST_FUNCTIONS: &str = r#"
qmp() { printf '{"execute":"qmp_capabilities"}\n%s\n' "$1" | socat -t 2 - "UNIX-CONNECT:$VM_CTL"; }
vm_ctl() {
  case "$1" in
    set_balloon_target) _mib=${2#mib=}; qmp "{\"execute\":\"balloon\",\"arguments\":{\"value\":$(( (VM_MEM_MIB - _mib) * 1048576 ))}}" | grep -c '"return": {}' | grep -qx 2 && echo "{\"target_mib\":$_mib}" ;;
    balloon_stats) printf '{"stats":{%s}}\n' "$(qmp '{"execute":"qom-get","arguments":{"path":"/machine/peripheral/balloon0","property":"guest-stats"}}' \
        | tr '{},' '\n\n\n' | sed -n 's/^ *"stat-\([a-z-]*\)": \([0-9]*\)$/"\1":\2/p' | sed 's/-/_/g' | tr '\n' ',' | sed 's/,$//')" ;;
    status) qmp '{"execute":"query-status"}' | grep -o '"status": "[a-z-]*"' ;;
  esac
}
vsock_connect() { socat -t 20 -T 60 - "VSOCK-CONNECT:3:$1"; }
vsock_listen_addr() { echo "VSOCK-LISTEN:$1,fork,backlog=256"; }
vsock_echo_many() { "$VSOCK_ECHO" 3 "$1" "$2"; }
"#;
