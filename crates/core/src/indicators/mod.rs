//! Technical indicators, TA-Lib-exact: specs (`macd(12,26,9)`), the incremental per-series
//! state ([`Indicator`]), its checkpoint codec and the batch path over a whole series.
//!
//! One definition per indicator: `update` and `batch` run the same per-kind `step`, so batch
//! values are bit-identical to feeding the bars one by one. The 13 TA-Lib kinds follow TA-Lib
//! 0.8.1's C code (default compatibility, unstable period 0): same seeding, same warm-up (the
//! first value at index `lookback()`), same operation order in running sums and the same zero
//! tests (exact or relative to the operands' scale, so 1e-8-priced instruments work).
//! `vwap(n)` and `donchian(n)`, which TA-Lib lacks, are defined in their state's doc.

mod fast;
mod kernels;
mod spec;

pub use spec::{parse_list, parse_list_lenient, Kind, Spec, SpecError, MAX_PERIOD};

use crate::market::{Decimal, Kline};
use kernels::Visit;

/// One spec of every kind, with TA-Lib's default parameters: the set the benchmarks measure
/// and the tests cover first.
pub const STANDARD_SET: [&str; 15] = [
    "sma(20)",
    "ema(20)",
    "wma(20)",
    "rsi(14)",
    "macd(12,26,9)",
    "bbands(20,2,2)",
    "atr(14)",
    "stoch(14,3,3)",
    "obv",
    "cci(20)",
    "adx(14)",
    "mfi(14)",
    "willr(14)",
    "vwap(20)",
    "donchian(20)",
];

/// One closed candle's inputs as f64 (converted once from the stored exact decimals).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Bar {
    pub open: f64,
    pub high: f64,
    pub low: f64,
    pub close: f64,
    pub volume: f64,
    pub quote_volume: f64,
}

/// The f64 nearest to the exact decimal (what parsing its text gives).
fn dec_to_f64(d: Decimal) -> f64 {
    let m = d.mantissa();
    if m.unsigned_abs() < (1u128 << 53) {
        // Both operands exact, so the one division rounds correctly.
        m as f64 / 1e8
    } else {
        d.to_string().parse().unwrap_or(m as f64 / 1e8)
    }
}

impl Bar {
    pub fn from_kline(k: &Kline) -> Bar {
        Bar {
            open: dec_to_f64(k.open),
            high: dec_to_f64(k.high),
            low: dec_to_f64(k.low),
            close: dec_to_f64(k.close),
            volume: dec_to_f64(k.volume),
            quote_volume: dec_to_f64(k.quote_volume),
        }
    }

    /// A bar whose every price is `x` (for series of closes only, as TA-Lib's single-input
    /// functions take).
    pub fn from_close(x: f64) -> Bar {
        Bar {
            open: x,
            high: x,
            low: x,
            close: x,
            volume: 0.0,
            quote_volume: 0.0,
        }
    }
}

/// Why a checkpoint could not be restored.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint is for {found:?}, not {expected:?}")]
    SpecMismatch { expected: String, found: String },
    #[error("malformed checkpoint: {0}")]
    Malformed(&'static str),
}

#[derive(Debug, Clone)]
enum State {
    Sma(kernels::Sma),
    Ema(kernels::Ema),
    Wma(kernels::Wma),
    Rsi(kernels::Rsi),
    Macd(kernels::Macd),
    Bbands(kernels::Bbands),
    Atr(kernels::Atr),
    Stoch(kernels::Stoch),
    Obv(kernels::Obv),
    Cci(kernels::Cci),
    Adx(kernels::Adx),
    Mfi(kernels::Mfi),
    Willr(kernels::Willr),
    Vwap(kernels::Vwap),
    Donchian(kernels::Donchian),
}

/// The incremental state of one indicator over one series. Clone = a checkpoint in memory.
/// All buffers are allocated in `new`; `update` never allocates.
#[derive(Debug, Clone)]
pub struct Indicator {
    spec: Spec,
    seen: u64,
    state: State,
}

