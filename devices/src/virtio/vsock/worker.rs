//! The vsock I/O worker: serves the tx queue (packets from the guest), the
//! rx queue (packets to the guest) and the muxer's host sockets, on the
//! device's [`Worker`](crate::virtio::worker::Worker) thread.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::connection::RxFill;
use super::muxer::Muxer;
use super::packet::{read_packet, HEADER_SIZE};
use super::warn_once::WarnOnce;
use crate::virtio::worker::WorkerHandler;
use crate::virtio::{Interrupt, Memory};

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const EVENT_QUEUE: u16 = 2;

const RX_TOKEN: u64 = 0;
const TX_TOKEN: u64 = 1;
const EVENT_TOKEN: u64 = 2;
const BACKEND_TOKEN: u64 = 3;

/// Most tx chains served before the rx side gets a turn.
const TX_BATCH: usize = 256;

pub struct VsockWorker {
    mem: Memory,
    rx: Queue,
    tx: Queue,
    rx_kick: EventFd,
    tx_kick: EventFd,
    /// The event queue: kept only to drain its kicks (no events are sent).
    event_kick: Option<EventFd>,
    interrupt: Arc<dyn Interrupt>,
    muxer: Muxer,
    /// An rx buffer popped but not filled (the host had nothing after all).
    held_rx: Option<DescriptorChain<Memory>>,
    payload: Vec<u8>,
    polling: bool,
    /// A queue is unusable: the device waits for a reset.
    broken: bool,
    warn: WarnOnce,
}

impl VsockWorker {
    pub fn new(
        mem: Memory,
        rx: (Queue, EventFd),
        tx: (Queue, EventFd),
        event_kick: Option<EventFd>,
        interrupt: Arc<dyn Interrupt>,
        muxer: Muxer,
    ) -> VsockWorker {
        VsockWorker {
            mem,
            rx: rx.0,
            tx: tx.0,
            rx_kick: rx.1,
            tx_kick: tx.1,
            event_kick,
            interrupt,
            muxer,
            held_rx: None,
            payload: Vec::new(),
            polling: false,
            broken: false,
            warn: WarnOnce::default(),
        }
    }

    fn queue_broken(&mut self, what: &str, e: virtio_queue::Error) {
        self.warn.once(WarnOnce::QUEUE, || {
            tracing::warn!("vsock: {what} queue is broken ({e}); the device needs a reset")
        });
        self.broken = true;
        self.interrupt.set_needs_reset();
    }

