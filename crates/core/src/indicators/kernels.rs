//! The per-kind incremental states: one `step` per indicator, written after TA-Lib 0.8.1's C
//! code (same operations in the same order, same seeding and zero tests), used by both the
//! online `update` and `batch`.

use super::Bar;

/// TA-Lib's `TA_EPSILON`.
const EPSILON: f64 = 1e-14;

/// TA-Lib's `TA_IS_ZERO_SCALED(v, scale)`: zero within 1e-14 of the operands' magnitude.
#[inline(always)]
fn zero_scaled(v: f64, scale: f64) -> bool {
    v.abs() <= EPSILON * scale
}

/// TA-Lib's `TA_IS_ZERO(v)`: the fixed band |v| < 1e-14, used on scale-free percentages.
#[inline(always)]
fn is_zero(v: f64) -> bool {
    -EPSILON < v && v < EPSILON
}

/// TA-Lib's `TRUE_RANGE`: max(h − l, |h − prev close|, |l − prev close|).
#[inline(always)]
fn true_range(h: f64, l: f64, prev_close: f64) -> f64 {
    let mut tr = h - l;
    let a = (h - prev_close).abs();
    if a > tr {
        tr = a;
    }
    let b = (l - prev_close).abs();
    if b > tr {
        tr = b;
    }
    tr
}

/// Walks a state's fields, to write them out (checkpoint) or read them back (restore) with one
/// description per state, so the two cannot disagree.
pub(crate) trait Visit {
    fn f(&mut self, x: &mut f64);
    fn u(&mut self, x: &mut u64);
    /// An index that must stay below `len`.
    fn idx(&mut self, x: &mut usize, len: usize);
    fn fs(&mut self, v: &mut [f64]);
}

/// A ring of the last `n` values; slot `t % n` holds bar `t` (TA-Lib's `CIRCBUF` order).
#[derive(Debug, Clone)]
pub(crate) struct Ring {
    buf: Vec<f64>,
    head: usize,
}

impl Ring {
    fn new(n: usize) -> Ring {
        Ring {
            buf: vec![0.0; n.max(1)],
            head: 0,
        }
    }

    /// Stores `x`; returns the oldest value of the window of `n` that ends with `x` (the slot
    /// that the next push overwrites).
    #[inline(always)]
    fn push(&mut self, x: f64) -> f64 {
        self.buf[self.head] = x;
        self.head += 1;
        if self.head == self.buf.len() {
            self.head = 0;
        }
        self.buf[self.head]
    }

    fn visit(&mut self, v: &mut impl Visit) {
        let len = self.buf.len();
        v.idx(&mut self.head, len);
        v.fs(&mut self.buf);
    }
}

/// TA-Lib's `TA_INT_SMA`: a running total, the newest added before the mean is taken and the
/// oldest subtracted after.
#[derive(Debug, Clone)]
pub(crate) struct Sma {
    n: f64,
    warm: u64,
    ring: Ring,
    total: f64,
}

impl Sma {
    pub(crate) fn new(n: usize) -> Sma {
        Sma {
            n: n as f64,
            warm: n as u64 - 1,
            ring: Ring::new(n),
            total: 0.0,
        }
    }

    /// `t` counts the values fed to this SMA (0-based).
    #[inline(always)]
    pub(crate) fn push(&mut self, t: u64, x: f64) -> Option<f64> {
        self.total += x;
        let oldest = self.ring.push(x);
        if t < self.warm {
            return None;
        }
        let v = self.total / self.n;
        self.total -= oldest;
        Some(v)
    }

    #[inline(always)]
    pub(crate) fn step_x(&mut self, t: u64, x: f64, out: &mut [f64]) -> bool {
        match self.push(t, x) {
            Some(v) => {
                out[0] = v;
                true
            }
            None => false,
        }
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        v.f(&mut self.total);
        self.ring.visit(v);
    }
}

/// An EMA seeded with the plain mean of its first `n` inputs (TA-Lib's `TA_INT_EMA`, default
/// compatibility), then `e = (x − e)·k + e` with k = 2/(n+1).
#[derive(Debug, Clone)]
pub(crate) struct EmaCore {
    n: f64,
    warm: u64,
    k: f64,
    acc: f64,
}