impl Indicator {
    pub fn new(spec: &Spec) -> Indicator {
        let p = |i| spec.int(i);
        let state = match spec.kind() {
            Kind::Sma => State::Sma(kernels::Sma::new(p(0))),
            Kind::Ema => State::Ema(kernels::Ema::new(p(0))),
            Kind::Wma => State::Wma(kernels::Wma::new(p(0))),
            Kind::Rsi => State::Rsi(kernels::Rsi::new(p(0))),
            Kind::Macd => State::Macd(kernels::Macd::new(p(0), p(1), p(2))),
            Kind::Bbands => State::Bbands(kernels::Bbands::new(p(0), spec.float(0), spec.float(1))),
            Kind::Atr => State::Atr(kernels::Atr::new(p(0))),
            Kind::Stoch => State::Stoch(kernels::Stoch::new(p(0), p(1), p(2))),
            Kind::Obv => State::Obv(kernels::Obv::new()),
            Kind::Cci => State::Cci(kernels::Cci::new(p(0))),
            Kind::Adx => State::Adx(kernels::Adx::new(p(0))),
            Kind::Mfi => State::Mfi(kernels::Mfi::new(p(0))),
            Kind::Willr => State::Willr(kernels::Willr::new(p(0))),
            Kind::Vwap => State::Vwap(kernels::Vwap::new(p(0))),
            Kind::Donchian => State::Donchian(kernels::Donchian::new(p(0))),
        };
        Indicator {
            spec: spec.clone(),
            seen: 0,
            state,
        }
    }

    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Advances by one closed candle; writes the outputs (in `spec.outputs()` order) into
    /// `out` and returns true when they are defined (bar index >= lookback); false during the
    /// warm-up, `out` then set to NaN. Never allocates.
    ///
    /// # Panics
    /// If `out.len() < spec.outputs().len()`.
    #[inline]
    pub fn update(&mut self, bar: &Bar, out: &mut [f64]) -> bool {
        let t = self.seen;
        self.seen += 1;
        let ok = match &mut self.state {
            State::Sma(s) => s.step_x(t, bar.close, out),
            State::Ema(s) => s.step_x(t, bar.close, out),
            State::Wma(s) => s.step_x(t, bar.close, out),
            State::Rsi(s) => s.step_x(t, bar.close, out),
            State::Macd(s) => s.step_x(t, bar.close, out),
            State::Bbands(s) => s.step_x(t, bar.close, out),
            State::Atr(s) => s.step(t, bar, out),
            State::Stoch(s) => s.step(t, bar, out),
            State::Obv(s) => s.step(t, bar, out),
            State::Cci(s) => s.step(t, bar, out),
            State::Adx(s) => s.step(t, bar, out),
            State::Mfi(s) => s.step(t, bar, out),
            State::Willr(s) => s.step(t, bar, out),
            State::Vwap(s) => s.step(t, bar, out),
            State::Donchian(s) => s.step(t, bar, out),
        };
        if !ok {
            let n = self.spec.outputs().len();
            out[..n].fill(f64::NAN);
        }
        ok
    }

    /// Bars consumed so far.
    pub fn bars_seen(&self) -> u64 {
        self.seen
    }

    fn visit(&mut self, v: &mut impl Visit) {
        v.u(&mut self.seen);
        match &mut self.state {
            State::Sma(s) => s.visit(v),
            State::Ema(s) => s.visit(v),
            State::Wma(s) => s.visit(v),
            State::Rsi(s) => s.visit(v),
            State::Macd(s) => s.visit(v),
            State::Bbands(s) => s.visit(v),
            State::Atr(s) => s.visit(v),
            State::Stoch(s) => s.visit(v),
            State::Obv(s) => s.visit(v),
            State::Cci(s) => s.visit(v),
            State::Adx(s) => s.visit(v),
            State::Mfi(s) => s.visit(v),
            State::Willr(s) => s.visit(v),
            State::Vwap(s) => s.visit(v),
            State::Donchian(s) => s.visit(v),
        }
    }

