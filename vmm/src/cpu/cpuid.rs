//! CPUID for each vCPU: what KVM supports, with the topology leaves
//! rewritten so the guest sees `n` vCPUs as `n` single-threaded cores in one
//! socket, coherently on Intel (leaves 1, 4, 0xb, 0x1f) and AMD (leaves 1,
//! 0x8000_0001/8/1d/1e).

use kvm_bindings::{kvm_cpuid_entry2, CpuId};

const LEAF_FEATURES: u32 = 0x1;
const LEAF_CACHE_PARAMS: u32 = 0x4;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_AMD_FEATURES: u32 = 0x8000_0001;
const LEAF_AMD_SIZES: u32 = 0x8000_0008;
const LEAF_AMD_CACHE_TOPOLOGY: u32 = 0x8000_001d;
const LEAF_AMD_EXT_APIC_ID: u32 = 0x8000_001e;

const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_HTT: u32 = 1 << 28;
const AMD_ECX_CMP_LEGACY: u32 = 1 << 1;
/// Topology level types in leaf 0xb/0x1f ECX[15:8].
const LEVEL_SMT: u32 = 1;
const LEVEL_CORE: u32 = 2;

/// Bits needed to hold `n` distinct ids.
fn id_bits(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Rewrites `cpuid` (KVM's supported set) for vCPU `id` of `count`.
pub fn apply_topology(cpuid: &mut CpuId, id: u8, count: u8) {
    let id = u32::from(id);
    let count = u32::from(count);
    let core_bits = id_bits(count);
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // EBX: [31:24] initial APIC id, [23:16] logical processors
                // per package, [15:8] CLFLUSH size (keep), [7:0] brand.
                entry.ebx = (id << 24) | ((1 << core_bits).max(count) << 16) | (entry.ebx & 0xffff);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_CACHE_PARAMS => {
                let level = (entry.eax >> 5) & 0x7;
                // EAX[31:26] cores per package - 1, [25:14] logical
                // processors sharing this cache - 1 (only L3 is shared).
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & 0x3fff) | (sharing << 14) | ((count - 1) << 26);
                if entry.eax & 0x1f == 0 {
                    entry.eax &= 0x3fff; // "no more caches": leave it empty
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                set_ext_topology(entry, id, count, core_bits)
            }
            LEAF_AMD_FEATURES => {
                if count > 1 {
                    entry.ecx |= AMD_ECX_CMP_LEGACY;
                } else {
                    entry.ecx &= !AMD_ECX_CMP_LEGACY;
                }
            }
            LEAF_AMD_SIZES => {
                // ECX[15:12] APIC id bits for cores, [7:0] cores - 1.
                entry.ecx = (entry.ecx & !0xf0ff) | (core_bits << 12) | (count - 1);
            }
            LEAF_AMD_CACHE_TOPOLOGY => {
                let level = (entry.eax >> 5) & 0x7;
                let sharing = if level >= 3 { count - 1 } else { 0 };
                entry.eax = (entry.eax & !(0xfff << 14)) | (sharing << 14);
            }
            LEAF_AMD_EXT_APIC_ID => {
                entry.eax = id;
                // EBX[15:8] threads per core - 1 = 0, [7:0] core id.
                entry.ebx = id & 0xff;
                // ECX[10:8] nodes per processor - 1 = 0, [7:0] node id = 0.
                entry.ecx = 0;
            }
            _ => {}
        }
    }
}

const LEAF_BRAND_FIRST: u32 = 0x8000_0002;
const LEAF_BRAND_LAST: u32 = 0x8000_0004;

/// Fills the processor brand string (leaves 0x8000_0002..4) with `brand`
/// when KVM left it empty, so the guest shows a model name rather than
/// "family/model" numbers.
pub fn fill_brand_string(cpuid: &mut CpuId, brand: [[u32; 4]; 3]) {
    let present = cpuid.as_slice().iter().any(|e| {
        (LEAF_BRAND_FIRST..=LEAF_BRAND_LAST).contains(&e.function)
            && (e.eax | e.ebx | e.ecx | e.edx) != 0
    });
    if present {
        return;
    }
    for (i, regs) in brand.iter().enumerate() {
        let function = LEAF_BRAND_FIRST + i as u32;
        let entry = kvm_cpuid_entry2 {
            function,
            eax: regs[0],
            ebx: regs[1],
            ecx: regs[2],
            edx: regs[3],
            ..Default::default()
        };
        match cpuid
            .as_mut_slice()
            .iter_mut()
            .find(|e| e.function == function)
        {
            Some(slot) => *slot = entry,
            None => {
                // A full table keeps "family/model": cosmetic only.
                let _ = cpuid.push(entry);
            }
        }
    }
}

