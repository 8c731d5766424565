//! Indicator specs: parsing, validation and the normalised text form (`macd(12,26,9)`), plus
//! each kind's outputs and TA-Lib lookback.

use std::fmt;
use std::str::FromStr;

/// The largest period TA-Lib accepts (its `optInTimePeriod` range ends at 100000).
pub const MAX_PERIOD: u32 = 100_000;

/// TA-Lib's bound on BBANDS' deviation multipliers.
const MAX_DEV: f64 = 3e37;

/// Why a spec was refused; every message names the spec and the rule that failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SpecError {
    #[error("empty indicator spec")]
    Empty,
    #[error("{spec:?}: {why}")]
    Syntax { spec: String, why: &'static str },
    #[error("{spec:?}: unknown indicator {name:?} (known: sma, ema, wma, rsi, macd, bbands, atr, stoch, obv, cci, adx, mfi, willr, vwap, donchian)")]
    UnknownKind { spec: String, name: String },
    #[error("{spec:?}: {kind} takes {expected} parameter(s) ({names}), got {got}")]
    Arity {
        spec: String,
        kind: &'static str,
        expected: usize,
        names: &'static str,
        got: usize,
    },
    #[error("{spec:?}: {param} must be an integer, got {got:?}")]
    NotInteger {
        spec: String,
        param: &'static str,
        got: String,
    },
    #[error("{spec:?}: {param} must be a finite number, got {got:?}")]
    NotNumber {
        spec: String,
        param: &'static str,
        got: String,
    },
    #[error("{spec:?}: {param} must be from {min} to {max}, got {got}")]
    OutOfRange {
        spec: String,
        param: &'static str,
        min: String,
        max: String,
        got: String,
    },
    #[error("{spec:?}: the fast period ({fast}) must be less than the slow period ({slow})")]
    FastNotBelowSlow { spec: String, fast: u32, slow: u32 },
}

/// The indicator kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Sma,
    Ema,
    Wma,
    Rsi,
    Macd,
    Bbands,
    Atr,
    Stoch,
    Obv,
    Cci,
    Adx,
    Mfi,
    Willr,
    Vwap,
    Donchian,
}

/// Static facts of a kind: parameter names, the smallest value of each integer parameter,
/// how many leading parameters are integers (the rest are floats) and the output names.
struct KindInfo {
    name: &'static str,
    params: &'static [&'static str],
    names: &'static str,
    min: &'static [u32],
    ints: usize,
    outputs: &'static [&'static str],
}

const VALUE: &[&str] = &["value"];

impl Kind {
    pub const ALL: [Kind; 15] = [
        Kind::Sma,
        Kind::Ema,
        Kind::Wma,
        Kind::Rsi,
        Kind::Macd,
        Kind::Bbands,
        Kind::Atr,
        Kind::Stoch,
        Kind::Obv,
        Kind::Cci,
        Kind::Adx,
        Kind::Mfi,
        Kind::Willr,
        Kind::Vwap,
        Kind::Donchian,
    ];

