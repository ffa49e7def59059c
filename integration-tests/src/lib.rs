//! The end-to-end test rig.
//!
//! A test describes a [`Scenario`]: a POSIX shell script plus what it needs.
//! The rig runs it where real guests can boot:
//! - on **hardware KVM** directly on this host;
//! - otherwise inside a **nested KVM host**: QEMU in TCG mode emulating an
//!   AMD CPU with SVM and nested paging, running Debian's kernel with
//!   `kvm_amd`, with Kiln, the default guest and the script in its
//!   initramfs, under a tmpfs root at boot (see DESIGN.md, "The host's
//!   KVM, and the nested rig").
//!
//! Either way the script sees the same environment (README.md here), and
//! the test gets an [`Outcome`]: from [`run`], or from [`start`] and
//! [`Running::finish`] when it talks to the script's services meanwhile
//! (`Scenario::forward_ports`). Logs of every run stay under
//! `target/nested-logs/<scenario>/`.

pub mod checks;
pub mod guest_kit;
pub mod host;
pub mod initrd;
pub mod nested;
pub mod peer;
pub mod policy_files;
pub mod ports;
pub mod qemu_release;
pub mod running;
pub mod scenario;
pub mod virtio_vm;

pub use checks::{CheckResults, Checks};
pub use guest_kit::GuestKit;
pub use host::HostKvm;
pub use peer::PeerQemu;
pub use running::Running;
pub use scenario::{run, start, Mode, NestedCpu, Outcome, RigError, Scenario};
pub use virtio_vm::{Disk, VmSpec, Vmm};
