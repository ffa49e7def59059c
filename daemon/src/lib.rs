//! `kiln serve`: Kiln's host daemon. It serves the REST API of `kiln-api`
//! on a Unix socket, keeps VM definitions durable under its state
//! directory, and supervises one `kiln-vmm` process per running VM.

pub mod actions;
pub mod agent;
pub mod console;
pub mod events;
pub mod exec;
pub mod host;
pub mod http;
pub mod metrics;
pub mod policy;
pub mod process;
pub mod rundir;
pub mod serve;
pub mod server;
pub mod state;
pub mod store;
pub mod tcp;
pub mod tls;
pub mod vms;

pub use serve::{serve, ServeArgs};