    fn info(self) -> &'static KindInfo {
        const fn one(name: &'static str, min: u32) -> KindInfo {
            KindInfo {
                name,
                params: &["period"],
                names: "period",
                min: if min == 1 { &[1] } else { &[2] },
                ints: 1,
                outputs: VALUE,
            }
        }
        static SMA: KindInfo = one("sma", 2);
        static EMA: KindInfo = one("ema", 2);
        static WMA: KindInfo = one("wma", 2);
        static RSI: KindInfo = one("rsi", 2);
        static ATR: KindInfo = one("atr", 1);
        static CCI: KindInfo = one("cci", 2);
        static ADX: KindInfo = one("adx", 2);
        static MFI: KindInfo = one("mfi", 2);
        static WILLR: KindInfo = one("willr", 2);
        static VWAP: KindInfo = one("vwap", 1);
        static MACD: KindInfo = KindInfo {
            name: "macd",
            params: &["fast", "slow", "signal"],
            names: "fast, slow, signal",
            min: &[2, 2, 1],
            ints: 3,
            outputs: &["macd", "signal", "hist"],
        };
        static BBANDS: KindInfo = KindInfo {
            name: "bbands",
            params: &["period", "up", "down"],
            names: "period, up, down",
            min: &[2],
            ints: 1,
            outputs: &["upper", "middle", "lower"],
        };
        static STOCH: KindInfo = KindInfo {
            name: "stoch",
            params: &["fastk", "slowk", "slowd"],
            names: "fastk, slowk, slowd",
            min: &[1, 1, 1],
            ints: 3,
            outputs: &["k", "d"],
        };
        static OBV: KindInfo = KindInfo {
            name: "obv",
            params: &[],
            names: "none",
            min: &[],
            ints: 0,
            outputs: VALUE,
        };
        static DONCHIAN: KindInfo = KindInfo {
            name: "donchian",
            params: &["period"],
            names: "period",
            min: &[1],
            ints: 1,
            outputs: &["upper", "lower"],
        };
        match self {
            Kind::Sma => &SMA,
            Kind::Ema => &EMA,
            Kind::Wma => &WMA,
            Kind::Rsi => &RSI,
            Kind::Macd => &MACD,
            Kind::Bbands => &BBANDS,
            Kind::Atr => &ATR,
            Kind::Stoch => &STOCH,
            Kind::Obv => &OBV,
            Kind::Cci => &CCI,
            Kind::Adx => &ADX,
            Kind::Mfi => &MFI,
            Kind::Willr => &WILLR,
            Kind::Vwap => &VWAP,
            Kind::Donchian => &DONCHIAN,
        }
    }

    /// The lower-case name used in specs (`macd`).
    pub fn as_str(self) -> &'static str {
        self.info().name
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A normalised indicator spec: `macd(12,26,9)`. Display prints the normalised form, which is
/// also what `parse` gives back for it (a round trip).
///
/// Integer parameters live in `ints` (unused slots 0); BBANDS' float multipliers live in
/// `floats` as f64 bit patterns (so that Eq/Hash/Ord are total), `-0` normalised to `0`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Spec {
    kind: Kind,
    ints: [u32; 3],
    floats: [u64; 2],
}

impl Spec {
    /// Parses and validates a spec: case and spaces are ignored (`MACD(12, 26, 9)` →
    /// `macd(12,26,9)`); `obv` takes no parameters (`obv` or `obv()`). Parameter ranges are
    /// TA-Lib's (periods up to 100000; most periods from 2, `atr`, `stoch`'s three, `macd`'s
    /// signal, `vwap` and `donchian` from 1); `macd` needs fast < slow; `bbands(n,up,down)`
    /// takes finite multipliers.
    pub fn parse(s: &str) -> Result<Spec, SpecError> {
        let spec = s.trim();
        if spec.is_empty() {
            return Err(SpecError::Empty);
        }
        let syntax = |why| SpecError::Syntax {
            spec: spec.to_string(),
            why,
        };
        let (name, args) = match spec.find('(') {
            Some(open) => {
                let rest = &spec[open + 1..];
                let Some(body) = rest.strip_suffix(')') else {
                    return Err(syntax("expected name(parameters) ending with ')'"));
                };
                if body.contains(['(', ')']) {
                    return Err(syntax("nested parentheses"));
                }
                (&spec[..open], Some(body))
            }
            None if spec.contains(')') => return Err(syntax("')' without '('")),
            None => (spec, None),
        };
        let name = name.trim().to_ascii_lowercase();
        let Some(kind) = Kind::ALL.iter().copied().find(|k| k.as_str() == name) else {
            return Err(SpecError::UnknownKind {
                spec: spec.to_string(),
                name,
            });
        };
        let info = kind.info();
        let args: Vec<&str> = match args {
            None => Vec::new(),
            Some(b) if b.trim().is_empty() => Vec::new(),
            Some(b) => b.split(',').map(str::trim).collect(),
        };
        if args.len() != info.params.len() {
            return Err(SpecError::Arity {
                spec: spec.to_string(),
                kind: info.name,
                expected: info.params.len(),
                names: info.names,
                got: args.len(),
            });
        }
        let mut out = Spec {
            kind,
            ints: [0; 3],
            floats: [0; 2],
        };
        for (i, arg) in args.iter().enumerate() {
            let param = info.params[i];
            if i < info.ints {
                let v: u64 = if !arg.is_empty() && arg.bytes().all(|b| b.is_ascii_digit()) {
                    arg.parse().unwrap_or(u64::MAX)
                } else {
                    return Err(SpecError::NotInteger {
                        spec: spec.to_string(),
                        param,
                        got: arg.to_string(),
                    });
                };
                let min = info.min[i];
                if v < u64::from(min) || v > u64::from(MAX_PERIOD) {
                    return Err(SpecError::OutOfRange {
                        spec: spec.to_string(),
                        param,
                        min: min.to_string(),
                        max: MAX_PERIOD.to_string(),
                        got: arg.to_string(),
                    });
                }
                out.ints[i] = v as u32;
            } else {
                let v: f64 = match arg.parse::<f64>() {
                    Ok(v) if v.is_finite() => v,
                    _ => {
                        return Err(SpecError::NotNumber {
                            spec: spec.to_string(),
                            param,
                            got: arg.to_string(),
                        })
                    }
                };
                if v.abs() > MAX_DEV {
                    return Err(SpecError::OutOfRange {
                        spec: spec.to_string(),
                        param,
                        min: format!("-{MAX_DEV}"),
                        max: format!("{MAX_DEV}"),
                        got: arg.to_string(),
                    });
                }
                let v = if v == 0.0 { 0.0 } else { v };
                out.floats[i - info.ints] = v.to_bits();
            }
        }
        if kind == Kind::Macd && out.ints[0] >= out.ints[1] {
            return Err(SpecError::FastNotBelowSlow {
                spec: spec.to_string(),
                fast: out.ints[0],
                slow: out.ints[1],
            });
        }
        Ok(out)
    }

    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// Integer parameter `i` (0-based) as usize; 0 for an unused slot.
    pub(crate) fn int(&self, i: usize) -> usize {
        self.ints[i] as usize
    }