impl EmaCore {
    fn new(n: usize) -> EmaCore {
        EmaCore {
            n: n as f64,
            warm: n as u64 - 1,
            k: 2.0 / ((n + 1) as f64),
            acc: 0.0,
        }
    }

    /// `t` counts this EMA's inputs (0-based).
    #[inline(always)]
    fn push(&mut self, t: u64, x: f64) -> Option<f64> {
        if t < self.warm {
            self.acc += x;
            None
        } else if t == self.warm {
            self.acc += x;
            self.acc /= self.n;
            Some(self.acc)
        } else {
            self.acc = ((x - self.acc) * self.k) + self.acc;
            Some(self.acc)
        }
    }

    fn visit(&mut self, v: &mut impl Visit) {
        v.f(&mut self.acc);
    }
}

#[derive(Debug, Clone)]
pub(crate) struct Ema(EmaCore);

impl Ema {
    pub(crate) fn new(n: usize) -> Ema {
        Ema(EmaCore::new(n))
    }

    #[inline(always)]
    pub(crate) fn step_x(&mut self, t: u64, x: f64, out: &mut [f64]) -> bool {
        match self.0.push(t, x) {
            Some(v) => {
                out[0] = v;
                true
            }
            None => false,
        }
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        self.0.visit(v);
    }
}

/// TA-Lib 0.8.1's WMA: a weighted sum and a plain sum kept running (`periodSum`,
/// `periodSub`), both rebuilt from the window (oldest first, weights 1..n) every 8·n bars.
#[derive(Debug, Clone)]
pub(crate) struct Wma {
    n: f64,
    warm: u64,
    divider: f64,
    ring: Ring,
    sum: f64,
    sub: f64,
    trailing: f64,
    since_reseed: u64,
}

impl Wma {
    pub(crate) fn new(n: usize) -> Wma {
        Wma {
            n: n as f64,
            warm: n as u64 - 1,
            divider: (n as f64) * ((n + 1) as f64) / 2.0,
            ring: Ring::new(n),
            sum: 0.0,
            sub: 0.0,
            trailing: 0.0,
            since_reseed: 8 * n as u64,
        }
    }

    #[inline(always)]
    pub(crate) fn step_x(&mut self, t: u64, x: f64, out: &mut [f64]) -> bool {
        let oldest = self.ring.push(x);
        if t < self.warm {
            self.sub += x;
            self.sum += x * ((t + 1) as f64);
            return false;
        }
        self.sub += x;
        self.sub -= self.trailing;
        self.sum += x * self.n;
        self.since_reseed = self.since_reseed.saturating_sub(1);
        if self.since_reseed == 0 {
            self.since_reseed = 8 * self.ring.buf.len() as u64;
            let (a, b) = self.ring.buf.split_at(self.ring.head);
            let (mut sub, mut sum) = (0.0, 0.0);
            for (w, &v) in b.iter().chain(a.iter()).enumerate() {
                sub += v;
                sum += v * ((w + 1) as f64);
            }
            self.sub = sub;
            self.sum = sum;
        }
        self.trailing = oldest;
        out[0] = self.sum / self.divider;
        self.sum -= self.sub;
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        v.f(&mut self.sum);
        v.f(&mut self.sub);
        v.f(&mut self.trailing);
        v.u(&mut self.since_reseed);
        self.ring.visit(v);
    }
}

/// Wilder's RSI as TA-Lib computes it: simple means of the first `n` changes, then Wilder's
/// `avg = (avg·(n−1) + cur)/n`, evaluated as `avg·((n−1)/n) + cur·(1/n)` (two multiplies
/// instead of a division on the loop-carried chain; the recurrence is contractive, so this
/// stays within a few ulp of TA-Lib's division); 0 when gain + loss is not positive.
#[derive(Debug, Clone)]
pub(crate) struct Rsi {
    n: f64,
    /// (n−1)/n and 1/n, Wilder's weights.
    keep: f64,
    inv: f64,
    warm: u64,
    prev: f64,
    gain: f64,
    loss: f64,
}

impl Rsi {
    pub(crate) fn new(n: usize) -> Rsi {
        Rsi {
            n: n as f64,
            keep: (n - 1) as f64 / n as f64,
            inv: 1.0 / n as f64,
            warm: n as u64,
            prev: 0.0,
            gain: 0.0,
            loss: 0.0,
        }
    }

