//! The virtio-vsock packet header (virtio 1.2, section 5.10.6) and the
//! bounds-checked reading of a packet the guest put on the tx queue.

use std::io::{self, Read, Write};

/// Size of `struct virtio_vsock_hdr` on the wire.
pub const HEADER_SIZE: usize = 44;
/// Largest payload one packet may carry (Linux's VIRTIO_VSOCK_MAX_PKT_BUF_SIZE);
/// a longer `len` is a broken or hostile guest.
pub const MAX_PAYLOAD: usize = 64 * 1024;

/// The host's well-known CID (VMADDR_CID_HOST).
pub const HOST_CID: u64 = 2;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

/// SHUTDOWN flags: the sender will receive no more / send no more.
pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;
pub const SHUTDOWN_BOTH: u32 = SHUTDOWN_RCV | SHUTDOWN_SEND;

/// A decoded packet header; all fields little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn decode(b: &[u8; HEADER_SIZE]) -> Header {
        let u64_at = |o: usize| {
            u64::from_le_bytes([
                b[o],
                b[o + 1],
                b[o + 2],
                b[o + 3],
                b[o + 4],
                b[o + 5],
                b[o + 6],
                b[o + 7],
            ])
        };
        let u32_at = |o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    pub fn encode(&self) -> [u8; HEADER_SIZE] {
        let mut b = [0u8; HEADER_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a tx chain is not a usable packet.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain holds {0} readable bytes, less than a packet header")]
    ShortHeader(usize),
    #[error("packet length {0} exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    #[error("packet length {len} exceeds the {available} bytes the chain holds after the header")]
    BeyondChain { len: u32, available: usize },
    #[error("cannot read the packet from guest memory")]
    Memory,
}

/// Reads one tx packet: the header, then its payload into `payload`
/// (cleared first). Only RW packets carry a payload; others have theirs
/// skipped. `available` is how many readable bytes the chain holds.
///
/// On a length error the header is returned too, so that the sender can be
/// told with a RST.
pub fn read_packet<R: Read>(
    reader: &mut R,
    available: usize,
    payload: &mut Vec<u8>,
) -> Result<Header, (Option<Header>, PacketError)> {
    payload.clear();
    if available < HEADER_SIZE {
        return Err((None, PacketError::ShortHeader(available)));
    }
    let mut raw = [0u8; HEADER_SIZE];
    reader
        .read_exact(&mut raw)
        .map_err(|_| (None, PacketError::Memory))?;
    let hdr = Header::decode(&raw);
    let len = hdr.len as usize;
    if len > MAX_PAYLOAD {
        return Err((Some(hdr), PacketError::TooLong(hdr.len)));
    }
    let rest = available - HEADER_SIZE;
    if len > rest {
        return Err((
            Some(hdr),
            PacketError::BeyondChain {
                len: hdr.len,
                available: rest,
            },
        ));
    }
    if hdr.op == OP_RW && len > 0 {
        payload.resize(len, 0);
        reader
            .read_exact(payload)
            .map_err(|_| (Some(hdr), PacketError::Memory))?;
    }
    Ok(hdr)
}

/// Writes a packet (header, then `data`) into an rx chain; returns the
/// bytes written (the used length).
pub fn write_packet<W: Write>(writer: &mut W, hdr: &Header, data: &[u8]) -> io::Result<usize> {
    writer.write_all(&hdr.encode())?;
    writer.write_all(data)?;
    Ok(HEADER_SIZE + data.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 0x1234_5678,
            dst_port: 80,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips_in_wire_layout() {
        let h = sample();
        let b = h.encode();
        assert_eq!(&b[16..20], &0x1234_5678u32.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(Header::decode(&b), h);
    }

    #[test]
    fn read_packet_checks_lengths() {
        let mut buf = sample().encode().to_vec();
        buf.extend_from_slice(b"hello");
        let mut payload = Vec::new();
        let h = read_packet(&mut &buf[..], buf.len(), &mut payload).unwrap();
        assert_eq!(h.len, 5);
        assert_eq!(payload, b"hello");

        // len beyond the chain.
        let err = read_packet(&mut &buf[..], buf.len() - 1, &mut payload).unwrap_err();
        assert!(matches!(
            err,
            (
                Some(_),
                PacketError::BeyondChain {
                    len: 5,
                    available: 4
                }
            )
        ));
        // len beyond 64 KiB.
        let mut big = sample();
        big.len = MAX_PAYLOAD as u32 + 1;
        let b = big.encode();
        let err = read_packet(&mut &b[..], usize::MAX, &mut payload).unwrap_err();
        assert!(matches!(err.1, PacketError::TooLong(_)));
        // short chain.
        let err = read_packet(&mut &b[..10], 10, &mut payload).unwrap_err();
        assert_eq!(err, (None, PacketError::ShortHeader(10)));
        // The reader lies about its size: a memory error, not a panic.
        let err = read_packet(&mut &buf[..HEADER_SIZE + 2], buf.len(), &mut payload).unwrap_err();
        assert!(matches!(err.1, PacketError::Memory));
    }
}
