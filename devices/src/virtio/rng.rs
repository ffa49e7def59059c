//! virtio-rng (virtio 1.2, section 5.4): entropy for the guest.
//!
//! One queue of device-writable buffers; each is filled with bytes from the
//! host kernel (`getrandom(2)`, the same pool as `/dev/urandom`, never
//! blocking once the host booted). A request gets at most
//! [`MAX_REQUEST_BYTES`]; the driver asks again if it wants more (Linux
//! asks for 16 to 64 bytes at a time). A chain with a device-readable
//! descriptor is malformed: it is returned with nothing written.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::str::FromStr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;

use super::options::{from_options, OptionsError};
use super::queue::{drain_queue, Served};
use super::worker::{Placement, Worker, WorkerControl, WorkerHandler};
use super::{
    device_type, features, ActivateError, DeviceContext, Interrupt, Memory, QueueContext,
    VirtioDevice,
};

/// Bytes written per request at most.
pub const MAX_REQUEST_BYTES: usize = 64 * 1024;
const QUEUE_SIZE: u16 = 256;
/// Random bytes are fetched from the kernel this many at a time.
const CHUNK: usize = 4096;

#[derive(Debug, thiserror::Error)]
pub enum RngError {
    #[error("cannot set up virtio-rng: {0}")]
    Io(#[from] io::Error),
}

/// virtio-rng has nothing to configure: `kiln run --rng` or `--rng on`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RngConfig {}

impl FromStr for RngConfig {
    type Err = OptionsError;

    /// virtio-rng takes no options: only the empty string parses.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_options(s)
    }
}

pub struct VirtioRng {
    worker_control: WorkerControl,
    worker: Option<Worker>,
}

impl VirtioRng {
    pub fn new(_config: RngConfig) -> Result<Self, RngError> {
        Ok(VirtioRng {
            worker_control: WorkerControl::new(Placement::default())?,
            worker: None,
        })
    }

    pub fn worker_control(&self) -> WorkerControl {
        self.worker_control.clone()
    }

    fn stop(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
        }
    }
}

impl VirtioDevice for VirtioRng {
    fn device_type(&self) -> u32 {
        device_type::RNG
    }

