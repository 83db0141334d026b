//! Sizes as the `rbd` tool parses them (`strict_iecstrtoll` plus rbd's rule that a plain
//! number of `--size` is MiB): `1024`, `10G`, `512M`, `4MiB`, `1T`, `16384B`, `4K`.

/// Bytes of `s` with IEC suffixes (B, K, M, G, T, P, E, optionally followed by `i`/`iB`/`B`;
/// either case); a plain number is multiplied by `plain_unit`.
fn parse(s: &str, plain_unit: u64) -> Result<u64, String> {
    let s = s.trim();
    let digits = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    if digits == 0 {
        return Err(format!("{s:?} is not a size (e.g. 1024, 10G, 512M)"));
    }
    let n: u64 = s[..digits]
        .parse()
        .map_err(|_| format!("{s:?} is too large"))?;
    let unit = s[digits..].to_ascii_uppercase();
    let shift = match unit.as_str() {
        "" => {
            return n
                .checked_mul(plain_unit)
                .ok_or(format!("{s:?} is too large"))
        }
        "B" => 0,
        u => {
            let shift = match u.as_bytes()[0] {
                b'K' => 10,
                b'M' => 20,
                b'G' => 30,
                b'T' => 40,
                b'P' => 50,
                b'E' => 60,
                _ => return Err(format!("{s:?}: unknown unit {:?}", &s[digits..])),
            };
            if !matches!(&u[1..], "" | "B" | "I" | "IB") {
                return Err(format!("{s:?}: unknown unit {:?}", &s[digits..]));
            }
            shift
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or(format!("{s:?} is too large"))
}

/// `--size`: a plain number is MiB (`rbd create --size 1024` is 1 GiB).
pub fn image_size(s: &str) -> Result<u64, String> {
    parse(s, 1 << 20)
}

/// `--object-size`: a plain number is bytes; a power of two from 4 KiB to 32 MiB.
pub fn object_size(s: &str) -> Result<u64, String> {
    let n = parse(s, 1)?;
    if !n.is_power_of_two() || !(4096..=32 << 20).contains(&n) {
        return Err(format!(
            "object size {s} must be a power of two between 4K and 32M"
        ));
    }
    Ok(n)
}

/// `--order`: 12 (4 KiB) to 25 (32 MiB).
pub fn order(s: &str) -> Result<u8, String> {
    match s.parse::<u8>() {
        Ok(o) if (12..=25).contains(&o) => Ok(o),
        _ => Err(format!("order {s} must be between 12 and 25")),
    }
}

/// `1 GiB`, `4 MiB`, `1.5 GiB` as rbd prints sizes.
pub fn human(bytes: u64) -> String {
    const U: [&str; 7] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"];
    let mut i = 0;
    let mut v = bytes as f64;
    while v >= 1024.0 && i < U.len() - 1 {
        v /= 1024.0;
        i += 1;
    }
    if v.fract() == 0.0 {
        format!("{v} {}", U[i])
    } else {
        format!("{v:.1} {}", U[i])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_as_rbd_parses_them() {
        assert_eq!(image_size("1024"), Ok(1 << 30));
        assert_eq!(image_size("10G"), Ok(10 << 30));
        assert_eq!(image_size("512M"), Ok(512 << 20));
        assert_eq!(image_size("4MiB"), Ok(4 << 20));
        assert_eq!(image_size("1T"), Ok(1 << 40));
        assert_eq!(image_size("16384B"), Ok(16384));
        assert_eq!(image_size("4k"), Ok(4096));
        assert!(image_size("").is_err());
        assert!(image_size("G").is_err());
        assert!(image_size("10X").is_err());
        assert!(image_size("10GX").is_err());
        assert!(image_size("99999999999999999999").is_err());
        assert!(image_size("20000000000000E").is_err());
        assert_eq!(object_size("4M"), Ok(4 << 20));
        assert_eq!(object_size("65536"), Ok(65536));
        assert!(object_size("3M").is_err());
        assert!(object_size("64M").is_err());
        assert_eq!(order("22"), Ok(22));
        assert!(order("26").is_err());
        assert_eq!(human(8 << 20), "8 MiB");
        assert_eq!(human(1536 << 20), "1.5 GiB");
        assert_eq!(human(100), "100 B");
    }
}
