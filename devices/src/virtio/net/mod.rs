//! virtio-net backed by a host tap interface.
//!
//! The guest sees a NIC with its MAC, link status, checksum and TCP
//! segmentation offloads in both directions and mergeable receive
//! buffers; there is one receive and one transmit queue and no control
//! queue. Frames travel with their 12-byte virtio-net header
//! (`virtio_net_hdr_v1`) because the tap is opened with `IFF_VNET_HDR`:
//! the kernel interprets the guest's offload requests itself.
//!
//! Host set-up: `--net tap=kiln0` makes Kiln attach to tap `kiln0`, or
//! create it when it does not exist (a created tap is not persistent and
//! disappears when the VMM exits). Kiln does not configure the host side;
//! to give the guest an IP path, once the VMM runs:
//!
//! ```text
//! ip addr add 10.0.2.1/24 dev kiln0
//! ip link set kiln0 up
//! # in the guest: ip addr add 10.0.2.15/24 dev eth0; ip link set eth0 up
//! ```
//!
//! (or create the tap first, `ip tuntap add kiln0 mode tap`, configure it,
//! and let Kiln attach; that one survives the VMM). Routing beyond the host
//! needs forwarding/NAT on the host, e.g. `sysctl net.ipv4.ip_forward=1`
//! and a masquerade rule.
//!
//! One I/O worker ([`crate::virtio::worker`]) serves both queues and the
//! tap. The tap fd is watched edge-triggered: the worker reads it until it
//! is empty, or until the guest has no receive buffers left, in which case
//! the frame it holds waits and the worker resumes on the guest's next
//! receive-queue kick (it never drops a frame for lack of buffers).

mod config;
pub mod fuzzing;
mod rx;
mod tap;
mod tx;
mod worker;

#[cfg(test)]
mod tap_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

pub use config::{check_ifname, mac_from_name, parse_mac, MacDisplay, NetConfig, MAX_IFNAME_LEN};
pub use tap::{Tap, TapError};

use super::worker::{Placement, Worker, WorkerControl};
use super::{device_type, features, read_config_bytes, ActivateError, DeviceContext, VirtioDevice};

/// virtio-net feature bits (virtio 1.2, section 5.1.3).
pub mod feature {
    pub const CSUM: u64 = 1 << 0;
    pub const GUEST_CSUM: u64 = 1 << 1;
    pub const MAC: u64 = 1 << 5;
    pub const GUEST_TSO4: u64 = 1 << 7;
    pub const GUEST_TSO6: u64 = 1 << 8;
    pub const HOST_TSO4: u64 = 1 << 11;
    pub const HOST_TSO6: u64 = 1 << 12;
    pub const MRG_RXBUF: u64 = 1 << 15;
    pub const STATUS: u64 = 1 << 16;
}

/// `virtio_net_hdr_v1`: flags, gso_type, hdr_len, gso_size, csum_start,
/// csum_offset, num_buffers. With VERSION_1 it always has num_buffers.
pub const VNET_HDR_LEN: usize = 12;
/// Offset of `num_buffers` in the header.
const NUM_BUFFERS_OFFSET: usize = 10;
/// Largest frame after the header in either direction: a 64 KiB TSO packet
/// plus its Ethernet header. Larger transmit chains are dropped.
pub const MAX_FRAME_LEN: usize = 65550;
/// Largest header plus frame.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

pub const RX_QUEUE: u16 = 0;
pub const TX_QUEUE: u16 = 1;
pub const QUEUE_SIZE: u16 = 256;

/// `VIRTIO_NET_S_LINK_UP`.
const STATUS_LINK_UP: u16 = 1;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error("cannot create the network worker's control: {0}")]
    Worker(#[source] std::io::Error),
}

/// Things that go wrong with a guest request or the tap; each is logged
/// once per device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Problem {
    TxWritableDescriptor,
    TxTooShort,
    TxTooLong,
    TxBrokenChain,
    TxBadAddress,
    TxTooFragmented,
    TxTapWrite,
    RxReadableDescriptor,
    RxBrokenChain,
    RxBadAddress,
    RxBufferTooSmall,
    RxRingTooSmall,
    RxTapRead,
    RxShortFrame,
    BadHeadIndex,
    QueueBroken,
}

