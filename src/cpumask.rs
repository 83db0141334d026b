//! CPU masks as SPDK writes them: hex (`0x3`, `3`) or a list (`[0,1]`, `[0-3]`).

use std::fmt;

/// A set of CPU cores (up to 1024), as given to `-m/--cpumask` and `--cpumask` of controllers.
#[derive(Clone, PartialEq, Eq, Default)]
pub struct CpuMask {
    bits: Vec<u64>,
}

/// Why a cpumask string was rejected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CpuMaskError {
    #[error("cpumask '{0}' is not hex (0x3) nor a list ([0,1], [0-3])")]
    Syntax(String),
    #[error("cpumask '{0}' selects no core")]
    Empty(String),
    #[error("cpumask '{0}' names a core above {MAX_CORES}")]
    TooLarge(String),
}

const MAX_CORES: usize = 1024;

impl CpuMask {
    /// Parses SPDK's cpumask syntax (`spdk_cpuset_parse`): hex with or without `0x`, or a
    /// bracketed list of cores and ranges.
    pub fn parse(s: &str) -> Result<Self, CpuMaskError> {
        let t = s.trim();
        let mut mask = CpuMask::default();
        if let Some(list) = t.strip_prefix('[') {
            let list = list
                .strip_suffix(']')
                .ok_or_else(|| CpuMaskError::Syntax(s.into()))?;
            for item in list.split(',').map(str::trim).filter(|i| !i.is_empty()) {
                let (lo, hi) = match item.split_once('-') {
                    Some((a, b)) => (parse_core(a, s)?, parse_core(b, s)?),
                    None => {
                        let c = parse_core(item, s)?;
                        (c, c)
                    }
                };
                if lo > hi {
                    return Err(CpuMaskError::Syntax(s.into()));
                }
                for c in lo..=hi {
                    mask.set(c);
                }
            }
        } else {
            let hex = t
                .strip_prefix("0x")
                .or_else(|| t.strip_prefix("0X"))
                .unwrap_or(t);
            if hex.is_empty() || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(CpuMaskError::Syntax(s.into()));
            }
            for (i, ch) in hex.bytes().rev().enumerate() {
                let nibble = (ch as char).to_digit(16).unwrap_or(0) as u64;
                for b in 0..4 {
                    if nibble & (1 << b) != 0 {
                        let core = i * 4 + b;
                        if core >= MAX_CORES {
                            return Err(CpuMaskError::TooLarge(s.into()));
                        }
                        mask.set(core);
                    }
                }
            }
        }
        if mask.is_empty() {
            return Err(CpuMaskError::Empty(s.into()));
        }
        Ok(mask)
    }

    /// A mask holding exactly these cores.
    pub fn from_cores(cores: impl IntoIterator<Item = usize>) -> Self {
        let mut m = CpuMask::default();
        for c in cores {
            m.set(c);
        }
        m
    }

    fn set(&mut self, core: usize) {
        let w = core / 64;
        if self.bits.len() <= w {
            self.bits.resize(w + 1, 0);
        }
        self.bits[w] |= 1 << (core % 64);
    }

    /// Whether `core` is in the mask.
    pub fn contains(&self, core: usize) -> bool {
        self.bits
            .get(core / 64)
            .is_some_and(|w| w & (1 << (core % 64)) != 0)
    }

    /// The cores, ascending.
    pub fn cores(&self) -> Vec<usize> {
        (0..self.bits.len() * 64)
            .filter(|&c| self.contains(c))
            .collect()
    }

    /// True when no core is selected.
    pub fn is_empty(&self) -> bool {
        self.bits.iter().all(|w| *w == 0)
    }

    /// Whether every core of `self` is also in `other`.
    pub fn is_subset_of(&self, other: &CpuMask) -> bool {
        self.cores().into_iter().all(|c| other.contains(c))
    }
}

impl fmt::Display for CpuMask {
    /// Hex with `0x`, as SPDK prints masks (`vhost_get_controllers`' `cpumask`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let top = self.bits.iter().rposition(|w| *w != 0);
        match top {
            None => write!(f, "0x0"),
            Some(top) => {
                write!(f, "0x{:x}", self.bits[top])?;
                for w in self.bits[..top].iter().rev() {
                    write!(f, "{w:016x}")?;
                }
                Ok(())
            }
        }
    }
}

impl fmt::Debug for CpuMask {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CpuMask({self})")
    }
}

fn parse_core(s: &str, whole: &str) -> Result<usize, CpuMaskError> {
    let c: usize = s
        .trim()
        .parse()
        .map_err(|_| CpuMaskError::Syntax(whole.into()))?;
    if c >= MAX_CORES {
        return Err(CpuMaskError::TooLarge(whole.into()));
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hex_and_lists() {
        assert_eq!(CpuMask::parse("0x3").unwrap().cores(), vec![0, 1]);
        assert_eq!(CpuMask::parse("3").unwrap().cores(), vec![0, 1]);
        assert_eq!(CpuMask::parse("[0,1]").unwrap().cores(), vec![0, 1]);
        assert_eq!(CpuMask::parse("[0-3]").unwrap().cores(), vec![0, 1, 2, 3]);
        assert_eq!(CpuMask::parse("[2, 5-6]").unwrap().cores(), vec![2, 5, 6]);
        assert_eq!(
            CpuMask::parse("0x10000000000000001").unwrap().cores(),
            vec![0, 64]
        );
        assert_eq!(CpuMask::parse("0x4").unwrap().to_string(), "0x4");
        assert_eq!(
            CpuMask::parse("[0,64]").unwrap().to_string(),
            "0x10000000000000001"
        );
    }

    #[test]
    fn rejects() {
        for bad in ["0xZZ", "", "0x", "[", "[1-0]", "[a]", "0x0", "[]", "[5000]"] {
            assert!(CpuMask::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn subset() {
        let app = CpuMask::parse("0x3").unwrap();
        assert!(CpuMask::parse("0x1").unwrap().is_subset_of(&app));
        assert!(!CpuMask::parse("0x4").unwrap().is_subset_of(&app));
    }
}
