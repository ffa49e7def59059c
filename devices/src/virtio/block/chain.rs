//! A request's descriptor chain, flattened into the device-readable and
//! device-writable byte ranges it describes, and those ranges turned into
//! iovecs over guest memory.
//!
//! Nothing here trusts the chain: lengths are summed in u64, the number
//! of descriptors kept is capped, and every range is checked against
//! guest memory before it is touched.

use std::ops::Deref;

use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, GuestMemoryMmap};

/// One descriptor's buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    pub addr: GuestAddress,
    pub len: u32,
}

/// Buffers in chain order.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Segments(pub Vec<Segment>);

impl Segments {
    pub fn total_len(&self) -> u64 {
        self.0.iter().map(|s| u64::from(s.len)).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.total_len() == 0
    }

    /// Splits off the first `n` bytes; `None` if there are fewer.
    pub fn split_front(&self, n: u64) -> Option<(Segments, Segments)> {
        if self.total_len() < n {
            return None;
        }
        let (mut front, mut rest) = (Vec::new(), Vec::new());
        let mut left = n;
        for seg in &self.0 {
            let len = u64::from(seg.len);
            if left >= len {
                front.push(*seg);
                left -= len;
            } else if left > 0 {
                let taken = left as u32; // left < seg.len, so it fits
                front.push(Segment {
                    addr: seg.addr,
                    len: taken,
                });
                let addr = seg.addr.checked_add(u64::from(taken))?;
                rest.push(Segment {
                    addr,
                    len: seg.len - taken,
                });
                left = 0;
            } else {
                rest.push(*seg);
            }
        }
        Some((Segments(front), Segments(rest)))
    }

    /// Reads exactly `buf.len()` bytes from the start of the buffers.
    pub fn read_exact(&self, mem: &GuestMemoryMmap, buf: &mut [u8]) -> Result<(), GuestRangeError> {
        let mut done = 0;
        for seg in &self.0 {
            if done == buf.len() {
                break;
            }
            let n = (buf.len() - done).min(seg.len as usize);
            mem.read_slice(&mut buf[done..done + n], seg.addr)
                .map_err(|_| GuestRangeError(seg.addr))?;
            done += n;
        }
        if done == buf.len() {
            Ok(())
        } else {
            Err(GuestRangeError(GuestAddress(0)))
        }
    }

    /// Writes `data` at the start of the buffers (as much as fits).
    /// Returns the bytes written.
    pub fn write_prefix(
        &self,
        mem: &GuestMemoryMmap,
        data: &[u8],
    ) -> Result<usize, GuestRangeError> {
        let mut done = 0;
        for seg in &self.0 {
            if done == data.len() {
                break;
            }
            let n = (data.len() - done).min(seg.len as usize);
            mem.write_slice(&data[done..done + n], seg.addr)
                .map_err(|_| GuestRangeError(seg.addr))?;
            done += n;
        }
        Ok(done)
    }

    /// Iovecs covering the buffers, for I/O from (`guest_writes == false`)
    /// or into guest memory. Fails if any byte is outside guest memory.
    /// Pages the device will write are marked dirty.
    pub fn iovecs(
        &self,
        mem: &GuestMemoryMmap,
        guest_writes: bool,
    ) -> Result<Vec<libc::iovec>, GuestRangeError> {
        let mut iovecs = Vec::with_capacity(self.0.len());
        for seg in &self.0 {
            for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len as usize) {
                let slice = slice.map_err(|_| GuestRangeError(seg.addr))?;
                let ptr = if guest_writes {
                    slice.bitmap().mark_dirty(0, slice.len());
                    slice.ptr_guard_mut().as_ptr()
                } else {
                    slice.ptr_guard().as_ptr() as *mut u8
                };
                iovecs.push(libc::iovec {
                    iov_base: ptr as *mut libc::c_void,
                    iov_len: slice.len(),
                });
            }
        }
        Ok(iovecs)
    }
}

