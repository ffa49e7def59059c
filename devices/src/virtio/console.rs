//! virtio-console (virtio 1.2, section 5.3): one port, no `MULTIPORT`, no
//! `SIZE`, so two queues: receiveq0 (0, host to guest) and transmitq0 (1,
//! guest to host). The guest sees it as `/dev/hvc0`.
//!
//! - Output (transmitq): the guest's bytes are appended to a file
//!   (`file=PATH`) or discarded. At most [`MAX_TX_CHAIN_BYTES`] are taken
//!   from one buffer (Linux sends at most a page); the rest is dropped and
//!   logged once, so a hostile chain cannot keep the worker writing for
//!   long. A file write may wait for the disk, never for the guest.
//! - Input (receiveq): the VMM pushes bytes through a [`ConsoleInput`]
//!   handle; they wait in a bounded buffer ([`INPUT_CAPACITY`]) until the
//!   guest has given receive buffers.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use virtio_queue::{DescriptorChain, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::options::{from_options, OptionsError};
use super::queue::{drain_queue, Served};
use super::worker::{Placement, Worker, WorkerControl, WorkerHandler};
use super::{
    device_type, features, ActivateError, DeviceContext, Interrupt, Memory, QueueContext,
    VirtioDevice,
};

/// Bytes taken from one transmit buffer at most.
pub const MAX_TX_CHAIN_BYTES: usize = 64 * 1024;
/// Host input waiting for the guest, at most.
pub const INPUT_CAPACITY: usize = 64 * 1024;
const QUEUE_SIZE: u16 = 256;
const RX_QUEUE: u16 = 0;
const TX_QUEUE: u16 = 1;
/// cols, rows (le16), max_nr_ports, emerg_wr (le32): all unused without
/// `SIZE`, `MULTIPORT` and `EMERG_WRITE`.
const CONFIG_SIZE: usize = 12;

#[derive(Debug, thiserror::Error)]
pub enum ConsoleError {
    #[error("cannot open console output {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("cannot set up virtio-console: {0}")]
    Io(#[from] io::Error),
}

/// `kiln run --console file=/tmp/guest.log` (output appended to the
/// file), or `--console none` / empty (output discarded).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleConfig {
    /// Where the guest's output is appended; discarded when absent.
    #[serde(alias = "file", deserialize_with = "some_non_empty_path")]
    pub output_path: Option<PathBuf>,
}

fn some_non_empty_path<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> Result<Option<PathBuf>, D::Error> {
    super::options::non_empty_path(d).map(Some)
}

impl FromStr for ConsoleConfig {
    type Err = OptionsError;

    /// `file=PATH`, or empty (output discarded).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        from_options(s)
    }
}

type Output = Arc<Mutex<Box<dyn Write + Send>>>;

struct InputShared {
    pending: Mutex<VecDeque<u8>>,
    /// Written when bytes arrive, so the worker delivers them.
    ready: EventFd,
}

/// Feeds host bytes (a terminal, a socket) to the guest's console;
/// cheap to clone, usable from any thread, before or after activation.
#[derive(Clone)]
pub struct ConsoleInput {
    shared: Arc<InputShared>,
}

impl ConsoleInput {
    /// Queues `bytes` for the guest. Returns how many were accepted: fewer
    /// than given when the buffer ([`INPUT_CAPACITY`]) is full because the
    /// guest is not reading; the caller retries later or drops them.
    pub fn send(&self, bytes: &[u8]) -> usize {
        let accepted = {
            let mut pending = lock(&self.shared.pending);
            let n = bytes.len().min(INPUT_CAPACITY - pending.len());
            pending.extend(&bytes[..n]);
            n
        };
        if accepted > 0 {
            let _ = self.shared.ready.write(1);
        }
        accepted
    }

    /// Bytes waiting for the guest.
    pub fn pending(&self) -> usize {
        lock(&self.shared.pending).len()
    }
}

pub struct VirtioConsole {
    output: Output,
    input: Arc<InputShared>,
    worker_control: WorkerControl,
    worker: Option<Worker>,
}

impl VirtioConsole {
    /// Opens the output file (created if needed, appended to).
    pub fn new(config: ConsoleConfig) -> Result<Self, ConsoleError> {
        let output: Box<dyn Write + Send> = match &config.output_path {
            Some(path) => Box::new(open_output(path)?),
            None => Box::new(io::sink()),
        };
        Self::with_output(output)
    }

