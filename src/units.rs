//! Sizes and limits: byte counts people write (`64GiB`, `512MiB`, `1.5GB`, `1048576`) and
//! bounds that are either bytes or a share of a file system (`10%`).
//!
//! Used by the configuration (TOML, environment, flags), the store's capacity and free-space
//! bounds and the CLI's output. It depends on nothing else in kvfs, so the store and the
//! configuration can both use it without importing each other. [`human_bytes`] prints exact
//! binary multiples without decimals (`64GiB`), so its output parses back as a [`Size`].
//!
//! TOML values may be integers (bytes) or strings (`"64GiB"`, `"10%"`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::str::FromStr;

/// Binary multiples of a byte.
pub const KIB: u64 = 1 << 10;
pub const MIB: u64 = 1 << 20;
pub const GIB: u64 = 1 << 30;
pub const TIB: u64 = 1 << 40;

/// A byte count parsed from `64GiB`, `512MiB`, `1.5GB` or `1048576`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(s: &str) -> Result<Size, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(s.len());
        let (num, unit) = (&s[..split], s[split..].trim());
        if num.is_empty() {
            return Err("expected a number, optionally with a unit (64GiB, 512MiB)".into());
        }
        let mult = match unit {
            "" | "B" | "b" => 1,
            "K" | "k" | "KiB" | "kiB" => KIB,
            "M" | "MiB" => MIB,
            "G" | "GiB" => GIB,
            "T" | "TiB" => TIB,
            "KB" | "kB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            "TB" => 1_000_000_000_000,
            _ => {
                return Err(format!(
                    "unknown unit `{unit}` (use B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)"
                ));
            }
        };
        if let Ok(n) = num.parse::<u64>() {
            return n
                .checked_mul(mult)
                .map(Size)
                .ok_or_else(|| "size overflows 64 bits".to_string());
        }
        let f: f64 = num
            .parse()
            .map_err(|_| format!("`{num}` is not a number"))?;
        let v = f * mult as f64;
        if !v.is_finite() || v >= u64::MAX as f64 {
            return Err("size overflows 64 bits".into());
        }
        Ok(Size(v as u64))
    }
}

impl fmt::Display for Size {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&human_bytes(self.0))
    }
}

/// `n` bytes for people: `512 B`, `1.5 GiB`; exact binary multiples print without decimals
/// (`64GiB`) so the output parses back as a [`Size`].
pub fn human_bytes(n: u64) -> String {
    for (unit, m) in [("TiB", TIB), ("GiB", GIB), ("MiB", MIB), ("KiB", KIB)] {
        if n >= m {
            return if n % m == 0 {
                format!("{}{unit}", n / m)
            } else {
                format!("{:.2}{unit}", n as f64 / m as f64)
            };
        }
    }
    format!("{n}B")
}

/// A bound given either in bytes or as a percentage of the cache file system's size.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Limit {
    Bytes(u64),
    /// Percent (0..=100) of the file system holding the cache directory.
    Percent(f64),
}

impl Limit {
    /// Bytes this limit means on a file system of `fs_total` bytes.
    pub fn resolve(self, fs_total: u64) -> u64 {
        match self {
            Limit::Bytes(b) => b,
            Limit::Percent(p) => ((fs_total as f64) * p / 100.0) as u64,
        }
    }
}

impl FromStr for Limit {
    type Err = String;
    fn from_str(s: &str) -> Result<Limit, String> {
        let t = s.trim();
        if let Some(p) = t.strip_suffix('%') {
            let p: f64 = p
                .trim()
                .parse()
                .map_err(|_| format!("`{t}` is not a percentage"))?;
            if !(0.0..=100.0).contains(&p) {
                return Err("a percentage must be within 0%..=100%".into());
            }
            return Ok(Limit::Percent(p));
        }
        Ok(Limit::Bytes(t.parse::<Size>()?.0))
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Limit::Bytes(b) => f.write_str(&human_bytes(*b)),
            Limit::Percent(p) => write!(f, "{p}%"),
        }
    }
}

/// TOML sizes may be integers (bytes) or strings (`"64GiB"`, `"10%"`). A visitor rather than an
/// untagged enum, so a wrong value says what was expected instead of "did not match any
/// variant of untagged enum".
fn deserialize_size_text<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: FromStr<Err = String> + From<u64>,
{
    struct V<T>(std::marker::PhantomData<T>);
    impl<T: FromStr<Err = String> + From<u64>> serde::de::Visitor<'_> for V<T> {
        type Value = T;
        fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str("a size: a byte count (1048576) or a string such as \"64GiB\" or \"10%\"")
        }
        fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<T, E> {
            Ok(T::from(v))
        }
        fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<T, E> {
            u64::try_from(v)
                .map(T::from)
                .map_err(|_| E::custom(format!("a size cannot be negative (got {v})")))
        }
        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<T, E> {
            Err(E::custom(format!(
                "a size in bytes must be a whole number (got {v}); write \"1.5GiB\" as a string"
            )))
        }
        fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<T, E> {
            v.parse()
                .map_err(|e: String| E::custom(format!("`{v}`: {e}")))
        }
    }
    d.deserialize_any(V(std::marker::PhantomData))
}

impl From<u64> for Size {
    fn from(v: u64) -> Size {
        Size(v)
    }
}

impl From<u64> for Limit {
    fn from(v: u64) -> Limit {
        Limit::Bytes(v)
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Size, D::Error> {
        deserialize_size_text(d)
    }
}

impl Serialize for Size {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for Limit {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Limit, D::Error> {
        deserialize_size_text(d)
    }
}

impl Serialize for Limit {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!("64GiB".parse::<Size>().unwrap(), Size(64 << 30));
        assert_eq!("512MiB".parse::<Size>().unwrap(), Size(512 << 20));
        assert_eq!("512M".parse::<Size>().unwrap(), Size(512 << 20));
        assert_eq!("1.5GB".parse::<Size>().unwrap(), Size(1_500_000_000));
        assert_eq!("4096".parse::<Size>().unwrap(), Size(4096));
        assert_eq!(" 2 KiB ".parse::<Size>().unwrap(), Size(2048));
        for bad in ["", "GiB", "12 parsecs", "-5", "1e3", "99999999999TiB"] {
            assert!(bad.parse::<Size>().is_err(), "{bad}");
        }
        assert_eq!("10%".parse::<Limit>().unwrap(), Limit::Percent(10.0));
        assert_eq!("64GiB".parse::<Limit>().unwrap(), Limit::Bytes(64 << 30));
        assert!("101%".parse::<Limit>().is_err());
        assert!("x%".parse::<Limit>().is_err());
        assert_eq!(Limit::Percent(10.0).resolve(1000), 100);
        assert_eq!(human_bytes(64 << 30), "64GiB");
        assert_eq!(
            human_bytes(64 << 30).parse::<Size>().unwrap(),
            Size(64 << 30)
        );
    }
}
