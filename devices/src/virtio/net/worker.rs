//! The device's I/O worker: serves the transmit queue, moves frames from
//! the tap into the receive queue, and follows the worker's wait mode.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;

use super::rx::{RxMode, RxOutcome, RxState};
use super::tap::Tap;
use super::{tx, Diag, Problem, MAX_PACKET_LEN, RX_QUEUE, TX_QUEUE, VNET_HDR_LEN};
use crate::virtio::worker::WorkerHandler;
use crate::virtio::{Interrupt, Memory, QueueContext};

const TAP: u64 = 0;
const RX_KICK: u64 = 1;
const TX_KICK: u64 = 2;

pub(crate) struct NetWorker {
    mem: Memory,
    rx: QueueContext,
    tx: QueueContext,
    tap: Arc<Tap>,
    interrupt: Arc<dyn Interrupt>,
    diag: Arc<Diag>,
    mode: RxMode,
    rx_state: RxState,
    /// Length of the packet in `rx_buf` still waiting for guest buffers.
    pending: Option<usize>,
    rx_buf: Vec<u8>,
    iov: Vec<libc::iovec>,
    polling: bool,
    /// A queue's rings are unusable; nothing is served until reset.
    broken: bool,
}

// SAFETY: the iovecs are scratch space, rebuilt for every frame and only
// used on the worker thread; they point into guest memory which `mem`
// keeps mapped.
unsafe impl Send for NetWorker {}

impl NetWorker {
    pub(crate) fn new(
        mem: Memory,
        rx: QueueContext,
        tx: QueueContext,
        tap: Arc<Tap>,
        interrupt: Arc<dyn Interrupt>,
        diag: Arc<Diag>,
        acked_features: u64,
    ) -> NetWorker {
        NetWorker {
            mem,
            rx,
            tx,
            tap,
            interrupt,
            diag,
            mode: RxMode::from_features(acked_features),
            rx_state: RxState::default(),
            pending: None,
            // One byte more than the largest packet, to notice truncation.
            rx_buf: vec![0; MAX_PACKET_LEN + 1],
            iov: Vec::new(),
            polling: false,
            broken: false,
        }
    }

    fn fail(&mut self, e: virtio_queue::Error) {
        self.diag.report(Problem::QueueBroken, e);
        if !self.broken {
            self.broken = true;
            self.interrupt.set_needs_reset();
        }
    }

    /// Sends every frame the guest queued; returns whether any was.
    fn process_tx(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let mem = &*self.mem;
        let queue = &mut self.tx.queue;
        let mut served = 0usize;
        let result: Result<(), virtio_queue::Error> = (|| loop {
            if !self.polling {
                queue.disable_notification(mem)?;
            }
            while let Some(chain) = queue.iter(mem)?.next() {
                let head = chain.head_index();
                match tx::gather(mem, chain, &mut self.iov) {
                    Ok(len) => match tx::send(&self.tap, mem, &self.iov) {
                        Ok(_) => self.diag.tx_sent(len - VNET_HDR_LEN),
                        Err(e) => {
                            self.diag.report(Problem::TxTapWrite, e);
                            self.diag.tx_dropped();
                        }
                    },
                    Err(problem) => {
                        self.diag.report(problem, format_args!("chain {head}"));
                        self.diag.tx_dropped();
                    }
                }
                if head < queue.size() {
                    queue.add_used(mem, head, 0)?;
                    served += 1;
                    // Completions go out per frame, as vhost-net does: the
                    // guest's TCP small-queue limit waits on them.
                    if queue.needs_notification(mem)? {
                        self.interrupt.signal_queue(TX_QUEUE);
                    }
                } else {
                    self.diag
                        .report(Problem::BadHeadIndex, format_args!("transmit head {head}"));
                }
            }
            if self.polling || !queue.enable_notification(mem)? {
                return Ok(());
            }
        })();
        if let Err(e) = result {
            self.fail(e);
        }
        served > 0
    }

