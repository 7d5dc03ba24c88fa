//! Sizes as admins write them: `64KiB`, `512MiB`, `4GiB`, `1TiB`, or plain bytes.

/// Parses a size with an optional binary unit.
pub fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|character: char| !character.is_ascii_digit())
        .unwrap_or(trimmed.len());
    let (digits, unit) = trimmed.split_at(split);
    let help = || {
        format!("size '{text}' is not understood: write a whole number with KiB, MiB, GiB or TiB, e.g. 4GiB")
    };
    let number: u64 = digits.parse().map_err(|_| help())?;
    let multiplier: u64 = match unit.trim() {
        "" | "B" => 1,
        "KiB" => 1 << 10,
        "MiB" => 1 << 20,
        "GiB" => 1 << 30,
        "TiB" => 1 << 40,
        _ => return Err(help()),
    };
    number
        .checked_mul(multiplier)
        .ok_or_else(|| format!("size '{text}' is too large"))
}

/// Parses a track size: a size (as [`parse_size`] reads it) that is a power of two from
/// 4 KiB to 1 MiB, the range every node accepts.
pub fn parse_track_size(text: &str) -> Result<u32, String> {
    use protocol::messages::{TRACK_BYTES_MAX, TRACK_BYTES_MIN};
    let bytes = parse_size(text)?;
    match u32::try_from(bytes) {
        Ok(bytes)
            if bytes.is_power_of_two() && (TRACK_BYTES_MIN..=TRACK_BYTES_MAX).contains(&bytes) =>
        {
            Ok(bytes)
        }
        _ => Err(format!(
            "track size '{text}' is not allowed: a track is a power of two from {} to {} (4KiB, 8KiB, ... 1MiB; the default is 64KiB)",
            format_size(u64::from(TRACK_BYTES_MIN)).replace(' ', ""),
            format_size(u64::from(TRACK_BYTES_MAX)).replace(' ', ""),
        )),
    }
}

/// Formats bytes with the largest binary unit that keeps it readable.
pub fn format_size(bytes: u64) -> String {
    const UNITS: [(&str, u64); 4] = [
        ("TiB", 1 << 40),
        ("GiB", 1 << 30),
        ("MiB", 1 << 20),
        ("KiB", 1 << 10),
    ];
    for (unit, size) in UNITS {
        if bytes >= size {
            if bytes.is_multiple_of(size) {
                return format!("{} {unit}", bytes / size);
            }
            return format!("{:.1} {unit}", bytes as f64 / size as f64);
        }
    }
    format!("{bytes} B")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_binary_units() {
        assert_eq!(parse_size("4096").unwrap(), 4096);
        assert_eq!(parse_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_size("4GiB").unwrap(), 4 << 30);
        assert_eq!(parse_size("1 TiB").unwrap(), 1 << 40);
        assert!(parse_size("4GB").is_err());
        assert!(parse_size("GiB").is_err());
        assert!(parse_size("-1").is_err());
        assert!(parse_size("99999999999TiB").is_err());
    }

    #[test]
    fn track_sizes_are_powers_of_two_in_the_allowed_range() {
        assert_eq!(parse_track_size("64KiB").unwrap(), 65536);
        assert_eq!(parse_track_size("4KiB").unwrap(), 4096);
        assert_eq!(parse_track_size("1MiB").unwrap(), 1 << 20);
        for refused in ["8GiB", "2MiB", "2KiB", "96KiB", "99999999999TiB"] {
            let error = parse_track_size(refused).unwrap_err();
            assert!(
                error.contains("from 4KiB to 1MiB") || error.contains("too large"),
                "{refused}: {error}"
            );
            assert!(!error.contains("integral"), "{refused}: {error}");
        }
    }

    #[test]
    fn sizes_format_readably() {
        assert_eq!(format_size(64 << 20), "64 MiB");
        assert_eq!(format_size(1536), "1.5 KiB");
        assert_eq!(format_size(100), "100 B");
    }
}
