//! Recovers the ELF `vmlinux` from a bzImage, for PVH boot.
//!
//! The bzImage's setup header points at its compressed payload
//! (`payload_offset`/`payload_length`, boot protocol 2.08+). Debian's 6.1
//! kernels compress it with LZ4 in the "legacy" frame format: a magic word,
//! then blocks of (u32 compressed size, data), each up to 8 MiB unpacked.

use crate::GuestError;

const LZ4_LEGACY_MAGIC: u32 = 0x184c_2102;
const LZ4_LEGACY_BLOCK: usize = 8 << 20;
const ELF_MAGIC: &[u8] = b"\x7fELF";

fn u32_at(b: &[u8], off: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(off..off + 4)?.try_into().ok()?))
}

/// The compressed payload inside `bzimage`.
pub fn payload(bzimage: &[u8]) -> Result<&[u8], GuestError> {
    let bad = |why: &str| GuestError::Kernel(format!("not a usable bzImage: {why}"));
    if bzimage.get(0x202..0x206) != Some(b"HdrS") {
        return Err(bad("no HdrS signature"));
    }
    let setup_sects = match bzimage[0x1f1] {
        0 => 4,
        n => usize::from(n),
    };
    let start = (setup_sects + 1) * 512;
    let offset = u32_at(bzimage, 0x248).ok_or_else(|| bad("short header"))? as usize;
    let length = u32_at(bzimage, 0x24c).ok_or_else(|| bad("short header"))? as usize;
    bzimage
        .get(start + offset..start + offset + length)
        .ok_or_else(|| bad("payload outside the file"))
}

/// Decompresses an LZ4 legacy stream.
pub fn lz4_legacy_decompress(data: &[u8]) -> Result<Vec<u8>, GuestError> {
    let bad = |why: String| GuestError::Kernel(format!("cannot decompress kernel payload: {why}"));
    let mut out = Vec::new();
    let mut pos = 0;
    let mut block = vec![0u8; LZ4_LEGACY_BLOCK];
    while let Some(word) = u32_at(data, pos) {
        pos += 4;
        if word == LZ4_LEGACY_MAGIC {
            continue; // concatenated streams each start with the magic
        }
        let size = word as usize;
        let Some(chunk) = data.get(pos..pos + size) else {
            // The kernel build appends the uncompressed size after the
            // last block: four bytes that are not a block.
            break;
        };
        pos += size;
        let n = lz4_flex::block::decompress_into(chunk, &mut block).map_err(|e| bad(e.to_string()))?;
        out.extend_from_slice(&block[..n]);
    }
    if out.is_empty() {
        return Err(bad("no LZ4 blocks found".into()));
    }
    Ok(out)
}

/// Extracts the ELF vmlinux from a bzImage whose payload is LZ4 or plain.
pub fn extract(bzimage: &[u8]) -> Result<Vec<u8>, GuestError> {
    let payload = payload(bzimage)?;
    let elf = if payload.starts_with(ELF_MAGIC) {
        payload.to_vec()
    } else if u32_at(payload, 0) == Some(LZ4_LEGACY_MAGIC) {
        lz4_legacy_decompress(payload)?
    } else {
        return Err(GuestError::Kernel(format!(
            "kernel payload uses a compression Kiln cannot unpack (magic {:02x?})",
            payload.get(..4).unwrap_or_default()
        )));
    };
    if !elf.starts_with(ELF_MAGIC) {
        return Err(GuestError::Kernel("decompressed kernel payload is not an ELF file".into()));
    }
    Ok(elf)
}

/// Whether an ELF image carries the Xen PVH entry note
/// (`XEN_ELFNOTE_PHYS32_ENTRY`, type 18, owner "Xen").
pub fn has_pvh_note(elf: &[u8]) -> bool {
    elf.windows(12).any(|w| {
        u32::from_le_bytes([w[0], w[1], w[2], w[3]]) == 4
            && u32::from_le_bytes([w[8], w[9], w[10], w[11]]) == 18
            && u32::from_le_bytes([w[4], w[5], w[6], w[7]]) <= 8
    }) && elf.windows(4).any(|w| w == b"Xen\0")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn legacy_stream(parts: &[&[u8]]) -> Vec<u8> {
        let mut s = LZ4_LEGACY_MAGIC.to_le_bytes().to_vec();
        let mut total = 0u32;
        for p in parts {
            let c = lz4_flex::block::compress(p);
            s.extend_from_slice(&(c.len() as u32).to_le_bytes());
            s.extend_from_slice(&c);
            total += p.len() as u32;
        }
        s.extend_from_slice(&total.to_le_bytes());
        s
    }

    #[test]
    fn legacy_lz4_round_trips_across_blocks() {
        let a = b"\x7fELF".iter().chain(&[7u8; 5000]).copied().collect::<Vec<_>>();
        let b = vec![9u8; 3000];
        let out = lz4_legacy_decompress(&legacy_stream(&[&a, &b])).unwrap();
        assert_eq!(out.len(), a.len() + b.len());
        assert_eq!(&out[..a.len()], &a[..]);
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert!(lz4_legacy_decompress(&[0xff; 64]).is_err());
        assert!(lz4_legacy_decompress(&[]).is_err());
        assert!(extract(&[0u8; 100]).is_err());
        let mut fake = vec![0u8; 0x1000];
        fake[0x202..0x206].copy_from_slice(b"HdrS");
        fake[0x248..0x24c].copy_from_slice(&0xffff_0000u32.to_le_bytes());
        assert!(extract(&fake).is_err());
    }
}
