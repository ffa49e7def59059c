//! "Log once" flags: a hostile guest must not flood the host log.

#[derive(Debug, Default)]
pub struct WarnOnce(u32);

impl WarnOnce {
    pub const EPOLL: u32 = 1 << 0;
    pub const LIMIT: u32 = 1 << 1;
    pub const ACCEPT: u32 = 1 << 2;
    pub const BAD_CID: u32 = 1 << 3;
    pub const PROTOCOL: u32 = 1 << 4;
    pub const RST_FLOOD: u32 = 1 << 5;
    pub const BAD_PACKET: u32 = 1 << 6;
    pub const TX_DESCRIPTOR: u32 = 1 << 7;
    pub const RX_DESCRIPTOR: u32 = 1 << 8;
    pub const QUEUE: u32 = 1 << 9;

    /// Runs `log` the first time `kind` comes up.
    pub fn once(&mut self, kind: u32, log: impl FnOnce()) {
        if self.0 & kind == 0 {
            self.0 |= kind;
            log();
        }
    }
}
