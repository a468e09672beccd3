//! The one size parser used by every size-taking flag (`--target-size 4MB`, `--budget 50%`, ...).

use std::fmt;
use std::str::FromStr;

/// A size given on the command line: an absolute byte count or a percentage of a reference
/// size (the FP32 model file).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SizeSpec {
    Bytes(u64),
    /// In `(0, 100]`.
    Percent(f64),
}

const UNITS_HELP: &str = "use B, KB, MB, GB, KiB, MiB, GiB or a percentage like 50%";

/// `(unit, multiplier)`, matched case-insensitively. Display prefers earlier entries.
const UNITS: &[(&str, u64)] = &[
    ("GB", 1_000_000_000),
    ("GiB", 1 << 30),
    ("MB", 1_000_000),
    ("MiB", 1 << 20),
    ("KB", 1_000),
    ("KiB", 1 << 10),
    ("B", 1),
];

impl SizeSpec {
    /// The size in bytes; a percentage is taken of `reference_bytes` and rounded down.
    pub fn resolve(&self, reference_bytes: u64) -> u64 {
        match *self {
            SizeSpec::Bytes(n) => n,
            SizeSpec::Percent(p) if p >= 100.0 => reference_bytes,
            SizeSpec::Percent(p) => {
                // `as` saturates; `min` guards against float rounding above the reference.
                ((reference_bytes as f64 * p / 100.0).floor() as u64).min(reference_bytes)
            }
        }
    }
}

impl FromStr for SizeSpec {
    type Err = String;

    fn from_str(input: &str) -> Result<Self, String> {
        parse(input).map_err(|reason| format!("invalid size {input:?}: {reason}"))
    }
}

fn parse(input: &str) -> Result<SizeSpec, String> {
    let s = input.trim();
    if s.is_empty() {
        return Err(format!("empty value ({UNITS_HELP})"));
    }
    if s.starts_with('-') {
        return Err("size must not be negative".into());
    }
    if let Some(num) = s.strip_suffix('%') {
        let num = num.trim_end();
        let p: f64 = num
            .parse()
            .map_err(|_| format!("{num:?} is not a number"))?;
        if !p.is_finite() {
            return Err("percentage must be a finite number".into());
        }
        if p <= 0.0 || p > 100.0 {
            return Err("percentage must be greater than 0% and at most 100%".into());
        }
        return Ok(SizeSpec::Percent(p));
    }

    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = (&s[..split], s[split..].trim_start());
    if num.is_empty() {
        return Err(format!(
            "expected a number followed by an optional unit ({UNITS_HELP})"
        ));
    }
    let mult = if unit.is_empty() {
        1
    } else {
        UNITS
            .iter()
            .find(|(u, _)| u.eq_ignore_ascii_case(unit))
            .map(|&(_, m)| m)
            .ok_or_else(|| format!("unknown unit {unit:?} ({UNITS_HELP})"))?
    };
    let bytes = scale_decimal(num, mult)?;
    if bytes == 0 {
        return Err(if num.bytes().any(|b| (b'1'..=b'9').contains(&b)) {
            "size rounds down to 0 bytes".into()
        } else {
            "size must be greater than zero".into()
        });
    }
    Ok(SizeSpec::Bytes(bytes))
}

/// `floor(num * mult)` computed exactly for a decimal string `num` of digits and at most one `.`.
fn scale_decimal(num: &str, mult: u64) -> Result<u64, String> {
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if frac.contains('.') || (int.is_empty() && frac.is_empty()) {
        return Err(format!("{num:?} is not a number"));
    }
    let too_large = || format!("size is too large (at most {} bytes)", u64::MAX);
    let mut whole: u128 = 0;
    for d in int.bytes() {
        whole = whole
            .checked_mul(10)
            .and_then(|x| x.checked_add(u128::from(d - b'0')))
            .ok_or_else(too_large)?;
    }
    let mut total = whole.checked_mul(u128::from(mult)).ok_or_else(too_large)?;
    if !frac.is_empty() {
        // Every multiplier divides 10^30, so with the fraction scaled to 30 digits (D / 10^30),
        // floor(D / 10^30 * mult) = floor(D / (10^30 / mult)) exactly. Digits past the 30th
        // cannot move the result across an integer, since k / mult has at most 30 decimals.
        const SCALE: u128 = 10u128.pow(30);
        debug_assert_eq!(SCALE % u128::from(mult), 0);
        let digits = &frac[..frac.len().min(30)];
        let mut d: u128 = 0;
        for b in digits.bytes() {
            d = d * 10 + u128::from(b - b'0');
        }
        d *= 10u128.pow((30 - digits.len()) as u32);
        total = total
            .checked_add(d / (SCALE / u128::from(mult)))
            .ok_or_else(too_large)?;
    }
    u64::try_from(total).map_err(|_| too_large())
}

