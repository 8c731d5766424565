//! TEMPORARY stand-in for `qs_core::indicators` (the agreed API in notes/ind-api.md) until the
//! `ind-core` branch lands; only `sma(n)`. Deleted at the merge.
#![allow(missing_docs)]

use std::collections::VecDeque;
use std::fmt;

use crate::market::Kline;

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Spec {
    n: usize,
}

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct SpecError(String);

#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct CheckpointError(String);

impl Spec {
    pub fn parse(s: &str) -> Result<Spec, SpecError> {
        let t: String = s.chars().filter(|c| !c.is_whitespace()).collect();
        let t = t.to_ascii_lowercase();
        let n = t
            .strip_prefix("sma(")
            .and_then(|r| r.strip_suffix(')'))
            .ok_or_else(|| SpecError(format!("unknown indicator {s:?}")))?
            .parse::<usize>()
            .map_err(|_| SpecError(format!("bad parameter in {s:?}")))?;
        if n < 1 {
            return Err(SpecError("sma: n must be >= 1".into()));
        }
        Ok(Spec { n })
    }
    pub fn outputs(&self) -> &'static [&'static str] {
        &["value"]
    }
    pub fn lookback(&self) -> usize {
        self.n - 1
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "sma({})", self.n)
    }
}

pub fn parse_list(s: &str) -> Result<Vec<Spec>, SpecError> {
    let mut out: Vec<Spec> = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let spec = Spec::parse(part)?;
        if !out.contains(&spec) {
            out.push(spec);
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
    pub quote_volume: f64,
}

impl Bar {
    pub fn from_kline(k: &Kline) -> Bar {
        let f = |d: crate::market::Decimal| d.to_string().parse::<f64>().unwrap_or(f64::NAN);
        Bar {
            open: f(k.open),
            high: f(k.high),
            low: f(k.low),
            close: f(k.close),
            volume: f(k.volume),
            quote_volume: f(k.quote_volume),
        }
    }
}

#[derive(Debug, Clone)]
pub struct Indicator {
    spec: Spec,
    window: VecDeque<f64>,
    seen: u64,
}

impl Indicator {
    pub fn new(spec: &Spec) -> Indicator {
        Indicator {
            spec: spec.clone(),
            window: VecDeque::new(),
            seen: 0,
        }
    }
    pub fn spec(&self) -> &Spec {
        &self.spec
    }
    pub fn update(&mut self, bar: &Bar, out: &mut [f64]) -> bool {
        self.seen += 1;
        self.window.push_back(bar.close);
        if self.window.len() > self.spec.n {
            self.window.pop_front();
        }
        if self.window.len() == self.spec.n {
            out[0] = self.window.iter().sum::<f64>() / self.spec.n as f64;
            true
        } else {
            out[0] = f64::NAN;
            false
        }
    }
    pub fn bars_seen(&self) -> u64 {
        self.seen
    }
    pub fn checkpoint(&self) -> String {
        let mut s = format!("{}", self.seen);
        for v in &self.window {
            s.push_str(&format!(":{:x}", v.to_bits()));
        }
        s
    }
    pub fn restore(spec: &Spec, checkpoint: &str) -> Result<Indicator, CheckpointError> {
        let mut parts = checkpoint.split(':');
        let seen = parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| CheckpointError("bad checkpoint".into()))?;
        let window = parts
            .map(|p| u64::from_str_radix(p, 16).map(f64::from_bits))
            .collect::<Result<VecDeque<f64>, _>>()
            .map_err(|_| CheckpointError("bad checkpoint".into()))?;
        Ok(Indicator {
            spec: spec.clone(),
            window,
            seen,
        })
    }
}

pub fn batch(spec: &Spec, bars: &[Bar]) -> Vec<Vec<f64>> {
    let mut ind = Indicator::new(spec);
    let mut outs = vec![Vec::with_capacity(bars.len()); spec.outputs().len()];
    let mut buf = vec![f64::NAN; spec.outputs().len()];
    for b in bars {
        ind.update(b, &mut buf);
        for (o, v) in outs.iter_mut().zip(&buf) {
            o.push(*v);
        }
    }
    outs
}