    /// A console whose output goes to `output` (a pipe, a test buffer).
    pub fn with_output(output: Box<dyn Write + Send>) -> Result<Self, ConsoleError> {
        Ok(VirtioConsole {
            output: Arc::new(Mutex::new(output)),
            input: Arc::new(InputShared {
                pending: Mutex::new(VecDeque::new()),
                ready: EventFd::new(libc::EFD_NONBLOCK)?,
            }),
            worker_control: WorkerControl::new(Placement::default())?,
            worker: None,
        })
    }

    pub fn input(&self) -> ConsoleInput {
        ConsoleInput {
            shared: self.input.clone(),
        }
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

fn open_output(path: &PathBuf) -> Result<File, ConsoleError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|source| ConsoleError::Open {
            path: path.clone(),
            source,
        })
}

impl VirtioDevice for VirtioConsole {
    fn device_type(&self) -> u32 {
        device_type::CONSOLE
    }

    fn name(&self) -> &str {
        "console0"
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        features::RING_EVENT_IDX | features::RING_INDIRECT_DESC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        super::read_config_bytes(&[0u8; CONFIG_SIZE], offset, data);
    }

    fn activate(&mut self, mut ctx: DeviceContext) -> Result<(), ActivateError> {
        self.stop();
        let rx = ctx
            .take_queue(RX_QUEUE)
            .ok_or(ActivateError::MissingQueue(RX_QUEUE))?;
        let tx = ctx
            .take_queue(TX_QUEUE)
            .ok_or(ActivateError::MissingQueue(TX_QUEUE))?;
        let handler = ConsoleWorker::new(
            ctx.mem,
            ctx.interrupt,
            rx,
            tx,
            self.output.clone(),
            self.input.clone(),
        );
        self.worker = Some(
            Worker::spawn(self.name(), handler, self.worker_control.clone())
                .map_err(ActivateError::Worker)?,
        );
        Ok(())
    }

    /// Stops the worker; host input not yet delivered stays queued for the
    /// next activation.
    fn reset(&mut self) {
        self.stop();
    }
}

impl Drop for VirtioConsole {
    fn drop(&mut self) {
        self.stop();
    }
}

#[derive(Default)]
struct Warned {
    tx_chain: bool,
    tx_long: bool,
    output: bool,
    rx_chain: bool,
    broken: bool,
}

fn warn_once(flag: &mut bool, f: impl FnOnce()) {
    if !*flag {
        *flag = true;
        f();
    }
}

/// Copies one transmit buffer to `output`, at most [`MAX_TX_CHAIN_BYTES`].
fn transmit(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    output: &mut dyn Write,
    warned: &mut Warned,
) {
    let reader = match chain.reader(mem) {
        Ok(r) => r,
        Err(e) => {
            warn_once(&mut warned.tx_chain, || {
                tracing::warn!("console0: bad transmit buffer ({e}), dropped")
            });
            return;
        }
    };
    let total = reader.available_bytes();
    if total > MAX_TX_CHAIN_BYTES {
        warn_once(&mut warned.tx_long, || {
            tracing::warn!("console0: {total}-byte transmit buffer, only the first {MAX_TX_CHAIN_BYTES} bytes kept")
        });
    }
    let mut limited = reader.take(MAX_TX_CHAIN_BYTES as u64);
    if let Err(e) = io::copy(&mut limited, output) {
        warn_once(&mut warned.output, || {
            tracing::warn!("console0: cannot write the guest's output: {e}")
        });
    }
}

struct ConsoleWorker {
    mem: Memory,
    interrupt: Arc<dyn Interrupt>,
    rx: QueueContext,
    tx: QueueContext,
    output: Output,
    input: Arc<InputShared>,
    polling: bool,
    broken: bool,
    warned: Warned,
}

const TOKEN_RX: u64 = 0;
const TOKEN_TX: u64 = 1;
const TOKEN_INPUT: u64 = 2;

impl ConsoleWorker {
    fn new(
        mem: Memory,
        interrupt: Arc<dyn Interrupt>,
        rx: QueueContext,
        tx: QueueContext,
        output: Output,
        input: Arc<InputShared>,
    ) -> Self {
        ConsoleWorker {
            mem,
            interrupt,
            rx,
            tx,
            output,
            input,
            polling: false,
            broken: false,
            warned: Warned::default(),
        }
    }