    fn name(&self) -> &str {
        "rng0"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    /// virtio-rng has no configuration space.
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn activate(&mut self, mut ctx: DeviceContext) -> Result<(), ActivateError> {
        self.stop();
        let queue = ctx.take_queue(0).ok_or(ActivateError::MissingQueue(0))?;
        let handler = RngWorker::new(ctx.mem, ctx.interrupt, queue);
        self.worker = Some(
            Worker::spawn(self.name(), handler, self.worker_control.clone())
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    fn reset(&mut self) {
        self.stop();
    }
}

impl Drop for VirtioRng {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Fills `buf` from the kernel's random pool.
fn getrandom(buf: &mut [u8]) -> io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        let rest = &mut buf[filled..];
        // SAFETY: `rest` is valid for writes of `rest.len()` bytes.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        filled += n as usize;
    }
    Ok(())
}

#[derive(Default)]
struct Warned {
    readable: bool,
    bad_chain: bool,
    entropy: bool,
    broken: bool,
}

fn warn_once(flag: &mut bool, f: impl FnOnce()) {
    if !*flag {
        *flag = true;
        f();
    }
}

/// Serves one request: random bytes into every writable descriptor, up to
/// [`MAX_REQUEST_BYTES`]. Returns the used length.
fn fill_request(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &mut [u8],
    warned: &mut Warned,
) -> u32 {
    if chain.clone().any(|d| !d.is_write_only()) {
        warn_once(&mut warned.readable, || {
            tracing::warn!("rng0: request with a device-readable buffer, returned empty")
        });
        return 0;
    }
    let mut writer = match chain.writer(mem) {
        Ok(w) => w,
        Err(e) => {
            warn_once(&mut warned.bad_chain, || {
                tracing::warn!("rng0: bad request buffer ({e}), returned empty")
            });
            return 0;
        }
    };
    let mut left = writer.available_bytes().min(MAX_REQUEST_BYTES);
    while left > 0 {
        let n = left.min(buf.len());
        if let Err(e) = getrandom(&mut buf[..n]) {
            warn_once(&mut warned.entropy, || {
                tracing::warn!("rng0: getrandom failed: {e}")
            });
            break;
        }
        if writer.write_all(&buf[..n]).is_err() {
            break;
        }
        left -= n;
    }
    // At most MAX_REQUEST_BYTES, so it fits.
    writer.bytes_written() as u32
}

struct RngWorker {
    mem: Memory,
    interrupt: Arc<dyn Interrupt>,
    queue: QueueContext,
    buf: Vec<u8>,
    polling: bool,
    broken: bool,
    warned: Warned,
}

impl RngWorker {
    fn new(mem: Memory, interrupt: Arc<dyn Interrupt>, queue: QueueContext) -> Self {
        RngWorker {
            mem,
            interrupt,
            queue,
            buf: vec![0; CHUNK],
            polling: false,
            broken: false,
            warned: Warned::default(),
        }
    }

    fn serve(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let mem: &GuestMemoryMmap = &self.mem;
        let (buf, warned) = (&mut self.buf, &mut self.warned);
        let result = drain_queue(
            &mut self.queue,
            mem,
            self.polling,
            &*self.interrupt,
            |chain| Served::Used(fill_request(chain, mem, buf, warned)),
        );
        result.unwrap_or_else(|e| {
            self.broken = true;
            warn_once(&mut self.warned.broken, || {
                tracing::warn!("rng0: broken queue, device needs reset: {e}")
            });
            self.interrupt.set_needs_reset();
            false
        })
    }
}

impl WorkerHandler for RngWorker {
    fn event_sources(&self) -> Vec<(RawFd, EventSet, u64)> {
        vec![(self.queue.kick.as_raw_fd(), EventSet::IN, 0)]
    }

    fn handle_event(&mut self, _token: u64, _events: EventSet) {
        let _ = self.queue.kick.read();
        self.serve();
    }

    fn poll(&mut self) -> bool {
        self.serve()
    }

    fn set_polling(&mut self, on: bool) -> bool {
        self.polling = on;
        if on {
            let _ = self.queue.queue.disable_notification(&*self.mem);
            false
        } else {
            self.queue
                .queue
                .enable_notification(&*self.mem)
                .unwrap_or(false)
        }
    }
}

/// Entry point for `cargo fuzz`: never panics, whatever the bytes.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use crate::virtio::balloon::fuzzing::{queue_from_bytes, NoInterrupt};
    use vmm_sys_util::eventfd::EventFd;

    /// `data` laid out as a queue of requests (see
    /// [`queue_from_bytes`]), served like the device does.
    pub fn request(data: &[u8]) {
        let Some((mem, queue)) = queue_from_bytes(data) else {
            return;
        };
        let Ok(kick) = EventFd::new(libc::EFD_NONBLOCK) else {
            return;
        };
        let mut worker = RngWorker::new(
            Arc::new(mem),
            Arc::new(NoInterrupt),
            QueueContext {
                index: 0,
                queue,
                kick,
            },
        );
        worker.serve();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::test_support::{desc, wait_until, CountingInterrupt, NEXT, W};
    use std::sync::atomic::Ordering;
    use std::time::Duration;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    struct Rig {
        mem: Memory,
        dev: VirtioRng,
        irq: Arc<CountingInterrupt>,
        kick: EventFd,
        avail: GuestAddress,
        used: GuestAddress,
    }

    impl Rig {
        fn new() -> Rig {
            let mem: Memory =
                Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
            let mock = MockSplitQueue::new(&*mem, 16);
            let (avail, used) = (mock.avail_addr(), mock.used_addr());
            let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
            let irq = Arc::new(CountingInterrupt::default());
            let ctx = DeviceContext {
                mem: mem.clone(),
                queues: vec![QueueContext {
                    index: 0,
                    queue: mock.create_queue().unwrap(),
                    kick: kick.try_clone().unwrap(),
                }],
                acked_features: 0,
                interrupt: irq.clone(),
            };
            let mut dev = VirtioRng::new(RngConfig {}).unwrap();
            dev.activate(ctx).unwrap();
            Rig {
                mem,
                dev,
                irq,
                kick,
                avail,
                used,
            }
        }

        /// Writes raw descriptors at table index `at` (flags and next as
        /// given) and offers `heads`, then kicks.
        fn offer(&self, at: u16, descs: &[RawDescriptor], heads: &[u16]) {
            for (i, d) in descs.iter().enumerate() {
                self.mem
                    .write_obj(*d, GuestAddress(16 * u64::from(at + i as u16)))
                    .unwrap();
            }
            let idx: u16 = self.mem.read_obj(self.avail.unchecked_add(2)).unwrap();
            for (i, h) in heads.iter().enumerate() {
                let slot = u64::from(idx.wrapping_add(i as u16) % 16);
                self.mem
                    .write_obj(*h, self.avail.unchecked_add(4 + 2 * slot))
                    .unwrap();
            }
            self.mem
                .write_obj(
                    idx.wrapping_add(heads.len() as u16),
                    self.avail.unchecked_add(2),
                )
                .unwrap();
            self.kick.write(1).unwrap();
        }

        fn used_idx(&self) -> u16 {
            self.mem.read_obj(self.used.unchecked_add(2)).unwrap()
        }

        fn used_elem(&self, i: u64) -> (u32, u32) {
            let at = self.used.unchecked_add(4 + 8 * i);
            (
                self.mem.read_obj(at).unwrap(),
                self.mem.read_obj(at.unchecked_add(4)).unwrap(),
            )
        }

        fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    fn looks_random(bytes: &[u8]) -> bool {
        // 32 zero bytes in a row from getrandom: odds of 2^-256.
        !bytes.chunks(32).any(|c| c.iter().all(|b| *b == 0))
    }

    #[test]
    fn config_accepts_no_options() {
        assert_eq!("".parse::<RngConfig>().unwrap(), RngConfig {});
        // `--rng on` is the flag's spelling (kiln run), not a device option.
        assert!("on".parse::<RngConfig>().is_err());
        let e = "source=/dev/random".parse::<RngConfig>().unwrap_err();
        assert!(e.to_string().contains("known: none"), "{e}");
        let dev = VirtioRng::new(RngConfig {}).unwrap();
        assert_eq!(
            (dev.device_type(), dev.queue_max_sizes()),
            (device_type::RNG, vec![QUEUE_SIZE])
        );
        let mut cfg = [9u8; 8];
        dev.read_config(0, &mut cfg);
        assert_eq!(cfg, [0; 8]);
    }

    #[test]
    fn fills_every_writable_descriptor_of_a_chain() {
        let rig = Rig::new();
        rig.offer(
            0,
            &[desc(0x10000, 64, W | NEXT, 1), desc(0x20000, 100, W, 0)],
            &[0],
        );
        wait_until("the request", || rig.used_idx() == 1);
        assert_eq!(rig.used_elem(0), (0, 164));
        assert!(looks_random(&rig.bytes(0x10000, 64)));
        assert!(looks_random(&rig.bytes(0x20000, 96)));
        // Nothing past the buffers.
        assert_eq!(rig.bytes(0x10000 + 64, 64), vec![0; 64]);
        wait_until("the interrupt", || {
            rig.irq.queue[0].load(Ordering::SeqCst) == 1
        });
    }

    #[test]
    fn large_requests_are_capped() {
        let rig = Rig::new();
        rig.offer(0, &[desc(0x10_0000, 0x20_0000, W, 0)], &[0]);
        wait_until("the request", || rig.used_idx() == 1);
        assert_eq!(rig.used_elem(0), (0, MAX_REQUEST_BYTES as u32));
        assert!(looks_random(&rig.bytes(0x10_0000, MAX_REQUEST_BYTES)));
        assert_eq!(
            rig.bytes(0x10_0000 + MAX_REQUEST_BYTES as u64, 4096),
            vec![0; 4096]
        );
    }

    #[test]
    fn readable_or_bad_buffers_are_returned_empty_and_later_requests_served() {
        let rig = Rig::new();
        rig.offer(
            0,
            &[
                desc(0x10000, 16, NEXT, 1), // readable, then writable
                desc(0x11000, 16, W, 0),
                desc(0x80_0000, 16, W, 0), // outside guest memory
                desc(0x12000, 32, W, 0),   // fine
            ],
            &[0, 2, 3],
        );
        wait_until("three requests", || rig.used_idx() == 3);
        assert_eq!(rig.used_elem(0), (0, 0));
        assert_eq!(
            rig.bytes(0x11000, 16),
            vec![0; 16],
            "nothing written to a rejected chain"
        );
        assert_eq!(rig.used_elem(1), (2, 0));
        assert_eq!(rig.used_elem(2), (3, 32));
        assert_eq!(rig.irq.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn a_lying_avail_index_needs_reset() {
        let mut rig = Rig::new();
        rig.mem
            .write_obj(40u16, rig.avail.unchecked_add(2))
            .unwrap();
        rig.kick.write(1).unwrap();
        wait_until("needs reset", || {
            rig.irq.needs_reset.load(Ordering::SeqCst) == 1
        });
        rig.dev.reset();
        assert!(rig.dev.worker_control().thread_id().is_none());
    }

    #[test]
    fn poll_mode_serves_without_kicks() {
        use crate::virtio::worker::WaitMode;
        let rig = Rig::new();
        rig.dev.worker_control().set_wait_mode(WaitMode::Poll {
            spin: Duration::from_secs(5),
        });
        rig.mem
            .write_obj(desc(0x10000, 8, W, 0), GuestAddress(0))
            .unwrap();
        rig.mem.write_obj(0u16, rig.avail.unchecked_add(4)).unwrap();
        rig.mem.write_obj(1u16, rig.avail.unchecked_add(2)).unwrap();
        wait_until("the polled request", || rig.used_idx() == 1);
        assert_eq!(rig.used_elem(0), (0, 8));
    }

    #[test]
    fn fuzz_entry_survives_garbage() {
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for round in 0..300 {
            let len = (round * 11) % 700;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            fuzzing::request(&data);
        }
        fuzzing::request(&[]);
        fuzzing::request(&[16; 1000]);
    }
}