impl fmt::Display for SizeSpec {
    /// Shortest exact form, e.g. `4MB`, `3.5MiB`, `1234B`, `50%`; parses back to the same value.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match *self {
            SizeSpec::Percent(p) => write!(f, "{p}%"),
            SizeSpec::Bytes(n) => f.write_str(&exact_bytes(n)),
        }
    }
}

fn exact_bytes(n: u64) -> String {
    let mut best = format!("{n}B");
    for &(unit, mult) in UNITS {
        if mult == 1 {
            continue;
        }
        let (q, r) = (n / mult, n % mult);
        // Up to 3 decimals, and only when exact.
        let milli = u128::from(r) * 1000;
        if milli % u128::from(mult) != 0 {
            continue;
        }
        let frac = (milli / u128::from(mult)) as u64;
        let s = if frac == 0 {
            format!("{q}{unit}")
        } else {
            let f = format!("{frac:03}");
            format!("{q}.{}{unit}", f.trim_end_matches('0'))
        };
        if s.len() < best.len() {
            best = s;
        }
    }
    best
}

pub use crate::units::human_bytes;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn p(s: &str) -> SizeSpec {
        s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn err(s: &str) -> String {
        let e = s.parse::<SizeSpec>().unwrap_err();
        assert!(!e.contains('\n'), "{e}");
        assert!(e.starts_with("invalid size "), "{e}");
        e
    }

    #[test]
    fn accepts() {
        use SizeSpec::*;
        let cases: &[(&str, SizeSpec)] = &[
            ("200000", Bytes(200_000)),
            ("512KB", Bytes(512_000)),
            ("512kB", Bytes(512_000)),
            ("512kb", Bytes(512_000)),
            ("4MB", Bytes(4_000_000)),
            ("4 MB", Bytes(4_000_000)),
            (" 4mb ", Bytes(4_000_000)),
            ("3.5MiB", Bytes(3_670_016)),
            ("1.5GB", Bytes(1_500_000_000)),
            ("1.5 gib", Bytes(1_610_612_736)),
            ("10KiB", Bytes(10_240)),
            ("10kib", Bytes(10_240)),
            ("12B", Bytes(12)),
            ("12 b", Bytes(12)),
            ("1.9B", Bytes(1)),
            ("1.005KB", Bytes(1005)),
            ("0.5KB", Bytes(500)),
            (".5KB", Bytes(500)),
            ("5.KB", Bytes(5000)),
            ("0.0009765625KiB", Bytes(1)),
            ("0.000000000931322574615478515625GiB", Bytes(1)),
            ("1.999999999068677425384521484375GiB", Bytes((2 << 30) - 1)),
            ("1.00000000000000000000000000009KB", Bytes(1000)),
            ("18446744073709551615", Bytes(u64::MAX)),
            ("50%", Percent(50.0)),
            ("50 %", Percent(50.0)),
            ("0.5%", Percent(0.5)),
            ("100%", Percent(100.0)),
        ];
        for (s, want) in cases {
            assert_eq!(p(s), *want, "{s}");
        }
    }

    #[test]
    fn rejects() {
        assert_eq!(
            err("4XB"),
            r#"invalid size "4XB": unknown unit "XB" (use B, KB, MB, GB, KiB, MiB, GiB or a percentage like 50%)"#
        );
        assert!(err("").contains("empty"));
        assert!(err("   ").contains("empty"));
        assert!(err("-5MB").contains("negative"));
        assert!(err("-5%").contains("negative"));
        assert!(err("0").contains("greater than zero"));
        assert!(err("0.0KB").contains("greater than zero"));
        assert!(err("0.1B").contains("rounds down to 0"));
        assert!(err("0.000000000931322574615478515624999GiB").contains("rounds down to 0"));
        assert!(err("NaN").contains("expected a number"));
        assert!(err("nan%").contains("finite"));
        assert!(err("inf%").contains("finite"));
        assert!(err("MB").contains("expected a number"));
        assert!(err("1.2.3MB").contains("not a number"));
        assert!(err(".").contains("not a number"));
        assert!(err("4 M").contains("unknown unit \"M\""));
        assert!(err("4TB").contains("unknown unit"));
        assert!(err("4MB5").contains("unknown unit \"MB5\""));
        assert!(err("0%").contains("greater than 0%"));
        assert!(err("100.5%").contains("at most 100%"));
        assert!(err("abc%").contains("not a number"));
        assert!(err("18446744073709551616").contains("too large"));
        assert!(err("18446744073709551615KB").contains("too large"));
        assert!(err("99999999999999999999999999999999999999999999GB").contains("too large"));
        assert_eq!(p("20GiB"), SizeSpec::Bytes(20 << 30));
    }

    #[test]
    fn resolve() {
        assert_eq!(SizeSpec::Bytes(123).resolve(1000), 123);
        assert_eq!(SizeSpec::Percent(50.0).resolve(1001), 500);
        assert_eq!(SizeSpec::Percent(100.0).resolve(u64::MAX), u64::MAX);
        assert_eq!(SizeSpec::Percent(25.0).resolve(0), 0);
        assert_eq!(SizeSpec::Percent(12.5).resolve(8_000_000), 1_000_000);
        assert!(SizeSpec::Percent(99.999).resolve(u64::MAX) < u64::MAX);
    }

    #[test]
    fn display() {
        use SizeSpec::*;
        assert_eq!(Bytes(4_000_000).to_string(), "4MB");
        assert_eq!(Bytes(3_670_016).to_string(), "3.5MiB");
        assert_eq!(Bytes(1_500_000_000).to_string(), "1.5GB");
        assert_eq!(Bytes(10_240).to_string(), "10KiB");
        assert_eq!(Bytes(512_000).to_string(), "512KB");
        assert_eq!(Bytes(12).to_string(), "12B");
        assert_eq!(Bytes(123_457).to_string(), "123457B");
        assert_eq!(Percent(50.0).to_string(), "50%");
        assert_eq!(Percent(0.5).to_string(), "0.5%");
    }

    #[test]
    fn human() {
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(999), "999 B");
        assert_eq!(human_bytes(1000), "1.00 KB");
        assert_eq!(human_bytes(1_070_000), "1.07 MB");
        assert_eq!(human_bytes(12_345), "12.3 KB");
        assert_eq!(human_bytes(123_456), "123 KB");
        assert_eq!(human_bytes(999_499), "999 KB");
        assert_eq!(human_bytes(999_999), "1.00 MB");
        assert_eq!(human_bytes(400_000_000_000), "400 GB");
        assert_eq!(human_bytes(u64::MAX), "18.4 EB");
    }

    proptest! {
        #[test]
        fn display_roundtrips_bytes(n in 1u64..) {
            let s = SizeSpec::Bytes(n);
            prop_assert_eq!(s.to_string().parse::<SizeSpec>(), Ok(s));
        }

        #[test]
        fn display_roundtrips_unit_multiples(q in 1u64..5000, frac in 0u64..8, unit in 0usize..UNITS.len()) {
            let mult = UNITS[unit].1;
            let n = q * mult + frac * mult / 8;
            let s = SizeSpec::Bytes(n);
            prop_assert_eq!(s.to_string().parse::<SizeSpec>(), Ok(s));
        }

        #[test]
        fn display_roundtrips_percent(p in 0.0001f64..=100.0) {
            let s = SizeSpec::Percent(p);
            prop_assert_eq!(s.to_string().parse::<SizeSpec>(), Ok(s));
        }

        #[test]
        fn parse_never_panics(s in "\\PC{0,20}") {
            let _ = s.parse::<SizeSpec>();
        }
    }
}