    fn serve_tx(&mut self) -> Result<bool, virtio_queue::Error> {
        let mem: &GuestMemoryMmap = &self.mem;
        let warned = &mut self.warned;
        let mut output = lock(&self.output);
        let served = drain_queue(&mut self.tx, mem, self.polling, &*self.interrupt, |chain| {
            transmit(chain, mem, &mut **output, warned);
            Served::Used(0)
        })?;
        if served {
            if let Err(e) = output.flush() {
                warn_once(&mut warned.output, || {
                    tracing::warn!("console0: cannot write the guest's output: {e}")
                });
            }
        }
        Ok(served)
    }

    /// Moves pending host input into the guest's receive buffers, as far
    /// as there are buffers. Returns whether any buffer was used.
    fn deliver_input(&mut self) -> Result<bool, virtio_queue::Error> {
        let mem: &GuestMemoryMmap = &self.mem;
        let mut pending = lock(&self.input.pending);
        let mut used = false;
        while !pending.is_empty() {
            if !self.polling {
                self.rx.queue.disable_notification(mem)?;
            }
            let Some(chain) = self.rx.queue.iter(mem)?.next() else {
                // Out of buffers: wait for the guest's next kick.
                if self.polling || !self.rx.queue.enable_notification(mem)? {
                    break;
                }
                continue;
            };
            let head = chain.head_index();
            let written = match chain.writer(mem) {
                Ok(mut writer) => {
                    let n = writer.available_bytes().min(pending.len());
                    let (a, b) = pending.as_slices();
                    let (a, b) = (&a[..n.min(a.len())], &b[..n - n.min(a.len())]);
                    match writer.write_all(a).and_then(|_| writer.write_all(b)) {
                        Ok(()) => n,
                        Err(_) => writer.bytes_written(),
                    }
                }
                Err(e) => {
                    warn_once(&mut self.warned.rx_chain, || {
                        tracing::warn!("console0: bad receive buffer ({e}), skipped")
                    });
                    0
                }
            };
            pending.drain(..written);
            // At most INPUT_CAPACITY bytes.
            self.rx.queue.add_used(mem, head, written as u32)?;
            used = true;
        }
        if !self.polling {
            self.rx.queue.enable_notification(mem)?;
        }
        if used && self.rx.queue.needs_notification(mem)? {
            self.interrupt.signal_queue(self.rx.index);
        }
        Ok(used)
    }

    fn serve(&mut self, token: u64) -> bool {
        if self.broken {
            return false;
        }
        let result = match token {
            TOKEN_TX => self.serve_tx(),
            TOKEN_RX | TOKEN_INPUT => self.deliver_input(),
            _ => Ok(false),
        };
        result.unwrap_or_else(|e| {
            self.broken = true;
            warn_once(&mut self.warned.broken, || {
                tracing::warn!("console0: broken queue, device needs reset: {e}")
            });
            self.interrupt.set_needs_reset();
            false
        })
    }
}

impl WorkerHandler for ConsoleWorker {
    fn event_sources(&self) -> Vec<(RawFd, EventSet, u64)> {
        vec![
            (self.rx.kick.as_raw_fd(), EventSet::IN, TOKEN_RX),
            (self.tx.kick.as_raw_fd(), EventSet::IN, TOKEN_TX),
            (self.input.ready.as_raw_fd(), EventSet::IN, TOKEN_INPUT),
        ]
    }

    fn handle_event(&mut self, token: u64, _events: EventSet) {
        let _ = match token {
            TOKEN_RX => self.rx.kick.read(),
            TOKEN_TX => self.tx.kick.read(),
            _ => self.input.ready.read(),
        };
        self.serve(token);
    }

    fn poll(&mut self) -> bool {
        let tx = self.serve(TOKEN_TX);
        let rx = self.serve(TOKEN_RX);
        tx || rx
    }

    fn set_polling(&mut self, on: bool) -> bool {
        self.polling = on;
        let mem = self.mem.clone();
        let mut pending = false;
        for qc in [&mut self.rx, &mut self.tx] {
            if on {
                let _ = qc.queue.disable_notification(&*mem);
            } else {
                pending |= qc.queue.enable_notification(&*mem).unwrap_or(false);
            }
        }
        pending
    }
}

fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Entry points for `cargo fuzz`: never panic, whatever the bytes.
#[doc(hidden)]
pub mod fuzzing {
    use super::*;
    use crate::virtio::balloon::fuzzing::{queue_from_bytes, NoInterrupt};
    use virtio_queue::Queue;

    fn worker(data: &[u8], fuzzed: u16) -> Option<ConsoleWorker> {
        let (mem, queue) = queue_from_bytes(data)?;
        // The other queue is never made ready: touching it breaks the device.
        let idle = Queue::new(16).ok()?;
        let (rx, tx) = if fuzzed == RX_QUEUE {
            (queue, idle)
        } else {
            (idle, queue)
        };
        let output: Output = Arc::new(Mutex::new(Box::new(io::sink())));
        let input = Arc::new(InputShared {
            pending: Mutex::new(VecDeque::new()),
            ready: EventFd::new(0).ok()?,
        });
        Some(ConsoleWorker::new(
            Arc::new(mem),
            Arc::new(NoInterrupt),
            QueueContext {
                index: RX_QUEUE,
                queue: rx,
                kick: EventFd::new(0).ok()?,
            },
            QueueContext {
                index: TX_QUEUE,
                queue: tx,
                kick: EventFd::new(0).ok()?,
            },
            output,
            input,
        ))
    }

    /// `data` laid out as a transmit queue, served like the device does.
    pub fn tx(data: &[u8]) {
        if let Some(mut w) = worker(data, TX_QUEUE) {
            w.serve(TOKEN_TX);
        }
    }

    /// `data` laid out as a receive queue, fed with host input.
    pub fn rx(data: &[u8]) {
        if let Some(mut w) = worker(data, RX_QUEUE) {
            lock(&w.input.pending).extend(b"fuzzed host input");
            w.serve(TOKEN_INPUT);
        }
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

    /// A `Write` the test can look into.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    struct Ring {
        desc: GuestAddress,
        avail: GuestAddress,
        used: GuestAddress,
    }

    struct Rig {
        mem: Memory,
        dev: VirtioConsole,
        irq: Arc<CountingInterrupt>,
        kicks: [EventFd; 2],
        rings: [Ring; 2],
    }

    impl Rig {
        fn new(dev: VirtioConsole) -> Rig {
            let mem: Memory =
                Arc::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap());
            let irq = Arc::new(CountingInterrupt::default());
            let mut queues = Vec::new();
            let mut rings = Vec::new();
            let mut kicks = Vec::new();
            for index in 0..2u16 {
                let mock =
                    MockSplitQueue::create(&*mem, GuestAddress(u64::from(index) * 0x4000), 16);
                rings.push(Ring {
                    desc: mock.desc_table_addr(),
                    avail: mock.avail_addr(),
                    used: mock.used_addr(),
                });
                let kick = EventFd::new(libc::EFD_NONBLOCK).unwrap();
                kicks.push(kick.try_clone().unwrap());
                queues.push(QueueContext {
                    index,
                    queue: mock.create_queue().unwrap(),
                    kick,
                });
            }
            let mut dev = dev;
            dev.activate(DeviceContext {
                mem: mem.clone(),
                queues,
                acked_features: 0,
                interrupt: irq.clone(),
            })
            .unwrap();
            let kicks: [EventFd; 2] = kicks.try_into().unwrap();
            let rings: [Ring; 2] = rings.try_into().unwrap_or_else(|_| unreachable!());
            Rig {
                mem,
                dev,
                irq,
                kicks,
                rings,
            }
        }

        /// Writes raw descriptors at table index `at` of queue `q` and
        /// offers `heads`, then kicks.
        fn offer(&self, q: usize, at: u16, descs: &[RawDescriptor], heads: &[u16]) {
            let ring = &self.rings[q];
            for (i, d) in descs.iter().enumerate() {
                self.mem
                    .write_obj(*d, ring.desc.unchecked_add(16 * u64::from(at + i as u16)))
                    .unwrap();
            }
            let idx: u16 = self.mem.read_obj(ring.avail.unchecked_add(2)).unwrap();
            for (i, h) in heads.iter().enumerate() {
                let slot = u64::from(idx.wrapping_add(i as u16) % 16);
                self.mem
                    .write_obj(*h, ring.avail.unchecked_add(4 + 2 * slot))
                    .unwrap();
            }
            self.mem
                .write_obj(
                    idx.wrapping_add(heads.len() as u16),
                    ring.avail.unchecked_add(2),
                )
                .unwrap();
            self.kicks[q].write(1).unwrap();
        }