    #[inline(always)]
    fn value(&self) -> f64 {
        let total = self.gain + self.loss;
        if total > 0.0 {
            100.0 * (self.gain / total)
        } else {
            0.0
        }
    }

    #[inline(always)]
    pub(crate) fn step_x(&mut self, t: u64, x: f64, out: &mut [f64]) -> bool {
        if t == 0 {
            self.prev = x;
            return false;
        }
        let d = x - self.prev;
        self.prev = x;
        if t <= self.warm {
            if d < 0.0 {
                self.loss -= d;
            } else {
                self.gain += d;
            }
            if t < self.warm {
                return false;
            }
            self.loss /= self.n;
            self.gain /= self.n;
        } else {
            let (g, l) = if d < 0.0 { (0.0, -d) } else { (d, 0.0) };
            self.loss = self.loss * self.keep + l * self.inv;
            self.gain = self.gain * self.keep + g * self.inv;
        }
        out[0] = self.value();
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        v.f(&mut self.prev);
        v.f(&mut self.gain);
        v.f(&mut self.loss);
    }
}

/// TA-Lib's MACD: both EMAs start at bar slow−1, the slow one seeded with the mean of bars
/// 0..slow, the fast one with the mean of bars slow−fast..slow (not `EMA(fast)`); the signal is
/// an EMA of the macd line seeded with its first `signal` values.
#[derive(Debug, Clone)]
pub(crate) struct Macd {
    fast_start: u64,
    slow_warm: u64,
    fast: EmaCore,
    slow: EmaCore,
    signal: EmaCore,
}

impl Macd {
    pub(crate) fn new(fast: usize, slow: usize, signal: usize) -> Macd {
        Macd {
            fast_start: (slow - fast) as u64,
            slow_warm: slow as u64 - 1,
            fast: EmaCore::new(fast),
            slow: EmaCore::new(slow),
            signal: EmaCore::new(signal),
        }
    }

    #[inline(always)]
    pub(crate) fn step_x(&mut self, t: u64, x: f64, out: &mut [f64]) -> bool {
        let slow = self.slow.push(t, x);
        let fast = if t >= self.fast_start {
            self.fast.push(t - self.fast_start, x)
        } else {
            None
        };
        let (Some(slow), Some(fast)) = (slow, fast) else {
            return false;
        };
        let m = fast - slow;
        let Some(sig) = self.signal.push(t - self.slow_warm, m) else {
            return false;
        };
        out[0] = m;
        out[1] = sig;
        out[2] = m - sig;
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        self.fast.visit(v);
        self.slow.visit(v);
        self.signal.visit(v);
    }
}

/// TA-Lib 0.8.1's BBANDS with an SMA middle (its fused SMA fast path): the middle band is the
/// running-total SMA; σ is the population deviation from TA-Lib's cancellation-free variance
/// (`var.c`): running sums of deviations from a shift near the window, rebuilt by a fresh
/// two-pass over the window when the variance falls below 1e-6 of the mean squared deviation,
/// when a removed outlier dwarfs the remaining sum, or every 32·n bars; a rebuilt variance
/// below 1e-12 of its mean square is 0.
#[derive(Debug, Clone)]
pub(crate) struct Bbands {
    sma: Sma,
    inv: f64,
    shift: f64,
    total1: f64,
    total2: f64,
    since_reseed: u64,
    up: f64,
    down: f64,
}

impl Bbands {
    pub(crate) fn new(n: usize, up: f64, down: f64) -> Bbands {
        Bbands {
            sma: Sma::new(n),
            inv: 1.0 / (n as f64),
            shift: 0.0,
            total1: 0.0,
            total2: 0.0,
            since_reseed: 32 * n as u64,
            up,
            down,
        }
    }

    /// The window in time order, oldest first (the ring's head is the oldest slot once the
    /// window is full).
    #[inline(always)]
    fn window(&self) -> impl Iterator<Item = &f64> {
        let (a, b) = self.sma.ring.buf.split_at(self.sma.ring.head);
        b.iter().chain(a.iter())
    }