impl Problem {
    fn what(self) -> &'static str {
        match self {
            Problem::TxWritableDescriptor => {
                "transmit chain has a device-writable descriptor; chain dropped"
            }
            Problem::TxTooShort => {
                "transmit chain is shorter than the virtio-net header; chain dropped"
            }
            Problem::TxTooLong => {
                "transmit frame is larger than 64 KiB plus headers; frame dropped"
            }
            Problem::TxBrokenChain => {
                "transmit chain loops or points past the descriptor table; chain dropped"
            }
            Problem::TxBadAddress => "transmit chain points outside guest memory; chain dropped",
            Problem::TxTooFragmented => "transmit chain has too many pieces; chain dropped",
            Problem::TxTapWrite => "writing a frame to the tap failed; frame dropped",
            Problem::RxReadableDescriptor => {
                "receive chain has a device-readable descriptor; chain returned empty"
            }
            Problem::RxBrokenChain => {
                "receive chain loops or points past the descriptor table; chain returned empty"
            }
            Problem::RxBadAddress => {
                "receive chain points outside guest memory; chain returned empty"
            }
            Problem::RxBufferTooSmall => "receive buffer too small for the frame; frame dropped",
            Problem::RxRingTooSmall => {
                "all receive buffers together are too small for a frame; frame dropped"
            }
            Problem::RxTapRead => "reading from the tap failed",
            Problem::RxShortFrame => {
                "the tap returned a frame without a virtio-net header; dropped"
            }
            Problem::BadHeadIndex => {
                "the driver offered a descriptor index past the queue size; ignored"
            }
            Problem::QueueBroken => "a queue's rings are not in guest memory; device needs reset",
        }
    }
}

/// Per-device counters; cheap to read from any thread.
#[derive(Default)]
pub(crate) struct Counters {
    tx_frames: AtomicU64,
    tx_bytes: AtomicU64,
    tx_dropped: AtomicU64,
    rx_frames: AtomicU64,
    rx_bytes: AtomicU64,
    rx_dropped: AtomicU64,
    bad_chains: AtomicU64,
}

/// A snapshot of the device's traffic counters (frames and bytes exclude
/// the virtio-net header).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NetStats {
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    /// Malformed descriptor chains the guest offered.
    pub bad_chains: u64,
}

/// Reads a device's [`NetStats`]; cheap to clone.
#[derive(Clone)]
pub struct NetStatsReader(Arc<Diag>);

impl NetStatsReader {
    pub fn stats(&self) -> NetStats {
        self.0.stats()
    }
}

/// Logging and counting shared by the device and its workers.
pub(crate) struct Diag {
    name: String,
    logged: AtomicU32,
    counters: Counters,
}

impl Diag {
    pub(crate) fn new(name: &str) -> Diag {
        Diag {
            name: name.into(),
            logged: AtomicU32::new(0),
            counters: Counters::default(),
        }
    }