    /// Float parameter `i` (0-based among the float parameters).
    pub(crate) fn float(&self, i: usize) -> f64 {
        f64::from_bits(self.floats[i])
    }

    /// The output names, in the order `update` and `batch` give them.
    pub fn outputs(&self) -> &'static [&'static str] {
        self.kind.info().outputs
    }

    /// TA-Lib's lookback: the index of the first defined value (the number of warm-up bars).
    pub fn lookback(&self) -> usize {
        let p = |i| self.int(i);
        match self.kind {
            Kind::Sma | Kind::Ema | Kind::Wma | Kind::Bbands | Kind::Cci | Kind::Willr => p(0) - 1,
            Kind::Vwap | Kind::Donchian => p(0) - 1,
            Kind::Rsi | Kind::Atr | Kind::Mfi => p(0),
            Kind::Macd => (p(1) - 1) + (p(2) - 1),
            Kind::Stoch => (p(0) - 1) + (p(1) - 1) + (p(2) - 1),
            Kind::Obv => 0,
            Kind::Adx => 2 * p(0) - 1,
        }
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let info = self.kind.info();
        f.write_str(info.name)?;
        if info.params.is_empty() {
            return Ok(());
        }
        f.write_str("(")?;
        for i in 0..info.params.len() {
            if i > 0 {
                f.write_str(",")?;
            }
            if i < info.ints {
                write!(f, "{}", self.ints[i])?;
            } else {
                // Rust prints the shortest round-tripping form: 2.0 → "2", 2.5 → "2.5".
                write!(f, "{}", self.float(i - info.ints))?;
            }
        }
        f.write_str(")")
    }
}

impl FromStr for Spec {
    type Err = SpecError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Spec::parse(s)
    }
}

/// Splits a list at the commas outside parentheses; blank items are skipped.
fn split_list(s: &str) -> Vec<&str> {
    let mut items = Vec::new();
    let mut depth = 0i32;
    let mut start = 0;
    for (i, c) in s.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ',' if depth <= 0 => {
                items.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    items.push(&s[start..]);
    items.into_iter().filter(|i| !i.trim().is_empty()).collect()
}

/// Parses a comma-separated list as stored in `trading_pairs.indicators`
/// (`"rsi(14),macd(12,26,9)"`; commas inside parentheses belong to the spec). An empty or blank
/// string is the empty list; blank items are skipped; duplicates (after normalising) are
/// removed, the first occurrence wins. The first bad item fails the whole list; see
/// [`parse_list_lenient`] for per-item results.
pub fn parse_list(s: &str) -> Result<Vec<Spec>, SpecError> {
    let mut out: Vec<Spec> = Vec::new();
    for item in split_list(s) {
        let spec = Spec::parse(item)?;
        if !out.contains(&spec) {
            out.push(spec);
        }
    }
    Ok(out)
}

/// Like [`parse_list`], but keeps going: the good specs (deduplicated, in order) and the error of
/// every bad item, so one bad spec blocks nothing else.
pub fn parse_list_lenient(s: &str) -> (Vec<Spec>, Vec<SpecError>) {
    let mut good: Vec<Spec> = Vec::new();
    let mut bad = Vec::new();
    for item in split_list(s) {
        match Spec::parse(item) {
            Ok(spec) if !good.contains(&spec) => good.push(spec),
            Ok(_) => {}
            Err(e) => bad.push(e),
        }
    }
    (good, bad)
}
