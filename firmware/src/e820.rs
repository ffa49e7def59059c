//! The E820 memory map handed to the guest (zero page or PVH memmap).

use crate::layout::*;

/// E820 entry types the guest understands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Type {
    Ram = 1,
    Reserved = 2,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    pub addr: u64,
    pub size: u64,
    pub kind: E820Type,
}

/// Builds the map for a guest of `mem_size` bytes: conventional memory up to
/// the EBDA, the EBDA and BIOS area reserved (ACPI tables live there), then
/// RAM from 1 MiB around the MMIO hole.
pub fn memory_map(mem_size: u64) -> Vec<E820Entry> {
    let mut map = vec![
        E820Entry {
            addr: 0,
            size: EBDA_START,
            kind: E820Type::Ram,
        },
        E820Entry {
            addr: EBDA_START,
            size: 0xa0000 - EBDA_START,
            kind: E820Type::Reserved,
        },
        E820Entry {
            addr: BIOS_AREA_START,
            size: BIOS_AREA_END - BIOS_AREA_START,
            kind: E820Type::Reserved,
        },
    ];
    // The ECAM window is reserved so Linux trusts the MCFG table.
    let ecam = E820Entry {
        addr: PCI_ECAM_START,
        size: PCI_ECAM_SIZE,
        kind: E820Type::Reserved,
    };
    for (start, len) in ram_ranges(mem_size) {
        let start = start.max(HIGH_MEMORY_START);
        let end = if start == HIGH_MEMORY_START {
            len
        } else {
            start + len
        };
        if end > start {
            map.push(E820Entry {
                addr: start,
                size: end - start,
                kind: E820Type::Ram,
            });
        }
    }
    let at = map.partition_point(|e| e.addr < ecam.addr);
    map.insert(at, ecam);
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ram_total(map: &[E820Entry]) -> u64 {
        map.iter()
            .filter(|e| e.kind == E820Type::Ram)
            .map(|e| e.size)
            .sum()
    }

    #[test]
    fn ram_excludes_legacy_areas_only() {
        let mem = 512 << 20;
        let map = memory_map(mem);
        assert_eq!(ram_total(&map), mem - (HIGH_MEMORY_START - EBDA_START));
        assert!(map
            .iter()
            .filter(|e| e.kind == E820Type::Ram)
            .all(|e| e.addr + e.size <= MMIO_HOLE_START));
        assert!(map
            .iter()
            .any(|e| e.addr == PCI_ECAM_START && e.kind == E820Type::Reserved));
    }

    #[test]
    fn large_guest_has_ram_above_4g() {
        let map = memory_map(6 << 30);
        let high = map.iter().find(|e| e.addr == MMIO_HOLE_END).unwrap();
        assert_eq!(high.size, (6 << 30) - MMIO_HOLE_START);
    }

    #[test]
    fn entries_are_sorted_and_disjoint() {
        let map = memory_map(5 << 30);
        for w in map.windows(2) {
            assert!(w[0].addr + w[0].size <= w[1].addr);
        }
    }
}