    #[inline(always)]
    pub(crate) fn step_x(&mut self, t: u64, x: f64, out: &mut [f64]) -> bool {
        self.sma.total += x;
        if t == 0 {
            self.shift = x;
        }
        let d = x - self.shift;
        self.total1 += d;
        self.total2 += d * d;
        let oldest = self.sma.ring.push(x);
        if t < self.sma.warm {
            return false;
        }
        let mean = self.sma.total / self.sma.n;
        self.sma.total -= oldest;

        let m1 = self.total1 * self.inv;
        let mut variance = self.total2 * self.inv - m1 * m1;
        let mut r = oldest - self.shift;
        self.total1 -= r;
        r *= r;
        self.total2 -= r;
        self.since_reseed = self.since_reseed.saturating_sub(1);
        if variance < 0.000001 * (self.total2 * self.inv)
            || r > 1000000.0 * self.total2
            || self.since_reseed == 0
        {
            self.since_reseed = 32 * (self.sma.ring.buf.len() as u64);
            // The ring now holds exactly the window ending at this bar, oldest at `head`.
            let mut sum = 0.0;
            for &v in self.window() {
                sum += v;
            }
            let shift = sum * self.inv;
            let (mut t1, mut t2) = (0.0, 0.0);
            for &v in self.window() {
                let d = v - shift;
                t1 += d;
                t2 += d * d;
            }
            let m1 = t1 * self.inv;
            variance = t2 * self.inv - m1 * m1;
            if variance < 0.000000000001 * (t2 * self.inv) {
                variance = 0.0;
            }
            let d = oldest - shift;
            t1 -= d;
            t2 -= d * d;
            self.shift = shift;
            self.total1 = t1;
            self.total2 = t2;
        }
        let sd = variance.sqrt();
        out[0] = mean + sd * self.up;
        out[1] = mean;
        out[2] = mean - sd * self.down;
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        self.sma.visit(v);
        v.f(&mut self.shift);
        v.f(&mut self.total1);
        v.f(&mut self.total2);
        v.u(&mut self.since_reseed);
    }
}

/// TA-Lib's ATR: the first value is the mean of TR[1..=n], then Wilder's
/// `atr = (atr·(n−1) + tr)/n`.
#[derive(Debug, Clone)]
pub(crate) struct Atr {
    n: f64,
    n1: f64,
    warm: u64,
    prev_close: f64,
    atr: f64,
}

impl Atr {
    pub(crate) fn new(n: usize) -> Atr {
        Atr {
            n: n as f64,
            n1: (n - 1) as f64,
            warm: n as u64,
            prev_close: 0.0,
            atr: 0.0,
        }
    }

    #[inline(always)]
    pub(crate) fn step(&mut self, t: u64, b: &Bar, out: &mut [f64]) -> bool {
        if t == 0 {
            self.prev_close = b.close;
            return false;
        }
        let tr = true_range(b.high, b.low, self.prev_close);
        self.prev_close = b.close;
        if t < self.warm {
            self.atr += tr;
            return false;
        }
        if t == self.warm {
            self.atr += tr;
            self.atr /= self.n;
        } else {
            self.atr *= self.n1;
            self.atr += tr;
            self.atr /= self.n;
        }
        out[0] = self.atr;
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        v.f(&mut self.prev_close);
        v.f(&mut self.atr);
    }
}

/// Highest high and lowest low of the rings (equal length, full).
#[inline(always)]
fn extremes(highs: &[f64], lows: &[f64]) -> (f64, f64) {
    let mut hh = highs[0];
    for &h in &highs[1..] {
        if h > hh {
            hh = h;
        }
    }
    let mut ll = lows[0];
    for &l in &lows[1..] {
        if l < ll {
            ll = l;
        }
    }
    (hh, ll)
}

/// TA-Lib's STOCH with SMA smoothing: fastK = (c − LL)/(HH − LL)·100 over `fastk` bars (0 when
/// the range is zero relative to |HH|+|LL|), k = SMA(fastK, slowk), d = SMA(k, slowd). Both
/// outputs start at the lookback, although k exists earlier.
#[derive(Debug, Clone)]
pub(crate) struct Stoch {
    warm_fast: u64,
    warm_k: u64,
    highs: Ring,
    lows: Ring,
    k: Sma,
    d: Sma,
}

