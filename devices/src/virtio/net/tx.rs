//! Transmit: a guest chain (virtio-net header, then the frame) becomes one
//! `writev` on the tap, straight from guest memory.

use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap};

use super::tap::Tap;
use super::{Problem, MAX_PACKET_LEN, VNET_HDR_LEN};

/// The kernel's limit on iovecs per writev.
const MAX_IOVECS: usize = 1024;

/// Collects the chain's readable buffers as iovecs into `iov` and returns
/// the packet length (header included). Rejects chains a driver must not
/// send: writable descriptors, loops, buffers outside memory, packets
/// shorter than the header or larger than [`MAX_PACKET_LEN`].
pub(crate) fn gather(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    iov: &mut Vec<libc::iovec>,
) -> Result<usize, Problem> {
    iov.clear();
    let mut total = 0usize;
    let mut cut_short = true; // stays true for an empty chain
    for desc in chain {
        cut_short = desc.has_next();
        if desc.is_write_only() {
            return Err(Problem::TxWritableDescriptor);
        }
        let len = desc.len() as usize;
        total = total
            .checked_add(len)
            .filter(|t| *t <= MAX_PACKET_LEN)
            .ok_or(Problem::TxTooLong)?;
        if len == 0 {
            continue;
        }
        for slice in GuestMemoryBackend::get_slices(mem, desc.addr(), len) {
            let slice = slice.map_err(|_| Problem::TxBadAddress)?;
            if iov.len() == MAX_IOVECS {
                return Err(Problem::TxTooFragmented);
            }
            // The pointer stays valid while `mem` (mapped guest RAM) lives.
            iov.push(libc::iovec {
                iov_base: slice.ptr_guard().as_ptr() as *mut libc::c_void,
                iov_len: slice.len(),
            });
        }
    }
    // The chain iterator stops early, with the last descriptor still
    // pointing on, on a loop, a next index past the table or a bad
    // indirect table.
    if cut_short {
        return Err(Problem::TxBrokenChain);
    }
    if total < VNET_HDR_LEN {
        return Err(Problem::TxTooShort);
    }
    Ok(total)
}

/// Sends the packet gathered in `iov` to the tap.
pub(crate) fn send(
    tap: &Tap,
    mem: &GuestMemoryMmap,
    iov: &[libc::iovec],
) -> std::io::Result<usize> {
    // The iovecs point into `mem`, which the caller keeps alive.
    let _ = mem;
    // SAFETY: every iovec was built by `gather` from a guest memory slice
    // of exactly that length, and guest memory stays mapped meanwhile.
    unsafe { tap.write_frame(iov) }
}
