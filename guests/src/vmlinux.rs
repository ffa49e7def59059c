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
    Some(u32::from_le_bytes(
        b.get(off..off.checked_add(4)?)?.try_into().ok()?,
    ))
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
        let n =
            lz4_flex::block::decompress_into(chunk, &mut block).map_err(|e| bad(e.to_string()))?;
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
        return Err(GuestError::Kernel(
            "decompressed kernel payload is not an ELF file".into(),
        ));
    }
    Ok(elf)
}

/// Xen's ELF note type for the 32-bit physical entry point (PVH).
const XEN_ELFNOTE_PHYS32_ENTRY: u32 = 18;
const PT_NOTE: u32 = 4;

fn u64_at(b: &[u8], off: usize) -> Option<u64> {
    Some(u64::from_le_bytes(
        b.get(off..off.checked_add(8)?)?.try_into().ok()?,
    ))
}

fn u16_at(b: &[u8], off: usize) -> Option<u16> {
    Some(u16::from_le_bytes(
        b.get(off..off.checked_add(2)?)?.try_into().ok()?,
    ))
}

/// The PVH entry address from a 64-bit little-endian ELF image: the
/// `XEN_ELFNOTE_PHYS32_ENTRY` note (type 18, owner "Xen") in one of its
/// `PT_NOTE` segments, the same place linux-loader looks. `None` when the
/// image is not such an ELF or has no such note; never panics on junk.
pub fn pvh_entry(elf: &[u8]) -> Option<u32> {
    // ELF64 (class 2), little-endian (data 1).
    if !elf.starts_with(ELF_MAGIC) || elf.get(4) != Some(&2) || elf.get(5) != Some(&1) {
        return None;
    }
    let phoff = usize::try_from(u64_at(elf, 0x20)?).ok()?;
    let phentsize = usize::from(u16_at(elf, 0x36)?);
    let phnum = usize::from(u16_at(elf, 0x38)?);
    if phentsize < 0x38 {
        return None;
    }
    for i in 0..phnum {
        let ph = phoff.checked_add(i.checked_mul(phentsize)?)?;
        if u32_at(elf, ph)? != PT_NOTE {
            continue;
        }
        let start = usize::try_from(u64_at(elf, ph.checked_add(0x08)?)?).ok()?;
        let size = usize::try_from(u64_at(elf, ph.checked_add(0x20)?)?).ok()?;
        if let Some(entry) = elf
            .get(start..start.checked_add(size)?)
            .and_then(find_phys32_entry)
        {
            return Some(entry);
        }
    }
    None
}

/// Walks one note segment: (namesz, descsz, type, name, desc), name and
/// desc each padded to 4 bytes.
fn find_phys32_entry(notes: &[u8]) -> Option<u32> {
    let pad = |n: usize| n.checked_add(3).map(|n| n & !3);
    let mut pos = 0;
    while pos + 12 <= notes.len() {
        let namesz = u32_at(notes, pos)? as usize;
        let descsz = u32_at(notes, pos + 4)? as usize;
        let kind = u32_at(notes, pos + 8)?;
        let name_at = pos + 12;
        let desc_at = name_at.checked_add(pad(namesz)?)?;
        let name = notes.get(name_at..name_at.checked_add(namesz)?)?;
        // A note running past its segment ends the walk: malformed.
        let desc = notes.get(desc_at..desc_at.checked_add(descsz)?)?;
        if kind == XEN_ELFNOTE_PHYS32_ENTRY && name == b"Xen\0" {
            return u32_at(desc, 0);
        }
        pos = desc_at.checked_add(pad(descsz)?)?;
    }
    None
}

/// Whether an ELF image carries the Xen PVH entry note.
pub fn has_pvh_note(elf: &[u8]) -> bool {
    pvh_entry(elf).is_some()
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
        let a = b"\x7fELF"
            .iter()
            .chain(&[7u8; 5000])
            .copied()
            .collect::<Vec<_>>();
        let b = vec![9u8; 3000];
        let out = lz4_legacy_decompress(&legacy_stream(&[&a, &b])).unwrap();
        assert_eq!(out.len(), a.len() + b.len());
        assert_eq!(&out[..a.len()], &a[..]);
    }

    /// A minimal ELF64 with one PT_NOTE segment holding `notes`.
    fn elf_with_notes(notes: &[u8]) -> Vec<u8> {
        let mut elf = vec![0u8; 0x40 + 0x38];
        elf[..4].copy_from_slice(ELF_MAGIC);
        elf[4] = 2;
        elf[5] = 1;
        elf[0x20..0x28].copy_from_slice(&0x40u64.to_le_bytes());
        elf[0x36..0x38].copy_from_slice(&0x38u16.to_le_bytes());
        elf[0x38..0x3a].copy_from_slice(&1u16.to_le_bytes());
        let ph = 0x40;
        elf[ph..ph + 4].copy_from_slice(&PT_NOTE.to_le_bytes());
        let notes_at = elf.len() as u64;
        elf[ph + 8..ph + 16].copy_from_slice(&notes_at.to_le_bytes());
        elf[ph + 0x20..ph + 0x28].copy_from_slice(&(notes.len() as u64).to_le_bytes());
        elf.extend_from_slice(notes);
        elf
    }

    fn note(name: &[u8], kind: u32, desc: &[u8]) -> Vec<u8> {
        let mut n = Vec::new();
        n.extend_from_slice(&(name.len() as u32).to_le_bytes());
        n.extend_from_slice(&(desc.len() as u32).to_le_bytes());
        n.extend_from_slice(&kind.to_le_bytes());
        n.extend_from_slice(name);
        n.resize(n.len().next_multiple_of(4), 0);
        n.extend_from_slice(desc);
        n.resize(n.len().next_multiple_of(4), 0);
        n
    }

    #[test]
    fn pvh_entry_is_found_after_other_notes() {
        let mut notes = note(b"Xen\0", 6, b"linux\0");
        notes.extend(note(b"GNU\0", XEN_ELFNOTE_PHYS32_ENTRY, &[1, 2, 3, 4]));
        notes.extend(note(
            b"Xen\0",
            XEN_ELFNOTE_PHYS32_ENTRY,
            &0x0100_0850u64.to_le_bytes(),
        ));
        assert_eq!(pvh_entry(&elf_with_notes(&notes)), Some(0x0100_0850));
    }

    #[test]
    fn no_pvh_note_means_none() {
        let notes = note(b"Xen\0", 5, b"xen-3.0\0");
        assert_eq!(pvh_entry(&elf_with_notes(&notes)), None);
        // The note's bytes outside a PT_NOTE segment don't count.
        let mut elf = elf_with_notes(&[]);
        elf.extend(note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0x50, 8, 0, 1]));
        assert_eq!(pvh_entry(&elf), None);
    }

    #[test]
    fn hostile_elf_headers_do_not_panic() {
        let mut elf = elf_with_notes(&note(b"Xen\0", XEN_ELFNOTE_PHYS32_ENTRY, &[0; 4]));
        for (at, bytes) in [
            (0x20usize, u64::MAX.to_le_bytes().to_vec()),
            (0x38, vec![0xff, 0xff]),
            (0x48, u64::MAX.to_le_bytes().to_vec()),
        ] {
            let mut bad = elf.clone();
            bad[at..at + bytes.len()].copy_from_slice(&bytes);
            let _ = pvh_entry(&bad);
        }
        // A note whose sizes run past the segment.
        let n = elf.len();
        elf[n - 16..n - 12].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(pvh_entry(&elf), None);
        assert_eq!(pvh_entry(b"\x7fELF"), None);
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