impl Stoch {
    pub(crate) fn new(fastk: usize, slowk: usize, slowd: usize) -> Stoch {
        Stoch {
            warm_fast: fastk as u64 - 1,
            warm_k: (fastk + slowk) as u64 - 2,
            highs: Ring::new(fastk),
            lows: Ring::new(fastk),
            k: Sma::new(slowk),
            d: Sma::new(slowd),
        }
    }

    #[inline(always)]
    pub(crate) fn step(&mut self, t: u64, b: &Bar, out: &mut [f64]) -> bool {
        self.highs.push(b.high);
        self.lows.push(b.low);
        if t < self.warm_fast {
            return false;
        }
        let (hh, ll) = extremes(&self.highs.buf, &self.lows.buf);
        let range = hh - ll;
        let fast_k = if !zero_scaled(range, hh.abs() + ll.abs()) {
            ((b.close - ll) / range) * 100.0
        } else {
            0.0
        };
        let Some(k) = self.k.push(t - self.warm_fast, fast_k) else {
            return false;
        };
        let Some(d) = self.d.push(t - self.warm_k, k) else {
            return false;
        };
        out[0] = k;
        out[1] = d;
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        self.highs.visit(v);
        self.lows.visit(v);
        self.k.visit(v);
        self.d.visit(v);
    }
}

/// TA-Lib's OBV: starts at the first bar's volume, then ± volume on up/down closes.
#[derive(Debug, Clone)]
pub(crate) struct Obv {
    prev_close: f64,
    obv: f64,
}

impl Obv {
    pub(crate) fn new() -> Obv {
        Obv {
            prev_close: 0.0,
            obv: 0.0,
        }
    }

    #[inline(always)]
    pub(crate) fn step(&mut self, t: u64, b: &Bar, out: &mut [f64]) -> bool {
        if t == 0 {
            self.obv = b.volume;
        } else if b.close > self.prev_close {
            self.obv += b.volume;
        } else if b.close < self.prev_close {
            self.obv -= b.volume;
        }
        self.prev_close = b.close;
        out[0] = self.obv;
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        v.f(&mut self.prev_close);
        v.f(&mut self.obv);
    }
}

/// TA-Lib's CCI: typical prices in a ring summed in slot order, mean absolute deviation, 0 when
/// the deviation or the MAD is zero relative to |mean|.
#[derive(Debug, Clone)]
pub(crate) struct Cci {
    n: f64,
    warm: u64,
    ring: Ring,
}

impl Cci {
    pub(crate) fn new(n: usize) -> Cci {
        Cci {
            n: n as f64,
            warm: n as u64 - 1,
            ring: Ring::new(n),
        }
    }

    #[inline(always)]
    pub(crate) fn step(&mut self, t: u64, b: &Bar, out: &mut [f64]) -> bool {
        let tp = (b.high + b.low + b.close) / 3.0;
        self.ring.push(tp);
        if t < self.warm {
            return false;
        }
        let mut avg = 0.0;
        for &v in &self.ring.buf {
            avg += v;
        }
        avg /= self.n;
        let mut mad = 0.0;
        for &v in &self.ring.buf {
            mad += (v - avg).abs();
        }
        mad /= self.n;
        let num = tp - avg;
        let scale = avg.abs();
        out[0] = if !zero_scaled(num, scale) && !zero_scaled(mad, scale) {
            num / (0.015 * mad)
        } else {
            0.0
        };
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        self.ring.visit(v);
    }
}

/// TA-Lib's ADX: DM and TR summed over bars 1..n−1, Wilder sums from bar n on, the first ADX
/// the mean of the DX of bars n..=2n−1, then `adx = (adx·(n−1) + dx)/n`; a bar without a
/// defined DX (zero TR, or +DI + −DI zero) holds the ADX.
#[derive(Debug, Clone)]
pub(crate) struct Adx {
    n: f64,
    n1: f64,
    period: u64,
    prev_high: f64,
    prev_low: f64,
    prev_close: f64,
    plus_dm: f64,
    minus_dm: f64,
    tr: f64,
    adx: f64,
}

impl Adx {
    pub(crate) fn new(n: usize) -> Adx {
        Adx {
            n: n as f64,
            n1: (n - 1) as f64,
            period: n as u64,
            prev_high: 0.0,
            prev_low: 0.0,
            prev_close: 0.0,
            plus_dm: 0.0,
            minus_dm: 0.0,
            tr: 0.0,
            adx: 0.0,
        }
    }

