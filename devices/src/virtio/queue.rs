//! Serving a queue the way most devices do: every available chain in
//! turn, with guest notifications off while draining and one interrupt at
//! the end.

use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;

use super::{Interrupt, QueueContext};

/// What serving one chain produced.
pub(crate) enum Served {
    /// Return it with this used length.
    Used(u32),
    /// Keep it for later.
    Keep,
    /// Keep it, and return this older kept chain (used length 0).
    KeepReleasing(u16),
}

/// Serves every available chain of `qc` with `serve`, re-enabling
/// notifications (unless polling) and signalling the driver once at the
/// end. Returns whether any chain was served; an error means the queue is
/// broken.
pub(crate) fn drain_queue(
    qc: &mut QueueContext,
    mem: &GuestMemoryMmap,
    polling: bool,
    interrupt: &dyn Interrupt,
    mut serve: impl FnMut(DescriptorChain<&GuestMemoryMmap>) -> Served,
) -> Result<bool, virtio_queue::Error> {
    let mut served = false;
    let mut used = false;
    loop {
        if !polling {
            qc.queue.disable_notification(mem)?;
        }
        while let Some(chain) = qc.queue.iter(mem)?.next() {
            let head = chain.head_index();
            served = true;
            let (head, len) = match serve(chain) {
                Served::Used(len) => (head, len),
                Served::KeepReleasing(old) => (old, 0),
                Served::Keep => continue,
            };
            qc.queue.add_used(mem, head, len)?;
            used = true;
        }
        if polling || !qc.queue.enable_notification(mem)? {
            break;
        }
    }
    if used && qc.queue.needs_notification(mem)? {
        interrupt.signal_queue(qc.index);
    }
    Ok(served)
}