    /// Serves the tx queue; returns whether any chain was used.
    fn process_tx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        let mut served = 0;
        loop {
            let next = match self.tx.iter(mem.clone()) {
                Ok(mut it) => it.next(),
                Err(e) => {
                    self.queue_broken("tx", e);
                    return used;
                }
            };
            let Some(chain) = next else {
                if self.polling {
                    break;
                }
                match self.tx.enable_notification(&*mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(e) => {
                        self.queue_broken("tx", e);
                        return used;
                    }
                }
            };
            let head = chain.head_index();
            match chain.reader(&*mem) {
                Ok(mut r) => {
                    let available = r.available_bytes();
                    match read_packet(&mut r, available, &mut self.payload) {
                        Ok(hdr) => self.muxer.handle_guest_packet(&hdr, &self.payload),
                        Err((hdr, e)) => {
                            self.warn.once(WarnOnce::BAD_PACKET, || {
                                tracing::warn!("vsock: bad tx packet: {e}")
                            });
                            self.muxer.reject_packet(hdr.as_ref());
                        }
                    }
                }
                Err(e) => self.warn.once(WarnOnce::TX_DESCRIPTOR, || {
                    tracing::warn!("vsock: unusable tx descriptor chain ({e}); returned unread")
                }),
            }
            if let Err(e) = self.tx.add_used(&*mem, head, 0) {
                self.queue_broken("tx", e);
                return used;
            }
            used = true;
            served += 1;
            if served >= TX_BATCH {
                // Let the rx side drain replies; the worker comes back for
                // the rest (the kick or a poll is still pending).
                let _ = self.tx_kick.write(1);
                break;
            }
        }
        if used {
            self.notify(TX_QUEUE);
        }
        used
    }

    /// Fills rx buffers with what the muxer has for the guest; returns
    /// whether any buffer was used.
    fn process_rx(&mut self) -> bool {
        let mem = self.mem.clone();
        let mut used = false;
        while self.muxer.has_rx_work() {
            let chain = match self.held_rx.take() {
                Some(c) => c,
                None => {
                    let next = match self.rx.iter(mem.clone()) {
                        Ok(mut it) => it.next(),
                        Err(e) => {
                            self.queue_broken("rx", e);
                            break;
                        }
                    };
                    match next {
                        Some(c) => c,
                        None => {
                            // Out of buffers: ask the guest to kick when it adds one.
                            if self.polling {
                                break;
                            }
                            match self.rx.enable_notification(&*mem) {
                                Ok(true) => continue,
                                Ok(false) => break,
                                Err(e) => {
                                    self.queue_broken("rx", e);
                                    break;
                                }
                            }
                        }
                    }
                }
            };
            let head = chain.head_index();
            let len = match chain.clone().writer(&*mem) {
                Ok(mut w) if w.available_bytes() > HEADER_SIZE => {
                    let capacity = w.available_bytes();
                    match self.muxer.fill_rx(&mut w, capacity) {
                        Ok(RxFill::Packet(n)) => n as u32,
                        Ok(RxFill::Nothing) => {
                            self.held_rx = Some(chain);
                            break;
                        }
                        Err(e) => {
                            self.warn.once(WarnOnce::RX_DESCRIPTOR, || {
                                tracing::warn!(
                                    "vsock: cannot write an rx buffer ({e}); returned empty"
                                )
                            });
                            0
                        }
                    }
                }
                Ok(_) => {
                    self.warn.once(WarnOnce::RX_DESCRIPTOR, || {
                        tracing::warn!("vsock: rx buffer too small for a packet; returned empty")
                    });
                    0
                }
                Err(e) => {
                    self.warn.once(WarnOnce::RX_DESCRIPTOR, || {
                        tracing::warn!("vsock: unusable rx descriptor chain ({e}); returned empty")
                    });
                    0
                }
            };
            if let Err(e) = self.rx.add_used(&*mem, head, len) {
                self.queue_broken("rx", e);
                break;
            }
            used = true;
        }
        if used {
            self.notify(RX_QUEUE);
        }
        used
    }

    fn notify(&mut self, index: u16) {
        let queue = if index == RX_QUEUE {
            &mut self.rx
        } else {
            &mut self.tx
        };
        match queue.needs_notification(&*self.mem) {
            Ok(false) => {}
            // When in doubt, interrupt: a spurious one is harmless.
            Ok(true) | Err(_) => self.interrupt.signal_queue(index),
        }
    }
}

impl WorkerHandler for VsockWorker {
    fn event_sources(&self) -> Vec<(RawFd, EventSet, u64)> {
        let mut v = vec![
            (self.rx_kick.as_raw_fd(), EventSet::IN, RX_TOKEN),
            (self.tx_kick.as_raw_fd(), EventSet::IN, TX_TOKEN),
            (self.muxer.epoll_fd(), EventSet::IN, BACKEND_TOKEN),
        ];
        if let Some(k) = &self.event_kick {
            v.push((k.as_raw_fd(), EventSet::IN, EVENT_TOKEN));
        }
        v
    }

    fn handle_event(&mut self, token: u64, _events: EventSet) {
        match token {
            RX_TOKEN => {
                let _ = self.rx_kick.read();
            }
            TX_TOKEN => {
                let _ = self.tx_kick.read();
            }
            EVENT_TOKEN => {
                if let Some(k) = &self.event_kick {
                    let _ = k.read();
                }
                return;
            }
            _ => {}
        }
        if self.broken {
            return;
        }
        match token {
            TX_TOKEN => {
                self.process_tx();
            }
            BACKEND_TOKEN => self.muxer.handle_backend_events(),
            _ => {}
        }
        self.process_rx();
    }

    fn poll(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let tx = self.process_tx();
        let rx = self.process_rx();
        tx || rx
    }

    fn set_polling(&mut self, on: bool) -> bool {
        self.polling = on;
        let mem = self.mem.clone();
        if on {
            let _ = self.rx.disable_notification(&*mem);
            let _ = self.tx.disable_notification(&*mem);
            false
        } else {
            let rx = self.rx.enable_notification(&*mem).unwrap_or(true);
            let tx = self.tx.enable_notification(&*mem).unwrap_or(true);
            tx || (rx && self.muxer.has_rx_work())
        }
    }
}
