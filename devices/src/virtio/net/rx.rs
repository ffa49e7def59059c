//! Receive: one frame from the tap (header first) into the guest's receive
//! buffers.
//!
//! With `MRG_RXBUF` a frame may span several descriptor chains ("buffers");
//! the header's `num_buffers` tells the driver how many. Without it, one
//! chain must hold the whole frame. Chains are reserved (popped but not yet
//! returned) until together they can hold the frame; when the guest has not
//! offered enough yet, the frame and the reservation wait for more.

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use super::{feature, Diag, Problem, MAX_PACKET_LEN, NUM_BUFFERS_OFFSET, VNET_HDR_LEN};

/// What the driver negotiated that changes how frames are delivered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RxMode {
    pub mergeable: bool,
    /// Without GUEST_CSUM the header flags must be zero.
    pub guest_csum: bool,
}

impl RxMode {
    pub(crate) fn from_features(acked: u64) -> RxMode {
        RxMode {
            mergeable: acked & feature::MRG_RXBUF != 0,
            guest_csum: acked & feature::GUEST_CSUM != 0,
        }
    }
}

/// A receive chain checked to be writable and inside guest memory.
#[derive(Debug)]
struct RxBuffer {
    head: u16,
    /// Writable pieces, in order; only as many as a packet can fill.
    pieces: Vec<(GuestAddress, usize)>,
    capacity: usize,
    /// Descriptors in the chain (bounds how many the guest can still give).
    descriptors: usize,
}

#[derive(Debug, PartialEq, Eq)]
pub(crate) enum RxOutcome {
    /// The frame is in the guest, over this many buffers.
    Delivered { buffers: u16 },
    /// The guest has not offered enough buffers yet; retry later with the
    /// same packet.
    NoBuffers,
    /// The frame cannot be delivered and is gone.
    Dropped,
}

/// Receive-side state kept between frames.
#[derive(Debug, Default)]
pub(crate) struct RxState {
    reserved: Vec<RxBuffer>,
    /// Used-ring entries added since the last [`RxState::take_returned`].
    returned: usize,
}

impl RxState {
    /// How many used entries were added since the last call.
    pub(crate) fn take_returned(&mut self) -> usize {
        std::mem::take(&mut self.returned)
    }

    /// Puts `packet` (12-byte header, then the frame) into guest buffers.
    /// Malformed chains met on the way are returned empty. An `Err` means
    /// the queue itself is broken (rings outside guest memory).
    pub(crate) fn deliver(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        packet: &mut [u8],
        mode: RxMode,
        diag: &Diag,
    ) -> Result<RxOutcome, virtio_queue::Error> {
        if packet.len() < VNET_HDR_LEN {
            diag.report(
                Problem::RxShortFrame,
                format_args!("{} bytes", packet.len()),
            );
            return Ok(RxOutcome::Dropped);
        }
        let need = packet.len();
        // Reserve buffers until they can hold the packet.
        loop {
            let have: usize = self.reserved.iter().map(|b| b.capacity).sum();
            let enough = if mode.mergeable {
                have >= need
            } else {
                !self.reserved.is_empty()
            };
            if enough {
                break;
            }
            let Some(chain) = queue.iter(mem)?.next() else {
                let descriptors: usize = self.reserved.iter().map(|b| b.descriptors).sum();
                let size = usize::from(queue.size());
                if mode.mergeable && (self.reserved.len() >= size || descriptors >= size) {
                    // Every descriptor is already ours: no more can come.
                    diag.report(
                        Problem::RxRingTooSmall,
                        format_args!("{have} bytes for a {need}-byte packet"),
                    );
                    return Ok(RxOutcome::Dropped);
                }
                return Ok(RxOutcome::NoBuffers);
            };
            let head = chain.head_index();
            match check_buffer(mem, chain) {
                Ok(buffer) => self.reserved.push(buffer),
                Err(problem) => {
                    diag.report(problem, format_args!("chain {head}"));
                    self.give_back(queue, mem, head, 0, diag)?;
                }
            }
        }

        if !mode.mergeable {
            let fits = self.reserved.first().is_some_and(|b| b.capacity >= need);
            if !fits {
                let buffer = self.reserved.remove(0);
                diag.report(
                    Problem::RxBufferTooSmall,
                    format_args!("{} bytes for a {need}-byte packet", buffer.capacity),
                );
                self.give_back(queue, mem, buffer.head, 0, diag)?;
                return Ok(RxOutcome::Dropped);
            }
        }

        // The first `count` reserved buffers hold the packet.
        let mut count = 0usize;
        let mut covered = 0usize;
        while covered < need {
            // Cannot run past the end: the loop above reserved enough.
            let Some(b) = self.reserved.get(count) else {
                break;
            };
            covered += b.capacity;
            count += 1;
        }
        let buffers = u16::try_from(count).unwrap_or(u16::MAX);
        if !mode.guest_csum {
            packet[0] = 0;
        }
        packet[NUM_BUFFERS_OFFSET..VNET_HDR_LEN].copy_from_slice(&buffers.to_le_bytes());

        let mut rest: &[u8] = packet;
        let used: Vec<RxBuffer> = self.reserved.drain(..count).collect();
        for buffer in used {
            let mut written = 0usize;
            for &(addr, len) in &buffer.pieces {
                if rest.is_empty() {
                    break;
                }
                let n = len.min(rest.len());
                // Checked in check_buffer; a failure here would be a
                // guest memory layout change, so deliver what fits.
                if mem.write_slice(&rest[..n], addr).is_err() {
                    diag.report(Problem::RxBadAddress, format_args!("chain {}", buffer.head));
                    break;
                }
                rest = &rest[n..];
                written += n;
            }
            self.give_back(queue, mem, buffer.head, written as u32, diag)?;
        }
        diag.rx_delivered(need - VNET_HDR_LEN);
        Ok(RxOutcome::Delivered { buffers })
    }

    fn give_back(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemoryMmap,
        head: u16,
        len: u32,
        diag: &Diag,
    ) -> Result<(), virtio_queue::Error> {
        if head >= queue.size() {
            diag.report(Problem::BadHeadIndex, format_args!("receive head {head}"));
            return Ok(());
        }
        queue.add_used(mem, head, len)?;
        self.returned += 1;
        Ok(())
    }
}

/// Checks a receive chain: only device-writable descriptors, inside guest
/// memory, ending properly, at least a header long.
fn check_buffer(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<RxBuffer, Problem> {
    let head = chain.head_index();
    let mut pieces = Vec::new();
    let mut capacity = 0usize;
    let mut descriptors = 0usize;
    let mut cut_short = true;
    for desc in chain {
        cut_short = desc.has_next();
        descriptors += 1;
        if !desc.is_write_only() {
            return Err(Problem::RxReadableDescriptor);
        }
        let len = desc.len() as usize;
        if len == 0 || capacity >= MAX_PACKET_LEN {
            // Nothing a packet could reach; still checked for readability.
            continue;
        }
        if !GuestMemoryBackend::check_range(mem, desc.addr(), len) {
            return Err(Problem::RxBadAddress);
        }
        pieces.push((desc.addr(), len));
        capacity += len;
    }
    if cut_short {
        return Err(Problem::RxBrokenChain);
    }
    if capacity < VNET_HDR_LEN {
        return Err(Problem::RxBufferTooSmall);
    }
    Ok(RxBuffer {
        head,
        pieces,
        capacity,
        descriptors,
    })
}