    /// Moves frames from the tap into the guest until the tap is empty or
    /// the guest runs out of buffers; returns whether anything moved.
    fn process_rx(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let mut moved = false;
        let result = loop {
            let len = match self.pending.take() {
                Some(len) => len,
                None => match self.tap.read_frame(&mut self.rx_buf) {
                    Ok(n) if n > MAX_PACKET_LEN => {
                        self.diag.report(
                            Problem::RxBufferTooSmall,
                            "frame larger than 64 KiB from the tap",
                        );
                        self.diag.rx_dropped();
                        continue;
                    }
                    Ok(n) => n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(()),
                    Err(e) => {
                        // Edge-triggered: this does not spin; the next
                        // frame or kick retries.
                        self.diag.report(Problem::RxTapRead, e);
                        break Ok(());
                    }
                },
            };
            moved = true;
            let packet = &mut self.rx_buf[..len];
            match self.rx_state.deliver(
                &mut self.rx.queue,
                &self.mem,
                packet,
                self.mode,
                &self.diag,
            ) {
                Ok(RxOutcome::Delivered { .. }) => {}
                Ok(RxOutcome::Dropped) => self.diag.rx_dropped(),
                Ok(RxOutcome::NoBuffers) => {
                    self.pending = Some(len);
                    if self.polling {
                        break Ok(());
                    }
                    // Ask for a kick when buffers come; they may have come
                    // just now.
                    match self.rx.queue.enable_notification(&*self.mem) {
                        Ok(true) => continue,
                        Ok(false) => break Ok(()),
                        Err(e) => break Err(e),
                    }
                }
                Err(e) => break Err(e),
            }
        };
        let result = result.and_then(|()| {
            if self.rx_state.take_returned() > 0 && self.rx.queue.needs_notification(&*self.mem)? {
                self.interrupt.signal_queue(RX_QUEUE);
            }
            Ok(())
        });
        if let Err(e) = result {
            self.fail(e);
        }
        moved
    }
}

#[doc(hidden)]
impl NetWorker {
    /// One transmit pass without a thread (fuzzing).
    pub(crate) fn run_tx_once(&mut self) {
        self.process_tx();
    }

    /// One receive pass without a thread (fuzzing).
    pub(crate) fn run_rx_once(&mut self) {
        self.process_rx();
    }
}

impl WorkerHandler for NetWorker {
    fn event_sources(&self) -> Vec<(RawFd, EventSet, u64)> {
        vec![
            // Edge-triggered: the worker may leave frames in the tap while
            // the guest has no buffers without being woken for them again.
            (
                self.tap.as_raw_fd(),
                EventSet::IN | EventSet::EDGE_TRIGGERED,
                TAP,
            ),
            (self.rx.kick.as_raw_fd(), EventSet::IN, RX_KICK),
            (self.tx.kick.as_raw_fd(), EventSet::IN, TX_KICK),
        ]
    }

    fn handle_event(&mut self, token: u64, _events: EventSet) {
        match token {
            TAP => {
                self.process_rx();
            }
            RX_KICK => {
                let _ = self.rx.kick.read();
                self.process_rx();
            }
            TX_KICK => {
                let _ = self.tx.kick.read();
                self.process_tx();
            }
            _ => {}
        }
    }

    fn poll(&mut self) -> bool {
        let sent = self.process_tx();
        let received = self.process_rx();
        sent || received
    }

    fn set_polling(&mut self, on: bool) -> bool {
        self.polling = on;
        if self.broken {
            return false;
        }
        let mem = &*self.mem;
        let result = (|| {
            if on {
                self.rx.queue.disable_notification(mem)?;
                self.tx.queue.disable_notification(mem)?;
                return Ok(false);
            }
            let rx_ready = self.rx.queue.enable_notification(mem)?;
            let tx_ready = self.tx.queue.enable_notification(mem)?;
            // Idle receive buffers are no work; only a waiting frame is.
            Ok(tx_ready || (rx_ready && self.pending.is_some()))
        })();
        result.unwrap_or_else(|e| {
            self.fail(e);
            false
        })
    }
}