        fn used_idx(&self, q: usize) -> u16 {
            self.mem
                .read_obj(self.rings[q].used.unchecked_add(2))
                .unwrap()
        }

        fn used_elem(&self, q: usize, i: u64) -> (u32, u32) {
            let at = self.rings[q].used.unchecked_add(4 + 8 * i);
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

    fn captured_console() -> (VirtioConsole, Captured) {
        let out = Captured::default();
        (
            VirtioConsole::with_output(Box::new(out.clone())).unwrap(),
            out,
        )
    }

    #[test]
    fn config_parses_file_or_nothing() {
        let c: ConsoleConfig = "file=/tmp/guest.log".parse().unwrap();
        assert_eq!(c.output_path, Some(PathBuf::from("/tmp/guest.log")));
        // `none` is the flag's spelling (kiln run), not a device option.
        assert!("none".parse::<ConsoleConfig>().is_err());
        assert!("file=".parse::<ConsoleConfig>().is_err());
        assert_eq!(
            "".parse::<ConsoleConfig>().unwrap(),
            ConsoleConfig::default()
        );
        assert!("file".parse::<ConsoleConfig>().is_err());
        assert!("path=/x".parse::<ConsoleConfig>().is_err());
        assert!(matches!(
            VirtioConsole::new("file=/nonexistent-dir/x".parse().unwrap()),
            Err(ConsoleError::Open { .. })
        ));
        let (dev, _) = captured_console();
        assert_eq!(
            (
                dev.device_type(),
                dev.queue_max_sizes().len(),
                dev.features() & 0xffff_ffff & !(3 << 28)
            ),
            (3, 2, 0)
        );
    }

    #[test]
    fn transmit_appends_to_the_output_file() {
        let path = std::env::temp_dir().join(format!("kiln-console-test-{}", std::process::id()));
        std::fs::write(&path, b"before\n").unwrap();
        let rig = Rig::new(
            VirtioConsole::new(ConsoleConfig {
                output_path: Some(path.clone()),
            })
            .unwrap(),
        );
        rig.mem
            .write_slice(b"hello ", GuestAddress(0x10000))
            .unwrap();
        rig.mem
            .write_slice(b"world\n", GuestAddress(0x20000))
            .unwrap();
        rig.offer(
            1,
            0,
            &[desc(0x10000, 6, NEXT, 1), desc(0x20000, 6, 0, 0)],
            &[0],
        );
        wait_until("the transmit buffer", || rig.used_idx(1) == 1);
        assert_eq!(rig.used_elem(1, 0), (0, 0));
        assert_eq!(std::fs::read(&path).unwrap(), b"before\nhello world\n");
        wait_until("the tx interrupt", || {
            rig.irq.queue[1].load(Ordering::SeqCst) == 1
        });
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn hostile_transmit_buffers_are_bounded_or_dropped() {
        let (dev, out) = captured_console();
        let rig = Rig::new(dev);
        rig.mem.write_slice(b"ok", GuestAddress(0x10000)).unwrap();
        rig.offer(
            1,
            0,
            &[
                desc(0x80_0000, 16, 0, 0),        // outside guest memory
                desc(0x10_0000, 0x20_0000, 0, 0), // 2 MiB: only 64 KiB kept
                desc(0x10000, 2, 0, 0),
                desc(0x11000, 8, W, 0), // device-writable only: nothing to send
            ],
            &[0, 1, 2, 3],
        );
        wait_until("four buffers", || rig.used_idx(1) == 4);
        let got = out.0.lock().unwrap().clone();
        assert_eq!(got.len(), MAX_TX_CHAIN_BYTES + 2);
        assert!(got.ends_with(b"ok"));
        assert_eq!(rig.irq.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn host_input_waits_for_receive_buffers_and_is_split_across_them() {
        let (dev, _) = captured_console();
        let input = dev.input();
        assert_eq!(input.send(b"early "), 6, "input before activation is kept");
        let rig = Rig::new(dev);
        assert_eq!(input.send(b"bytes!"), 6);
        std::thread::sleep(Duration::from_millis(20));
        assert_eq!(rig.used_idx(0), 0, "no receive buffer yet");
        assert_eq!(input.pending(), 12);
        // Two 8-byte buffers: 8 + 4 bytes.
        rig.offer(
            0,
            0,
            &[desc(0x30000, 8, W, 0), desc(0x31000, 8, W, 0)],
            &[0, 1],
        );
        wait_until("both buffers", || rig.used_idx(0) == 2);
        assert_eq!(rig.used_elem(0, 0), (0, 8));
        assert_eq!(rig.used_elem(0, 1), (1, 4));
        assert_eq!(rig.bytes(0x30000, 8), b"early by");
        assert_eq!(rig.bytes(0x31000, 8), b"tes!\0\0\0\0");
        assert_eq!(input.pending(), 0);
        wait_until("the rx interrupt", || {
            rig.irq.queue[0].load(Ordering::SeqCst) >= 1
        });
        // A buffer already waiting gets new input at once.
        rig.offer(0, 2, &[desc(0x32000, 64, W, 0)], &[2]);
        std::thread::sleep(Duration::from_millis(10));
        assert_eq!(rig.used_idx(0), 2);
        input.send(b"later");
        wait_until("the waiting buffer", || rig.used_idx(0) == 3);
        assert_eq!(rig.bytes(0x32000, 5), b"later");
    }

    #[test]
    fn input_is_bounded_and_bad_receive_buffers_are_skipped() {
        let (dev, _) = captured_console();
        let input = dev.input();
        assert_eq!(input.send(&vec![b'x'; INPUT_CAPACITY + 10]), INPUT_CAPACITY);
        assert_eq!(input.send(b"more"), 0);
        let rig = Rig::new(dev);
        rig.offer(
            0,
            0,
            &[
                desc(0x80_0000, 16, W, 0), // outside memory: skipped, used 0
                desc(0x30000, 16, 0, 0),   // readable only: nothing written
                desc(0x31000, 16, W, 0),
            ],
            &[0, 1, 2],
        );
        wait_until("three buffers", || rig.used_idx(0) == 3);
        assert_eq!(rig.used_elem(0, 0), (0, 0));
        assert_eq!(rig.used_elem(0, 1), (1, 0));
        assert_eq!(rig.used_elem(0, 2), (2, 16));
        assert_eq!(input.pending(), INPUT_CAPACITY - 16);
        assert_eq!(rig.irq.needs_reset.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn broken_transmit_queue_needs_reset_and_input_survives_reset() {
        let (dev, _) = captured_console();
        let input = dev.input();
        let mut rig = Rig::new(dev);
        rig.mem
            .write_obj(99u16, rig.rings[1].avail.unchecked_add(2))
            .unwrap();
        rig.kicks[1].write(1).unwrap();
        wait_until("needs reset", || {
            rig.irq.needs_reset.load(Ordering::SeqCst) == 1
        });
        rig.dev.reset();
        assert_eq!(input.send(b"kept"), 4);
        assert_eq!(input.pending(), 4);
    }

    #[test]
    fn poll_mode_transmits_without_kicks() {
        use crate::virtio::worker::WaitMode;
        let (dev, out) = captured_console();
        let rig = Rig::new(dev);
        rig.dev.worker_control().set_wait_mode(WaitMode::Poll {
            spin: Duration::from_secs(5),
        });
        rig.mem
            .write_slice(b"polled", GuestAddress(0x10000))
            .unwrap();
        let ring = &rig.rings[1];
        rig.mem
            .write_obj(desc(0x10000, 6, 0, 0), ring.desc)
            .unwrap();
        rig.mem
            .write_obj(0u16, ring.avail.unchecked_add(4))
            .unwrap();
        rig.mem
            .write_obj(1u16, ring.avail.unchecked_add(2))
            .unwrap();
        wait_until("the polled buffer", || rig.used_idx(1) == 1);
        assert_eq!(out.0.lock().unwrap().as_slice(), b"polled");
    }

    #[test]
    fn fuzz_entries_survive_garbage() {
        let mut seed = 0x2545_f491_4f6c_dd1du64;
        for round in 0..300 {
            let len = (round * 13) % 700;
            let data: Vec<u8> = (0..len)
                .map(|_| {
                    seed ^= seed << 13;
                    seed ^= seed >> 7;
                    seed ^= seed << 17;
                    seed as u8
                })
                .collect();
            fuzzing::tx(&data);
            fuzzing::rx(&data);
        }
        fuzzing::tx(&[]);
        fuzzing::rx(&[16; 1000]);
    }
}
