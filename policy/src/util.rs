//! Small shared helpers: a seeded PRNG (so traces are reproducible across
//! platforms and crate versions), CPU list parsing and percentiles.

use std::fmt;

/// SplitMix64 seeding a xoshiro256** generator: tiny, fast and stable forever,
/// which matters because trace seeds are part of the documented contract.
#[derive(Debug, Clone)]
pub struct Prng {
    s: [u64; 4],
}

impl Prng {
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut next = || {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^ (z >> 31)
        };
        Prng {
            s: [next(), next(), next(), next()],
        }
    }

    pub fn next_u64(&mut self) -> u64 {
        let result = self.s[1].wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = self.s[1] << 17;
        self.s[2] ^= self.s[0];
        self.s[3] ^= self.s[1];
        self.s[1] ^= self.s[2];
        self.s[0] ^= self.s[3];
        self.s[2] ^= t;
        self.s[3] = self.s[3].rotate_left(45);
        result
    }

    /// Uniform in [0, 1).
    pub fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.unit()
    }

    /// Uniform integer in [lo, hi].
    pub fn int(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u1 = self.unit().max(1e-12);
        let u2 = self.unit();
        (-2.0 * u1.ln()).sqrt() * (2.0 * std::f64::consts::PI * u2).cos()
    }

    pub fn chance(&mut self, p: f64) -> bool {
        self.unit() < p
    }
}

/// A set of host CPUs, kept sorted and deduplicated.
#[derive(Debug, Clone, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct CpuSet(Vec<u32>);

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum CpuListError {
    #[error("bad CPU list element {0:?} (expected N or N-M)")]
    Element(String),
    #[error("CPU range {0}-{1} is reversed")]
    Reversed(u32, u32),
    #[error("CPU list names CPU {0}, above the limit of {1}")]
    TooLarge(u32, u32),
}

/// Upper bound on CPU numbers we accept from files we do not control.
pub const MAX_CPUS: u32 = 8192;

impl CpuSet {
    pub fn new(mut cpus: Vec<u32>) -> Self {
        cpus.sort_unstable();
        cpus.dedup();
        CpuSet(cpus)
    }

    pub fn single(cpu: u32) -> Self {
        CpuSet(vec![cpu])
    }

    pub fn range(lo: u32, hi_exclusive: u32) -> Self {
        CpuSet((lo..hi_exclusive).collect())
    }

    /// Parses the kernel's list format ("0-3,8,10-11"), as in sysfs.
    pub fn parse(text: &str) -> Result<Self, CpuListError> {
        let mut cpus = Vec::new();
        for part in text
            .trim()
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let bad = || CpuListError::Element(part.to_string());
            let (lo, hi) = match part.split_once('-') {
                Some((a, b)) => (
                    a.trim().parse::<u32>().map_err(|_| bad())?,
                    b.trim().parse::<u32>().map_err(|_| bad())?,
                ),
                None => {
                    let v = part.parse::<u32>().map_err(|_| bad())?;
                    (v, v)
                }
            };
            if lo > hi {
                return Err(CpuListError::Reversed(lo, hi));
            }
            if hi >= MAX_CPUS {
                return Err(CpuListError::TooLarge(hi, MAX_CPUS));
            }
            cpus.extend(lo..=hi);
        }
        Ok(CpuSet::new(cpus))
    }

    pub fn cpus(&self) -> &[u32] {
        &self.0
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn contains(&self, cpu: u32) -> bool {
        self.0.binary_search(&cpu).is_ok()
    }

    pub fn intersects(&self, other: &CpuSet) -> bool {
        self.0.iter().any(|c| other.contains(*c))
    }

    pub fn minus(&self, other: &CpuSet) -> CpuSet {
        CpuSet(
            self.0
                .iter()
                .copied()
                .filter(|c| !other.contains(*c))
                .collect(),
        )
    }

    pub fn union(&self, other: &CpuSet) -> CpuSet {
        let mut v = self.0.clone();
        v.extend_from_slice(&other.0);
        CpuSet::new(v)
    }
}

impl fmt::Display for CpuSet {
    /// Prints the kernel list format, compressing runs.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        let mut i = 0;
        while i < self.0.len() {
            let start = self.0[i];
            let mut end = start;
            while i + 1 < self.0.len() && self.0[i + 1] == end + 1 {
                i += 1;
                end = self.0[i];
            }
            if !first {
                f.write_str(",")?;
            }
            first = false;
            if start == end {
                write!(f, "{start}")?;
            } else {
                write!(f, "{start}-{end}")?;
            }
            i += 1;
        }
        Ok(())
    }
}

/// Nearest-rank percentile of `values` (sorted in place); `p` in [0, 100].
pub fn percentile(values: &mut [f64], p: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    values.sort_unstable_by(|a, b| a.total_cmp(b));
    let rank = ((p / 100.0) * values.len() as f64).ceil() as usize;
    values[rank.clamp(1, values.len()) - 1]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_list_round_trips() {
        let s = CpuSet::parse("0-3,8,10-11\n").unwrap();
        assert_eq!(s.cpus(), &[0, 1, 2, 3, 8, 10, 11]);
        assert_eq!(s.to_string(), "0-3,8,10-11");
        assert_eq!(CpuSet::parse("").unwrap().len(), 0);
    }

    #[test]
    fn cpu_list_rejects_garbage() {
        assert!(matches!(
            CpuSet::parse("1-x"),
            Err(CpuListError::Element(_))
        ));
        assert_eq!(CpuSet::parse("5-2"), Err(CpuListError::Reversed(5, 2)));
        assert!(matches!(
            CpuSet::parse("0-4294967295"),
            Err(CpuListError::TooLarge(..))
        ));
    }

    #[test]
    fn prng_is_stable_for_a_seed() {
        let a: Vec<u64> = {
            let mut p = Prng::new(7);
            (0..4).map(|_| p.next_u64()).collect()
        };
        let b: Vec<u64> = {
            let mut p = Prng::new(7);
            (0..4).map(|_| p.next_u64()).collect()
        };
        assert_eq!(a, b);
        assert_ne!(a, {
            let mut p = Prng::new(8);
            (0..4).map(|_| p.next_u64()).collect::<Vec<_>>()
        });
    }

    #[test]
    fn percentile_nearest_rank() {
        let mut v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&mut v, 99.0), 99.0);
        assert_eq!(percentile(&mut v, 50.0), 50.0);
    }
}