    /// Warns about `problem` the first time it happens on this device.
    pub(crate) fn report(&self, problem: Problem, detail: impl fmt::Display) {
        let bit = 1u32 << (problem as u32);
        if self.logged.fetch_or(bit, Ordering::Relaxed) & bit == 0 {
            tracing::warn!(
                "virtio-net {}: {} ({detail}); further ones are not logged",
                self.name,
                problem.what()
            );
        }
        match problem {
            Problem::TxWritableDescriptor
            | Problem::TxTooShort
            | Problem::TxBrokenChain
            | Problem::TxBadAddress
            | Problem::TxTooFragmented
            | Problem::RxReadableDescriptor
            | Problem::RxBrokenChain
            | Problem::RxBadAddress
            | Problem::BadHeadIndex => {
                self.counters.bad_chains.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }

    #[cfg(test)]
    pub(crate) fn was_reported(&self, problem: Problem) -> bool {
        self.logged.load(Ordering::Relaxed) & (1u32 << (problem as u32)) != 0
    }

    pub(crate) fn tx_sent(&self, frame_len: usize) {
        self.counters.tx_frames.fetch_add(1, Ordering::Relaxed);
        self.counters
            .tx_bytes
            .fetch_add(frame_len as u64, Ordering::Relaxed);
    }

    pub(crate) fn tx_dropped(&self) {
        self.counters.tx_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn rx_delivered(&self, frame_len: usize) {
        self.counters.rx_frames.fetch_add(1, Ordering::Relaxed);
        self.counters
            .rx_bytes
            .fetch_add(frame_len as u64, Ordering::Relaxed);
    }

    pub(crate) fn rx_dropped(&self) {
        self.counters.rx_dropped.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn stats(&self) -> NetStats {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        NetStats {
            tx_frames: get(&c.tx_frames),
            tx_bytes: get(&c.tx_bytes),
            tx_dropped: get(&c.tx_dropped),
            rx_frames: get(&c.rx_frames),
            rx_bytes: get(&c.rx_bytes),
            rx_dropped: get(&c.rx_dropped),
            bad_chains: get(&c.bad_chains),
        }
    }
}

/// Device feature bits offered to the driver.
pub const DEVICE_FEATURES: u64 = feature::CSUM
    | feature::GUEST_CSUM
    | feature::MAC
    | feature::GUEST_TSO4
    | feature::GUEST_TSO6
    | feature::HOST_TSO4
    | feature::HOST_TSO6
    | feature::MRG_RXBUF
    | feature::STATUS
    | features::RING_EVENT_IDX
    | features::RING_INDIRECT_DESC;

/// The virtio-net device.
pub struct VirtioNet {
    name: String,
    mac: [u8; 6],
    tap: Arc<Tap>,
    control: WorkerControl,
    worker: Option<Worker>,
    diag: Arc<Diag>,
}

impl VirtioNet {
    /// Opens (or creates) the tap `config.tap`. Fails with a clear
    /// [`TapError`] when `/dev/net/tun` is missing, permission is denied,
    /// the name is invalid or the tap is busy.
    pub fn new(config: NetConfig) -> Result<VirtioNet, NetError> {
        let tap = Tap::open(&config.tap)?;
        Self::with_tap(&config, tap)
    }

    /// A device over an already opened tap (or, in tests, a stand-in).
    pub fn with_tap(config: &NetConfig, tap: Tap) -> Result<VirtioNet, NetError> {
        let name = config.device_name().to_string();
        Ok(VirtioNet {
            mac: config.guest_mac(),
            tap: Arc::new(tap),
            control: WorkerControl::new(Placement::default()).map_err(NetError::Worker)?,
            worker: None,
            diag: Arc::new(Diag::new(&name)),
            name,
        })
    }

    /// The handle to move this device's I/O worker at runtime.
    pub fn worker_control(&self) -> WorkerControl {
        self.control.clone()
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    pub fn tap_name(&self) -> &str {
        self.tap.name()
    }

    pub fn stats(&self) -> NetStats {
        self.diag.stats()
    }

    /// A handle that reads this device's counters from any thread, after
    /// the device itself has moved onto the PCI bus.
    pub fn stats_reader(&self) -> NetStatsReader {
        NetStatsReader(self.diag.clone())
    }

    #[cfg(test)]
    pub(crate) fn diag(&self) -> &Diag {
        &self.diag
    }

    fn config_bytes(&self) -> [u8; 8] {
        let mut c = [0u8; 8];
        c[..6].copy_from_slice(&self.mac);
        c[6..8].copy_from_slice(&STATUS_LINK_UP.to_le_bytes());
        c
    }
}

impl VirtioDevice for VirtioNet {
    fn device_type(&self) -> u32 {
        device_type::NET
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        DEVICE_FEATURES
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_bytes(), offset, data);
    }

    fn activate(&mut self, mut ctx: DeviceContext) -> Result<(), ActivateError> {
        self.reset();
        let rx = ctx
            .take_queue(RX_QUEUE)
            .ok_or(ActivateError::MissingQueue(RX_QUEUE))?;
        let tx = ctx
            .take_queue(TX_QUEUE)
            .ok_or(ActivateError::MissingQueue(TX_QUEUE))?;
        self.tap
            .set_offload(tap::offload_flags(ctx.acked_features))
            .map_err(|e| {
                ActivateError::Backend(format!(
                    "tap {}: TUNSETOFFLOAD failed: {e}",
                    self.tap.name()
                ))
            })?;
        let handler = worker::NetWorker::new(
            ctx.mem,
            rx,
            tx,
            self.tap.clone(),
            ctx.interrupt,
            self.diag.clone(),
            ctx.acked_features,
        );
        let worker = Worker::spawn(&self.name, handler, self.control.clone())
            .map_err(ActivateError::Worker)?;
        self.worker = Some(worker);
        Ok(())
    }

    fn reset(&mut self) {
        if let Some(mut worker) = self.worker.take() {
            worker.stop();
            // Until the next driver says what it accepts, ask for plain frames.
            let _ = self.tap.set_offload(0);
        }
    }
}
