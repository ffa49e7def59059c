//! Memory sizes as people write them (`512M`, `2G`) and print them.

/// Why a memory size does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizeError {
    #[error("invalid memory size {0:?}: expected a number with an optional K, M or G suffix (e.g. 512M, 2G)")]
    NotANumber(String),
    #[error("invalid memory size {text:?}: unknown suffix {suffix:?} (use K, M or G)")]
    Suffix { text: String, suffix: String },
    #[error("memory size {0:?} is too large")]
    TooLarge(String),
    #[error("memory size {0:?} is not a whole number of MiB")]
    NotWholeMib(String),
}

/// Parses `512M`, `2G`, `1048576K`, `4096` (MiB when no suffix, as QEMU
/// does) into MiB.
pub fn parse_memory_mib(text: &str) -> Result<u64, SizeError> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (digits, suffix) = t.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| SizeError::NotANumber(text.into()))?;
    let kib = match suffix.to_ascii_uppercase().as_str() {
        "" | "M" | "MB" | "MIB" => n.checked_mul(1 << 10),
        "K" | "KB" | "KIB" => Some(n),
        "G" | "GB" | "GIB" => n.checked_mul(1 << 20),
        _ => {
            return Err(SizeError::Suffix {
                text: text.into(),
                suffix: suffix.into(),
            })
        }
    }
    .ok_or_else(|| SizeError::TooLarge(text.into()))?;
    if !kib.is_multiple_of(1 << 10) {
        return Err(SizeError::NotWholeMib(text.into()));
    }
    let mib = kib >> 10;
    // Bytes must fit in a u64 too (KVM and the allocator work in bytes).
    mib.checked_mul(1 << 20)
        .ok_or_else(|| SizeError::TooLarge(text.into()))?;
    Ok(mib)
}

/// `1536 MiB`, `2 GiB`, `12 KiB`, `7 bytes`.
pub fn human_size(bytes: u64) -> String {
    const UNITS: [(u64, &str); 3] = [(1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")];
    for (unit, name) in UNITS {
        if bytes >= unit && bytes.is_multiple_of(unit) {
            return format!("{} {name}", bytes / unit);
        }
    }
    for (unit, name) in UNITS {
        if bytes >= unit {
            return format!("{:.1} {name}", bytes as f64 / unit as f64);
        }
    }
    format!("{bytes} bytes")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_memory_mib("512M"), Ok(512));
        assert_eq!(parse_memory_mib("2G"), Ok(2048));
        assert_eq!(parse_memory_mib("2g"), Ok(2048));
        assert_eq!(parse_memory_mib("1024K"), Ok(1));
        assert_eq!(parse_memory_mib("256"), Ok(256));
        assert_eq!(parse_memory_mib("1"), Ok(1));
        for bad in [
            "",
            "M",
            "12X",
            "-5M",
            "1.5G",
            "99999999999999999999G",
            "17592186044416G",
            "1536K",
        ] {
            assert!(parse_memory_mib(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn sizes_print_for_humans() {
        assert_eq!(human_size(512 << 20), "512 MiB");
        assert_eq!(human_size(3 << 30), "3 GiB");
        assert_eq!(human_size(1536 << 10), "1536 KiB");
        assert_eq!(human_size((1536 << 10) + 1), "1.5 MiB");
        assert_eq!(human_size(7), "7 bytes");
    }
}