    #[inline(always)]
    pub(crate) fn step(&mut self, t: u64, b: &Bar, out: &mut [f64]) -> bool {
        if t == 0 {
            self.prev_high = b.high;
            self.prev_low = b.low;
            self.prev_close = b.close;
            return false;
        }
        let diff_p = b.high - self.prev_high;
        self.prev_high = b.high;
        let diff_m = self.prev_low - b.low;
        self.prev_low = b.low;
        let tr = true_range(b.high, b.low, self.prev_close);
        self.prev_close = b.close;
        if t < self.period {
            if diff_m > 0.0 && diff_p < diff_m {
                self.minus_dm += diff_m;
            } else if diff_p > 0.0 && diff_p > diff_m {
                self.plus_dm += diff_p;
            }
            self.tr += tr;
            return false;
        }
        self.minus_dm -= self.minus_dm / self.n;
        self.plus_dm -= self.plus_dm / self.n;
        if diff_m > 0.0 && diff_p < diff_m {
            self.minus_dm += diff_m;
        } else if diff_p > 0.0 && diff_p > diff_m {
            self.plus_dm += diff_p;
        }
        self.tr = self.tr - (self.tr / self.n) + tr;
        let mut dx = None;
        if self.tr != 0.0 {
            let minus_di = 100.0 * (self.minus_dm / self.tr);
            let plus_di = 100.0 * (self.plus_dm / self.tr);
            let sum = minus_di + plus_di;
            if !is_zero(sum) {
                dx = Some(100.0 * ((minus_di - plus_di).abs() / sum));
            }
        }
        let last_seed = 2 * self.period - 1;
        if t <= last_seed {
            // `adx` accumulates the seed's DX sum.
            if let Some(dx) = dx {
                self.adx += dx;
            }
            if t < last_seed {
                return false;
            }
            self.adx /= self.n;
        } else if let Some(dx) = dx {
            self.adx = ((self.adx * self.n1) + dx) / self.n;
        }
        out[0] = self.adx;
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        v.f(&mut self.prev_high);
        v.f(&mut self.prev_low);
        v.f(&mut self.prev_close);
        v.f(&mut self.plus_dm);
        v.f(&mut self.minus_dm);
        v.f(&mut self.tr);
        v.f(&mut self.adx);
    }
}

/// TA-Lib 0.8.1's MFI: money flow tp·volume classed by the typical-price change (a change
/// within 1e-14 of the prices' magnitude is no flow), running sums over a ring of `n` flows,
/// reset to exact zero after `n` flowless bars; 0 when the total is not positive; the
/// positive sum clamped into [0, total].
#[derive(Debug, Clone)]
pub(crate) struct Mfi {
    period: u64,
    pos: Ring,
    neg: Ring,
    prev_tp: f64,
    pos_sum: f64,
    neg_sum: f64,
    null_run: u64,
}

impl Mfi {
    pub(crate) fn new(n: usize) -> Mfi {
        Mfi {
            period: n as u64,
            pos: Ring::new(n),
            neg: Ring::new(n),
            prev_tp: 0.0,
            pos_sum: 0.0,
            neg_sum: 0.0,
            null_run: 0,
        }
    }

