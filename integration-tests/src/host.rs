//! What KVM this host offers.

use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HostKvm {
    /// VT-x or AMD-V: guests run directly.
    Hardware,
    /// A software-emulating KVM such as `kvm_pvm`: stock kernels can't boot.
    Emulating,
    /// No usable /dev/kvm.
    None,
}

impl HostKvm {
    pub fn detect() -> HostKvm {
        if std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_err()
        {
            return HostKvm::None;
        }
        if Path::new("/sys/module/kvm_pvm").exists() {
            return HostKvm::Emulating;
        }
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let flags = cpuinfo
            .lines()
            .find(|l| l.starts_with("flags"))
            .unwrap_or("");
        let hw = flags.split_whitespace().any(|f| f == "vmx" || f == "svm");
        if hw
            && (Path::new("/sys/module/kvm_intel").exists()
                || Path::new("/sys/module/kvm_amd").exists())
        {
            HostKvm::Hardware
        } else {
            HostKvm::Emulating
        }
    }

    pub fn describe(self) -> &'static str {
        match self {
            HostKvm::Hardware => "hardware KVM: guests run directly on this host",
            HostKvm::Emulating => {
                "emulating KVM (no VT-x/AMD-V): guests run inside the nested KVM host"
            }
            HostKvm::None => "no KVM: guests run inside the nested KVM host",
        }
    }
}