/// A buffer at this address is (partly) outside guest memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct GuestRangeError(pub GuestAddress);

/// Why a chain's layout cannot be trusted at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ChainFault {
    /// The chain ended while a descriptor still pointed to a next one:
    /// a loop, a `next` outside the table, or a bad indirect table
    /// (virtio-queue stops iterating on all of these).
    Broken,
    /// The last descriptor is device-readable, so there is no status byte.
    NoStatus,
}

/// Problems with a chain that still has a usable status byte.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ChainFlaws {
    /// More descriptors than the device accepts (`seg_max` + 2).
    pub too_many_descriptors: bool,
    /// A device-readable descriptor follows a device-writable one.
    pub readable_after_writable: bool,
}

/// A chain split into its parts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Layout {
    /// Device-readable bytes: the request header, then OUT data or
    /// discard segments.
    pub readable: Segments,
    /// Device-writable bytes before the status byte: IN data, GET_ID.
    pub writable: Segments,
    /// The status byte: the last byte of the last descriptor.
    pub status: GuestAddress,
    pub flaws: ChainFlaws,
}

/// Walks `chain`, keeping at most `max_descriptors` buffers (the walk
/// itself is bounded by virtio-queue's TTL). The status byte is the last
/// byte of the last descriptor, which must be device-writable.
pub(crate) fn walk<M>(
    chain: virtio_queue::DescriptorChain<M>,
    max_descriptors: usize,
) -> Result<Layout, ChainFault>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut readable = Vec::new();
    let mut writable = Vec::new();
    let mut flaws = ChainFlaws::default();
    let mut kept = 0usize;
    let mut last = None;
    for desc in chain {
        last = Some(desc);
        kept += 1;
        if kept > max_descriptors {
            flaws.too_many_descriptors = true;
            continue;
        }
        let seg = Segment {
            addr: desc.addr(),
            len: desc.len(),
        };
        if desc.is_write_only() {
            writable.push(seg);
        } else {
            if !writable.is_empty() {
                flaws.readable_after_writable = true;
            }
            readable.push(seg);
        }
    }
    let last = last.ok_or(ChainFault::Broken)?;
    if last.has_next() {
        return Err(ChainFault::Broken);
    }
    if !last.is_write_only() || last.len() == 0 {
        return Err(ChainFault::NoStatus);
    }
    let status = last
        .addr()
        .checked_add(u64::from(last.len()) - 1)
        .ok_or(ChainFault::NoStatus)?;
    if !flaws.too_many_descriptors {
        // The last writable buffer is `last`: drop its status byte.
        if let Some(tail) = writable.last_mut() {
            tail.len -= 1;
            if tail.len == 0 {
                writable.pop();
            }
        }
    }
    Ok(Layout {
        readable: Segments(readable),
        writable: Segments(writable),
        status,
        flaws,
    })
}

/// Writes the status byte; `false` if it is outside guest memory.
pub(crate) fn write_status(mem: &GuestMemoryMmap, at: GuestAddress, status: u8) -> bool {
    mem.write_obj(status, at).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn segs(v: &[(u64, u32)]) -> Segments {
        Segments(
            v.iter()
                .map(|&(a, l)| Segment {
                    addr: GuestAddress(a),
                    len: l,
                })
                .collect(),
        )
    }

    #[test]
    fn split_front_splits_inside_and_between_segments() {
        let s = segs(&[(0x100, 10), (0x200, 20)]);
        let (a, b) = s.split_front(16).unwrap();
        assert_eq!(a, segs(&[(0x100, 10), (0x200, 6)]));
        assert_eq!(b, segs(&[(0x206, 14)]));
        let (a, b) = s.split_front(10).unwrap();
        assert_eq!((a, b), (segs(&[(0x100, 10)]), segs(&[(0x200, 20)])));
        assert!(s.split_front(31).is_none());
        // An address at the very top must not wrap.
        assert!(segs(&[(u64::MAX - 1, 4)]).split_front(2).is_none());
    }
}
