//! Kiln guest agent: the protocol spoken between the host and the agent that
//! runs inside every Kiln guest, the agent itself, and the host-side client.
//! The wire format is documented in `PROTOCOL.md` beside this crate.

pub mod client;
pub mod frame;
pub mod protocol;
pub mod server;
pub mod transport;
pub mod vsock_uds;

pub use client::{AgentClient, ClientError, ExecOutput, OutputStream, WindowsAppOutcome};
pub use protocol::DEFAULT_VSOCK_PORT;
pub use server::{Agent, AgentConfig, PowerControl, WineConfig};
pub use transport::{ConnectAddr, ListenAddr, Listener};
