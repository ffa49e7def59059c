//! `kiln serve`: Kiln's host daemon. It serves the REST API of `kiln-api`
//! on a Unix socket, keeps VM definitions durable under its state
//! directory, and supervises one `kiln-vmm` process per running VM.

pub mod events;
pub mod host;
pub mod http;
pub mod process;
pub mod state;
pub mod store;