    /// Serialises the exact state as `v1|<spec>|<hex words>`: every field as a 16-digit hex
    /// word (f64 as its bit pattern), so `restore` gives back a state whose future outputs are
    /// bit-identical. About 17 characters per field (a 20-bar window ≈ 360 characters).
    pub fn checkpoint(&self) -> String {
        let mut w = Writer(String::new());
        let mut copy = self.clone();
        copy.visit(&mut w);
        format!("v1|{}|{}", self.spec, w.0)
    }

    /// Rebuilds the state `checkpoint` wrote, for `spec` (which must be the spec it was
    /// written for).
    pub fn restore(spec: &Spec, checkpoint: &str) -> Result<Indicator, CheckpointError> {
        let mut parts = checkpoint.splitn(3, '|');
        if parts.next() != Some("v1") {
            return Err(CheckpointError::Malformed("expected version v1"));
        }
        let found = parts.next().ok_or(CheckpointError::Malformed("no spec"))?;
        let expected = spec.to_string();
        if found != expected {
            return Err(CheckpointError::SpecMismatch {
                expected,
                found: found.to_string(),
            });
        }
        let words = parts.next().ok_or(CheckpointError::Malformed("no state"))?;
        let mut ind = Indicator::new(spec);
        let mut r = Reader {
            s: words.as_bytes(),
            err: None,
        };
        ind.visit(&mut r);
        if let Some(e) = r.err {
            return Err(CheckpointError::Malformed(e));
        }
        if !r.s.is_empty() {
            return Err(CheckpointError::Malformed("trailing data"));
        }
        Ok(ind)
    }
}

struct Writer(String);

impl Writer {
    fn word(&mut self, x: u64) {
        use std::fmt::Write;
        let _ = write!(self.0, "{x:016x}");
    }
}

impl Visit for Writer {
    fn f(&mut self, x: &mut f64) {
        self.word(x.to_bits());
    }
    fn u(&mut self, x: &mut u64) {
        self.word(*x);
    }
    fn idx(&mut self, x: &mut usize, _len: usize) {
        self.word(*x as u64);
    }
    fn fs(&mut self, v: &mut [f64]) {
        for x in v {
            self.word(x.to_bits());
        }
    }
}

struct Reader<'a> {
    s: &'a [u8],
    err: Option<&'static str>,
}

impl Reader<'_> {
    fn word(&mut self) -> u64 {
        if self.err.is_some() {
            return 0;
        }
        if self.s.len() < 16 {
            self.err = Some("truncated");
            return 0;
        }
        let (head, rest) = self.s.split_at(16);
        self.s = rest;
        let parsed = std::str::from_utf8(head)
            .ok()
            .and_then(|h| u64::from_str_radix(h, 16).ok());
        match parsed {
            Some(v) => v,
            None => {
                self.err = Some("not hexadecimal");
                0
            }
        }
    }
}

impl Visit for Reader<'_> {
    fn f(&mut self, x: &mut f64) {
        *x = f64::from_bits(self.word());
    }
    fn u(&mut self, x: &mut u64) {
        *x = self.word();
    }
    fn idx(&mut self, x: &mut usize, len: usize) {
        let w = self.word();
        if w >= len as u64 {
            self.err.get_or_insert("ring index out of range");
        } else {
            *x = w as usize;
        }
    }
    fn fs(&mut self, v: &mut [f64]) {
        for x in v {
            *x = f64::from_bits(self.word());
        }
    }
}

/// Runs one state over a whole series, writing the defined rows into `cols`.
macro_rules! run {
    ($bars:expr, $cols:expr, $k:expr, |$t:ident, $b:ident, $o:ident| $call:expr) => {{
        let mut $o = [f64::NAN; 3];
        for ($t, $b) in $bars.iter().enumerate() {
            let $t = $t as u64;
            if $call {
                for j in 0..$k {
                    $cols[j][$t as usize] = $o[j];
                }
            }
        }
    }};
}

