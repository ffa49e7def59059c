//! The disk's I/O worker: serves the request queue on the device's
//! [`Worker`](crate::virtio::worker::Worker) thread.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::config::SERIAL_LEN;
use super::disk::DiskFile;
use super::request::{self, RequestContext};
use super::warn::{Problem, Warnings};
use crate::virtio::worker::WorkerHandler;
use crate::virtio::{Interrupt, Memory};

const KICK_TOKEN: u64 = 0;

pub(crate) struct BlockWorker {
    pub mem: Memory,
    pub queue: Queue,
    pub index: u16,
    pub kick: EventFd,
    pub interrupt: Arc<dyn Interrupt>,
    pub disk: Arc<DiskFile>,
    pub serial: [u8; SERIAL_LEN],
    pub warnings: Arc<Warnings>,
    /// Notifications suppressed (poll mode).
    pub polling: bool,
    /// The rings are unusable; nothing is served until the driver resets.
    pub broken: bool,
}

impl BlockWorker {
    /// Serves every available request; returns whether there were any.
    pub fn process_queue(&mut self) -> bool {
        if self.broken {
            return false;
        }
        let mut served = false;
        loop {
            if !self.polling {
                // With EVENT_IDX this is a no-op; without, it sets NO_NOTIFY.
                if let Err(e) = self.queue.disable_notification(self.mem.as_ref()) {
                    self.break_queue(&e);
                    return served;
                }
            }
            served |= self.drain();
            if self.broken || self.polling {
                return served;
            }
            // Re-enable and look again: requests that raced with enabling
            // would otherwise wait for a kick that never comes.
            match self.queue.enable_notification(self.mem.as_ref()) {
                Ok(true) => continue,
                Ok(false) => return served,
                Err(e) => {
                    self.break_queue(&e);
                    return served;
                }
            }
        }
    }

    /// Pops and serves requests until the ring is empty, then signals the
    /// driver if it asked to be.
    fn drain(&mut self) -> bool {
        let mem = self.mem.clone();
        let ctx = RequestContext {
            mem: mem.as_ref(),
            disk: &self.disk,
            serial: &self.serial,
            warnings: &self.warnings,
        };
        let mut served = 0usize;
        while let Some(chain) = self.queue.pop_descriptor_chain(mem.as_ref()) {
            let head = chain.head_index();
            let len = request::serve(&ctx, chain);
            if let Err(e) = self.queue.add_used(mem.as_ref(), head, len) {
                self.break_queue(&e);
                return served > 0;
            }
            served += 1;
        }
        if served > 0 {
            match self.queue.needs_notification(mem.as_ref()) {
                Ok(true) => self.interrupt.signal_queue(self.index),
                Ok(false) => {}
                Err(e) => self.break_queue(&e),
            }
        }
        served > 0
    }

    fn break_queue(&mut self, e: &virtio_queue::Error) {
        self.warnings.warn(Problem::BrokenQueue, &e.to_string());
        self.broken = true;
        self.interrupt.set_needs_reset();
    }
}

impl WorkerHandler for BlockWorker {
    fn event_sources(&self) -> Vec<(RawFd, EventSet, u64)> {
        vec![(self.kick.as_raw_fd(), EventSet::IN, KICK_TOKEN)]
    }

    fn handle_event(&mut self, token: u64, _events: EventSet) {
        if token == KICK_TOKEN {
            let _ = self.kick.read();
            self.process_queue();
        }
    }

    fn poll(&mut self) -> bool {
        self.process_queue()
    }

    fn set_polling(&mut self, on: bool) -> bool {
        self.polling = on;
        if self.broken {
            return false;
        }
        let mem = self.mem.clone();
        let result = if on {
            self.queue
                .disable_notification(mem.as_ref())
                .map(|()| false)
        } else {
            self.queue.enable_notification(mem.as_ref())
        };
        match result {
            Ok(pending) => pending,
            Err(e) => {
                self.break_queue(&e);
                false
            }
        }
    }
}