/// This host CPU's brand string leaves.
pub fn host_brand_string() -> [[u32; 4]; 3] {
    let mut out = [[0; 4]; 3];
    for (i, regs) in out.iter_mut().enumerate() {
        // Extended leaves up to 0x8000_0004 exist on every 64-bit CPU.
        let r = std::arch::x86_64::__cpuid(LEAF_BRAND_FIRST + i as u32);
        *regs = [r.eax, r.ebx, r.ecx, r.edx];
    }
    out
}

fn set_ext_topology(entry: &mut kvm_cpuid_entry2, id: u32, count: u32, core_bits: u32) {
    entry.edx = id; // x2APIC id
    match entry.index {
        0 => {
            // SMT level: one thread per core.
            entry.eax = 0;
            entry.ebx = 1;
            entry.ecx = (LEVEL_SMT << 8) | entry.index;
        }
        1 => {
            entry.eax = core_bits;
            entry.ebx = count;
            entry.ecx = (LEVEL_CORE << 8) | entry.index;
        }
        _ => {
            entry.eax = 0;
            entry.ebx = 0;
            entry.ecx = entry.index; // level type 0: no more levels
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            ..Default::default()
        }
    }

    fn cpuid() -> CpuId {
        CpuId::from_entries(&[
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0x0008_0800,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 0,
                eax: 0x21,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 4,
                index: 3,
                eax: 0x63,
                ..Default::default()
            },
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0008, 0),
            entry(0x8000_001e, 0),
        ])
        .unwrap()
    }

    fn find(c: &CpuId, f: u32, i: u32) -> kvm_cpuid_entry2 {
        *c.as_slice()
            .iter()
            .find(|e| e.function == f && e.index == i)
            .unwrap()
    }

    #[test]
    fn four_cores_one_thread_each() {
        let mut c = cpuid();
        apply_topology(&mut c, 2, 4);
        let l1 = find(&c, 1, 0);
        assert_eq!(l1.ebx >> 24, 2, "APIC id");
        assert_eq!((l1.ebx >> 16) & 0xff, 4, "logical processors");
        assert_eq!((l1.ebx >> 8) & 0xff, 8, "CLFLUSH size kept");
        assert_ne!(l1.edx & EDX_HTT, 0);
        assert_ne!(l1.ecx & ECX_HYPERVISOR, 0);

        assert_eq!(find(&c, 4, 0).eax >> 26, 3, "cores per package - 1");
        assert_eq!((find(&c, 4, 0).eax >> 14) & 0xfff, 0, "L1 private");
        assert_eq!((find(&c, 4, 3).eax >> 14) & 0xfff, 3, "L3 shared by all");

        let smt = find(&c, 0xb, 0);
        let core = find(&c, 0xb, 1);
        assert_eq!((smt.ebx, (smt.ecx >> 8) & 0xff), (1, LEVEL_SMT));
        assert_eq!(
            (core.eax, core.ebx, (core.ecx >> 8) & 0xff),
            (2, 4, LEVEL_CORE)
        );
        assert_eq!(core.edx, 2);
        assert_eq!((find(&c, 0xb, 2).ecx >> 8) & 0xff, 0);

        let amd = find(&c, 0x8000_0008, 0);
        assert_eq!(amd.ecx & 0xff, 3);
        assert_eq!((amd.ecx >> 12) & 0xf, 2);
        assert_eq!(find(&c, 0x8000_001e, 0).eax, 2);
    }

    #[test]
    fn single_vcpu_has_no_htt() {
        let mut c = cpuid();
        apply_topology(&mut c, 0, 1);
        assert_eq!(find(&c, 1, 0).edx & EDX_HTT, 0);
        assert_eq!(find(&c, 0xb, 1).eax, 0);
        assert_eq!(find(&c, 4, 0).eax >> 26, 0);
    }

    #[test]
    fn empty_brand_string_is_filled_and_a_real_one_kept() {
        let brand = [[0x2061_6843; 4], [0x6f6c_6c65; 4], [0; 4]];
        let mut c = cpuid();
        fill_brand_string(&mut c, brand);
        assert_eq!(find(&c, 0x8000_0002, 0).eax, 0x2061_6843);
        assert_eq!(find(&c, 0x8000_0003, 0).ebx, 0x6f6c_6c65);
        let mut again = c.clone();
        fill_brand_string(&mut again, [[7; 4]; 3]);
        assert_eq!(
            find(&again, 0x8000_0002, 0).eax,
            0x2061_6843,
            "existing brand kept"
        );
        let host = host_brand_string();
        assert!(
            host.iter().flatten().any(|r| *r != 0),
            "this CPU has a brand string"
        );
    }

    #[test]
    fn odd_counts_round_up_apic_id_space() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(3), 2);
        assert_eq!(id_bits(254), 8);
        let mut c = cpuid();
        apply_topology(&mut c, 0, 3);
        assert_eq!((find(&c, 1, 0).ebx >> 16) & 0xff, 4);
    }
}