/// Batch over a whole series: one Vec per output (in `spec.outputs()` order), NaN in the
/// warm-up. Runs the same `step` as [`Indicator::update`] (the per-kind dispatch hoisted out
/// of the loop), so the values are bit-identical to feeding the bars one by one.
pub fn batch(spec: &Spec, bars: &[Bar]) -> Vec<Vec<f64>> {
    let k = spec.outputs().len();
    let mut cols = vec![vec![f64::NAN; bars.len()]; k];
    let mut ind = Indicator::new(spec);
    match &mut ind.state {
        State::Sma(s) => run!(bars, cols, k, |t, b, o| s.step_x(t, b.close, &mut o)),
        State::Ema(s) => run!(bars, cols, k, |t, b, o| s.step_x(t, b.close, &mut o)),
        State::Wma(s) => run!(bars, cols, k, |t, b, o| s.step_x(t, b.close, &mut o)),
        State::Rsi(s) => run!(bars, cols, k, |t, b, o| s.step_x(t, b.close, &mut o)),
        State::Macd(s) => run!(bars, cols, k, |t, b, o| s.step_x(t, b.close, &mut o)),
        State::Bbands(s) => run!(bars, cols, k, |t, b, o| s.step_x(t, b.close, &mut o)),
        State::Atr(s) => run!(bars, cols, k, |t, b, o| s.step(t, b, &mut o)),
        State::Stoch(s) => run!(bars, cols, k, |t, b, o| s.step(t, b, &mut o)),
        State::Obv(s) => run!(bars, cols, k, |t, b, o| s.step(t, b, &mut o)),
        State::Cci(s) => run!(bars, cols, k, |t, b, o| s.step(t, b, &mut o)),
        State::Adx(s) => run!(bars, cols, k, |t, b, o| s.step(t, b, &mut o)),
        State::Mfi(s) => run!(bars, cols, k, |t, b, o| s.step(t, b, &mut o)),
        State::Willr(s) => run!(bars, cols, k, |t, b, o| s.step(t, b, &mut o)),
        State::Vwap(s) => run!(bars, cols, k, |t, b, o| s.step(t, b, &mut o)),
        State::Donchian(s) => run!(bars, cols, k, |t, b, o| s.step(t, b, &mut o)),
    }
    cols
}

/// Batch over a series of closes for the kinds that read only the close (`sma`, `ema`, `wma`,
/// `rsi`, `macd`, `bbands`), as TA-Lib's single-input functions take; `None` for the others.
/// Equal to `update` with `Bar::from_close` on every value, bit for bit: SMA, EMA, RSI, MACD
/// and BBANDS run dedicated slice kernels (fast.rs, the same operations in the same order,
/// proven equal by a test), WMA the incremental step.
pub fn batch_closes(spec: &Spec, closes: &[f64]) -> Option<Vec<Vec<f64>>> {
    let mut cols = Vec::new();
    batch_closes_into(spec, closes, &mut cols).then_some(cols)
}

/// [`batch_closes`] into caller-owned columns, reusing their allocations (one Vec per output,
/// resized to `closes.len()`). Returns false (and leaves `cols` alone) for kinds that read more
/// than the close.
pub fn batch_closes_into(spec: &Spec, closes: &[f64], cols: &mut Vec<Vec<f64>>) -> bool {
    let p = |i| spec.int(i);
    let k = spec.outputs().len();
    match spec.kind() {
        Kind::Sma | Kind::Ema | Kind::Rsi | Kind::Macd | Kind::Bbands | Kind::Wma => {}
        _ => return false,
    }
    cols.resize_with(k, Vec::new);
    match spec.kind() {
        Kind::Sma => fast::sma(closes, p(0), cols),
        Kind::Ema => fast::ema(closes, p(0), cols),
        Kind::Rsi => fast::rsi(closes, p(0), cols),
        Kind::Macd => fast::macd(closes, p(0), p(1), p(2), cols),
        Kind::Bbands => fast::bbands(closes, p(0), spec.float(0), spec.float(1), cols),
        _ => {
            let col = &mut cols[0];
            col.clear();
            col.resize(closes.len(), f64::NAN);
            let mut s = kernels::Wma::new(p(0));
            run!(closes, cols, 1, |t, x, o| s.step_x(t, *x, &mut o));
        }
    }
    true
}

#[cfg(test)]
mod tests;
