//! The VM's virtio devices: created from the configuration, each wrapped in
//! a virtio-pci function on the root bus.

mod kvm_irq;

use std::sync::{Arc, Mutex};

use anyhow::{Context, Result};
use kiln_devices::pci::PciRoot;
use kiln_devices::virtio::balloon::{BalloonControl, VirtioBalloon};
use kiln_devices::virtio::block::VirtioBlock;
use kiln_devices::virtio::console::VirtioConsole;
use kiln_devices::virtio::net::{NetStatsReader, VirtioNet};
use kiln_devices::virtio::pci::{VirtioPciDevice, BAR_SIZE};
use kiln_devices::virtio::rng::VirtioRng;
use kiln_devices::virtio::vsock::Vsock;
use kiln_devices::virtio::worker::Placement;
use kiln_devices::virtio::worker::WorkerControl;
use kiln_devices::virtio::{Memory, VirtioDevice};
use kiln_firmware::layout;
use kvm_ioctls::VmFd;

use crate::config::VmConfig;

pub use kvm_irq::KvmInterrupts;

/// Runtime handles of the running devices, for the VMM's control socket
/// and the policy engine.
#[derive(Clone, Default)]
pub struct DeviceHandles {
    /// Each device's I/O worker, by device name.
    pub workers: Vec<(String, WorkerControl)>,
    pub balloon: Option<BalloonControl>,
    /// Traffic counters of each virtio-net device, by device name.
    pub nets: Vec<(String, NetStatsReader)>,
}

impl DeviceHandles {
    /// The I/O worker of device `name`, if it has one.
    pub fn worker(&self, name: &str) -> Option<&WorkerControl> {
        self.workers.iter().find(|(n, _)| n == name).map(|(_, w)| w)
    }
}

/// The PCI root bus with every configured device on it.
pub fn build_pci(
    vm: &Arc<VmFd>,
    mem: &Memory,
    config: &VmConfig,
) -> Result<(Arc<Mutex<PciRoot>>, DeviceHandles)> {
    let interrupts = Arc::new(KvmInterrupts::new(vm.clone()));
    let mut root = PciRoot::new(
        layout::PCI_ECAM_START,
        layout::PCI_MMIO_START,
        layout::PCI_MMIO_SIZE,
    );
    let (devices, handles) = create_devices(config)?;
    for device in devices {
        let name = device.name().to_string();
        let bar = root.allocate_bar(BAR_SIZE)?;
        let pci = VirtioPciDevice::new(
            device,
            mem.clone(),
            bar as u32,
            interrupts.clone(),
            interrupts.clone(),
        )
        .with_context(|| format!("setting up PCI function of {name}"))?;
        let slot = root.add_device(Box::new(pci))?;
        tracing::info!("{name}: PCI 00:{slot:02x}.0, BAR 0 at {bar:#x}");
    }
    Ok((Arc::new(Mutex::new(root)), handles))
}

/// The devices being created and their runtime handles.
#[derive(Default)]
struct DeviceSet {
    devices: Vec<Box<dyn VirtioDevice>>,
    handles: DeviceHandles,
}

impl DeviceSet {
    /// Adds `device`, whose I/O worker is reached through `worker`, under
    /// the device's own name.
    fn add(&mut self, device: impl VirtioDevice + 'static, worker: WorkerControl) {
        self.handles
            .workers
            .push((device.name().to_string(), worker));
        self.devices.push(Box::new(device));
    }
}

/// Creates the device models the configuration asks for.
fn create_devices(config: &VmConfig) -> Result<(Vec<Box<dyn VirtioDevice>>, DeviceHandles)> {
    let cfg = config;
    let mut set = DeviceSet::default();
    for disk in &cfg.disks {
        let dev = VirtioBlock::new(disk.clone(), Placement::default())
            .with_context(|| format!("--disk path={}", disk.path.display()))?;
        let worker = dev.worker_control();
        set.add(dev, worker);
    }
    for net in &cfg.nets {
        let dev = VirtioNet::new(net.clone()).with_context(|| format!("--net tap={}", net.tap))?;
        let worker = dev.worker_control();
        set.handles
            .nets
            .push((dev.name().to_string(), dev.stats_reader()));
        set.add(dev, worker);
    }
    if let Some(v) = &cfg.vsock {
        let dev = Vsock::new(v.clone()).context("--vsock")?;
        let worker = dev.worker_control();
        set.add(dev, worker);
    }
    if let Some(c) = &cfg.console {
        let dev = VirtioConsole::new(c.clone()).context("--virtio-console")?;
        let worker = dev.worker_control();
        set.add(dev, worker);
    }
    if let Some(b) = &cfg.balloon {
        let dev = VirtioBalloon::new(b.clone()).context("--balloon")?;
        set.handles.balloon = Some(dev.control());
        let worker = dev.worker_control();
        set.add(dev, worker);
    }
    if let Some(r) = &cfg.rng {
        let dev = VirtioRng::new(r.clone()).context("--rng")?;
        let worker = dev.worker_control();
        set.add(dev, worker);
    }
    Ok((set.devices, set.handles))
}