    #[inline(always)]
    pub(crate) fn step(&mut self, t: u64, b: &Bar, out: &mut [f64]) -> bool {
        let tp = (b.high + b.low + b.close) / 3.0;
        if t == 0 {
            self.prev_tp = tp;
            return false;
        }
        if t > self.period {
            // The slot about to be overwritten holds the flow leaving the window.
            self.pos_sum -= self.pos.buf[self.pos.head];
            self.neg_sum -= self.neg.buf[self.neg.head];
        }
        let change = tp - self.prev_tp;
        let scale = tp.abs() + self.prev_tp.abs();
        self.prev_tp = tp;
        let flow = tp * b.volume;
        let money = if zero_scaled(change, scale) {
            0.0
        } else {
            flow
        };
        let (pos, neg) = if change < 0.0 {
            (0.0, money)
        } else {
            (money, 0.0)
        };
        self.pos.push(pos);
        self.neg.push(neg);
        self.pos_sum += pos;
        self.neg_sum += neg;
        self.null_run = if money == 0.0 { self.null_run + 1 } else { 0 };
        if self.null_run >= self.period {
            self.null_run = self.period;
            self.pos_sum = 0.0;
            self.neg_sum = 0.0;
        }
        if t < self.period {
            return false;
        }
        let total = self.pos_sum + self.neg_sum;
        let pos = if self.pos_sum < 0.0 {
            0.0
        } else if self.pos_sum > total {
            total
        } else {
            self.pos_sum
        };
        out[0] = if total <= 0.0 {
            0.0
        } else {
            100.0 * (pos / total)
        };
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        self.pos.visit(v);
        self.neg.visit(v);
        v.f(&mut self.prev_tp);
        v.f(&mut self.pos_sum);
        v.f(&mut self.neg_sum);
        v.u(&mut self.null_run);
    }
}

/// TA-Lib 0.8.1's WILLR: ((HH − c)/(HH − LL))·(−100) clamped into [−100, 0], 0 when the range is
/// zero relative to |HH|+|LL|.
#[derive(Debug, Clone)]
pub(crate) struct Willr {
    warm: u64,
    highs: Ring,
    lows: Ring,
}

impl Willr {
    pub(crate) fn new(n: usize) -> Willr {
        Willr {
            warm: n as u64 - 1,
            highs: Ring::new(n),
            lows: Ring::new(n),
        }
    }

    #[inline(always)]
    pub(crate) fn step(&mut self, t: u64, b: &Bar, out: &mut [f64]) -> bool {
        self.highs.push(b.high);
        self.lows.push(b.low);
        if t < self.warm {
            return false;
        }
        let (hh, ll) = extremes(&self.highs.buf, &self.lows.buf);
        out[0] = if !zero_scaled(hh - ll, hh.abs() + ll.abs()) {
            let v = ((hh - b.close) / (hh - ll)) * (-100.0);
            v.clamp(-100.0, 0.0)
        } else {
            0.0
        };
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        self.highs.visit(v);
        self.lows.visit(v);
    }
}

/// Rolling VWAP over `n` bars: Σ quote_volume / Σ volume, both sums taken afresh over the
/// window each bar (no drift). A window without volume has no traded price: its value is the
/// current close.
#[derive(Debug, Clone)]
pub(crate) struct Vwap {
    warm: u64,
    quote: Ring,
    volume: Ring,
}

impl Vwap {
    pub(crate) fn new(n: usize) -> Vwap {
        Vwap {
            warm: n as u64 - 1,
            quote: Ring::new(n),
            volume: Ring::new(n),
        }
    }

    #[inline(always)]
    pub(crate) fn step(&mut self, t: u64, b: &Bar, out: &mut [f64]) -> bool {
        self.quote.push(b.quote_volume);
        self.volume.push(b.volume);
        if t < self.warm {
            return false;
        }
        let mut q = 0.0;
        for &x in &self.quote.buf {
            q += x;
        }
        let mut v = 0.0;
        for &x in &self.volume.buf {
            v += x;
        }
        out[0] = if v > 0.0 { q / v } else { b.close };
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        self.quote.visit(v);
        self.volume.visit(v);
    }
}

/// Donchian channel over `n` bars including the current one: highest high, lowest low.
#[derive(Debug, Clone)]
pub(crate) struct Donchian {
    warm: u64,
    highs: Ring,
    lows: Ring,
}

impl Donchian {
    pub(crate) fn new(n: usize) -> Donchian {
        Donchian {
            warm: n as u64 - 1,
            highs: Ring::new(n),
            lows: Ring::new(n),
        }
    }

    #[inline(always)]
    pub(crate) fn step(&mut self, t: u64, b: &Bar, out: &mut [f64]) -> bool {
        self.highs.push(b.high);
        self.lows.push(b.low);
        if t < self.warm {
            return false;
        }
        let (hh, ll) = extremes(&self.highs.buf, &self.lows.buf);
        out[0] = hh;
        out[1] = ll;
        true
    }

    pub(crate) fn visit(&mut self, v: &mut impl Visit) {
        self.highs.visit(v);
        self.lows.visit(v);
    }
}
