//! Log-once bookkeeping: each kind of guest mistake (or host failure) is
//! logged the first time it happens on a device, so a misbehaving guest
//! cannot flood the host's logs.

use std::sync::atomic::{AtomicU32, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Problem {
    BrokenChain,
    NoStatus,
    ShortHeader,
    WrongDirection,
    TooManyDescriptors,
    BadAddress,
    Misaligned,
    OutOfRange,
    TooLarge,
    ReadOnly,
    BadSegments,
    BadFlags,
    UnknownType,
    HostIo,
    BrokenQueue,
}

impl Problem {
    fn describe(self) -> &'static str {
        match self {
            Problem::BrokenChain => "broken descriptor chain (loop, bad next index or bad indirect table); returned unused",
            Problem::NoStatus => "request without a writable status byte; returned unused",
            Problem::ShortHeader => "request shorter than its 16-byte header",
            Problem::WrongDirection => "request buffers in the wrong direction for its type",
            Problem::TooManyDescriptors => "request with more descriptors than seg_max allows",
            Problem::BadAddress => "request buffer outside guest memory",
            Problem::Misaligned => "read/write length not a multiple of 512",
            Problem::OutOfRange => "request beyond the end of the disk",
            Problem::TooLarge => "request larger than the device's limit",
            Problem::ReadOnly => "write to a read-only disk",
            Problem::BadSegments => "discard/write-zeroes without exactly one segment",
            Problem::BadFlags => "discard/write-zeroes with unsupported flags",
            Problem::UnknownType => "unsupported request type",
            Problem::HostIo => "I/O error on the disk image",
            Problem::BrokenQueue => "queue unusable (rings outside guest memory); device needs reset",
        }
    }
}

/// Which problems a device has logged already.
#[derive(Debug)]
pub(crate) struct Warnings {
    name: String,
    seen: AtomicU32,
}

impl Warnings {
    pub fn new(name: &str) -> Self {
        Warnings {
            name: name.to_string(),
            seen: AtomicU32::new(0),
        }
    }

    /// Logs `problem` unless it was logged before; `detail` may be empty.
    pub fn warn(&self, problem: Problem, detail: &str) {
        let bit = 1u32 << (problem as u32);
        if self.seen.fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            return;
        }
        if detail.is_empty() {
            tracing::warn!(
                "{}: {} (further ones not logged)",
                self.name,
                problem.describe()
            );
        } else {
            tracing::warn!(
                "{}: {}: {detail} (further ones not logged)",
                self.name,
                problem.describe()
            );
        }
    }

    #[cfg(test)]
    pub fn seen(&self, problem: Problem) -> bool {
        self.seen.load(Ordering::Relaxed) & (1u32 << (problem as u32)) != 0
    }
}
