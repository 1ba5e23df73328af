//! The memory budget: one type, parsed in one place, with one meaning everywhere (CLI, xtask, JSON, docs).
//!
//! A budget bounds the peak resident set of the whole process. It is given as a byte size (`64MiB`, `1.5GiB`,
//! `123456`) or as a percentage of the source GGUF file's size (`50%`; over 100% is valid, since the process
//! needs more than its weights). A prepared directory records the size of the GGUF it was made from, so `50%`
//! means the same bytes whether it is given to `cargo xtask prepare`, `cargo xtask plan` or `pinion`.

use std::fmt;
use std::str::FromStr;

use crate::error::PlanError;

/// A memory budget for the whole process (see the module documentation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Budget {
    /// Bytes.
    Bytes(u64),
    /// A percentage of the source GGUF file's size (positive, finite; over 100 allowed).
    Percent(f64),
}

/// Percentages above this are refused as typos (a budget of 100x the model is never what was meant).
const MAX_PERCENT: f64 = 10_000.0;

impl Budget {
    /// Parses a budget: a byte size (see [`parse_size`]) or a percentage `P%` of the source GGUF file.
    pub fn parse(s: &str) -> Result<Budget, PlanError> {
        let bad = |why: &str| PlanError::BadBudget { input: s.to_string(), why: why.to_string() };
        let t = s.trim();
        if let Some(num) = t.strip_suffix('%') {
            let p: f64 = num.trim().parse().map_err(|_| bad("not a number before %"))?;
            if !(p.is_finite() && p > 0.0) {
                return Err(bad("a percentage must be positive"));
            }
            if p > MAX_PERCENT {
                return Err(bad("a percentage above 10000% is surely a typo"));
            }
            return Ok(Budget::Percent(p));
        }
        parse_size(t).map(Budget::Bytes).map_err(|e| match e {
            PlanError::BadBudget { why, .. } => bad(&why),
            other => other,
        })
    }

    /// The budget in bytes, for a model made from a GGUF file of `source_bytes`.
    pub fn bytes(self, source_bytes: u64) -> u64 {
        match self {
            Budget::Bytes(b) => b,
            Budget::Percent(p) => (source_bytes as f64 * p / 100.0).round() as u64,
        }
    }
}

impl FromStr for Budget {
    type Err = PlanError;
    fn from_str(s: &str) -> Result<Budget, PlanError> {
        Budget::parse(s)
    }
}

impl fmt::Display for Budget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Budget::Bytes(b) => write!(f, "{:.1} MiB", *b as f64 / (1u64 << 20) as f64),
            Budget::Percent(p) => write!(f, "{p}% of the GGUF"),
        }
    }
}

/// Parses a positive byte size: a count with an optional unit, `K`/`M`/`G`/`T` and `KiB`..`TiB` binary,
/// `KB`..`TB` decimal, `B` (case-insensitive; a fraction such as `1.5GiB` is rounded to whole bytes).
pub fn parse_size(s: &str) -> Result<u64, PlanError> {
    let bad = |why: &str| PlanError::BadBudget { input: s.to_string(), why: why.to_string() };
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = (&t[..split], t[split..].trim());
    if num.is_empty() {
        return Err(bad("no number"));
    }
    let mul: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kib" => 1 << 10,
        "m" | "mib" => 1 << 20,
        "g" | "gib" => 1 << 30,
        "t" | "tib" => 1 << 40,
        "kb" => 1_000,
        "mb" => 1_000_000,
        "gb" => 1_000_000_000,
        "tb" => 1_000_000_000_000,
        _ => return Err(bad("unknown unit")),
    };
    let bytes = if num.contains('.') {
        let x: f64 = num.parse().map_err(|_| bad("not a number"))?;
        let b = (x * mul as f64).round();
        if !(b.is_finite() && b < u64::MAX as f64) {
            return Err(bad("too large"));
        }
        b as u64
    } else {
        num.parse::<u64>().map_err(|_| bad("too large"))?.checked_mul(mul).ok_or_else(|| bad("too large"))?
    };
    if bytes == 0 {
        return Err(bad("a budget must be positive"));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_cases() {
        assert_eq!(Budget::parse("48MiB").unwrap(), Budget::Bytes(48 << 20));
        assert_eq!(Budget::parse("64M").unwrap(), Budget::Bytes(64 << 20));
        assert_eq!(Budget::parse("1.5GiB").unwrap(), Budget::Bytes(3 << 29));
        assert_eq!(Budget::parse("123456").unwrap(), Budget::Bytes(123456));
        assert_eq!(Budget::parse("50%").unwrap(), Budget::Percent(50.0));
        assert_eq!(Budget::parse(" 12.5 % ").unwrap(), Budget::Percent(12.5));
        assert_eq!(Budget::parse("150%").unwrap(), Budget::Percent(150.0));
        assert_eq!(Budget::parse("2g").unwrap(), Budget::Bytes(2 << 30));
        assert_eq!(Budget::parse("3MB").unwrap(), Budget::Bytes(3_000_000));
        assert_eq!(Budget::parse("4096B").unwrap(), Budget::Bytes(4096));
        for bad in [
            "",
            "MiB",
            "abc",
            "-5M",
            "5X",
            "0",
            "0%",
            "-3%",
            "x%",
            "1.2.3M",
            "99999999999999999999T",
            "20000%",
        ] {
            match Budget::parse(bad) {
                Err(PlanError::BadBudget { input, .. }) => assert_eq!(input, bad),
                other => panic!("{bad:?}: expected BadBudget, got {other:?}"),
            }
        }
    }

    #[test]
    fn percent_is_of_the_source_file() {
        assert_eq!(Budget::Percent(50.0).bytes(98_362_432), 49_181_216);
        assert_eq!(Budget::Percent(150.0).bytes(1000), 1500);
        assert_eq!(Budget::Bytes(77).bytes(1000), 77);
        assert_eq!("80%".parse::<Budget>().unwrap().bytes(1000), 800);
    }
}
