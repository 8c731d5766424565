//! Batch kernels over a slice of closes for SMA, EMA, RSI, MACD and BBANDS: the same
//! operations in the same order as the incremental `step`s in kernels.rs, written as tight
//! loops over the slice (no ring buffer, outputs pushed into pre-sized vectors). The unit test
//! `batch_closes_equals_update_bit_for_bit` proves them equal to `update` on every value.

/// Empties `v` for a series of `len` (keeping its allocation) and fills the warm-up with NaN.
fn column(v: &mut Vec<f64>, len: usize, lookback: usize) {
    v.clear();
    v.reserve(len);
    v.resize(lookback.min(len), f64::NAN);
}

pub(crate) fn sma(xs: &[f64], n: usize, cols: &mut [Vec<f64>]) {
    let out = &mut cols[0];
    column(out, xs.len(), n - 1);
    if xs.len() >= n {
        let nf = n as f64;
        let mut total = 0.0;
        for &x in &xs[..n - 1] {
            total += x;
        }
        out.extend(xs[n - 1..].iter().zip(xs).map(|(&x, &old)| {
            total += x;
            let v = total / nf;
            total -= old;
            v
        }));
    }
}

/// TA-Lib's EMA seeded with the mean of `xs[..n]`, continued over the rest of `xs`; pushes
/// the values from index n−1 on into `out`.
#[inline(always)]
fn ema_into(xs: &[f64], n: usize, out: &mut Vec<f64>) {
    if xs.len() < n {
        return;
    }
    let k = 2.0 / ((n + 1) as f64);
    let mut acc = 0.0;
    for &x in &xs[..n] {
        acc += x;
    }
    acc /= n as f64;
    out.push(acc);
    out.extend(xs[n..].iter().map(|&x| {
        acc = ((x - acc) * k) + acc;
        acc
    }));
}

pub(crate) fn ema(xs: &[f64], n: usize, cols: &mut [Vec<f64>]) {
    let out = &mut cols[0];
    column(out, xs.len(), n - 1);
    ema_into(xs, n, out);
}

pub(crate) fn rsi(xs: &[f64], n: usize, cols: &mut [Vec<f64>]) {
    let out = &mut cols[0];
    column(out, xs.len(), n);
    if xs.len() > n {
        let nf = n as f64;
        let keep = (n - 1) as f64 / nf;
        let inv = 1.0 / nf;
        let (mut gain, mut loss) = (0.0f64, 0.0f64);
        for w in xs[..=n].windows(2) {
            let d = w[1] - w[0];
            if d < 0.0 {
                loss -= d;
            } else {
                gain += d;
            }
        }
        loss /= nf;
        gain /= nf;
        let value = |gain: f64, loss: f64| {
            let total = gain + loss;
            if total > 0.0 {
                100.0 * (gain / total)
            } else {
                0.0
            }
        };
        out.push(value(gain, loss));
        out.extend(xs[n + 1..].iter().zip(&xs[n..]).map(|(&x, &prev)| {
            let d = x - prev;
            // Selects, not a branch on the coin-flip sign (as in `step`).
            let (g, l) = if d < 0.0 { (0.0, -d) } else { (d, 0.0) };
            loss = loss * keep + l * inv;
            gain = gain * keep + g * inv;
            value(gain, loss)
        }));
    }
}

pub(crate) fn macd(xs: &[f64], fast: usize, slow: usize, signal: usize, cols: &mut [Vec<f64>]) {
    let len = xs.len();
    let lookback = (slow - 1) + (signal - 1);
    let [m_col, s_col, h_col] = cols else {
        return;
    };
    column(m_col, len, lookback);
    column(s_col, len, lookback);
    column(h_col, len, lookback);
    if len <= lookback {
        return;
    }
    let (kf, ks, kg) = (
        2.0 / ((fast + 1) as f64),
        2.0 / ((slow + 1) as f64),
        2.0 / ((signal + 1) as f64),
    );
    // Seeds: slow = mean of bars 0..slow, fast = mean of bars slow−fast..slow (TA-Lib's
    // quirk), both at bar slow−1; the signal = mean of the first `signal` macd values.
    let (mut se, mut fe) = (0.0, 0.0);
    for &x in &xs[..slow] {
        se += x;
    }
    for &x in &xs[slow - fast..slow] {
        fe += x;
    }
    se /= slow as f64;
    fe /= fast as f64;
    let mut sig = fe - se;
    for &x in &xs[slow..slow + signal - 1] {
        se = ((x - se) * ks) + se;
        fe = ((x - fe) * kf) + fe;
        sig += fe - se;
    }
    sig /= signal as f64;
    let m = fe - se;
    m_col.push(m);
    s_col.push(sig);
    h_col.push(m - sig);
    for &x in &xs[lookback + 1..] {
        se = ((x - se) * ks) + se;
        fe = ((x - fe) * kf) + fe;
        let m = fe - se;
        sig = ((m - sig) * kg) + sig;
        m_col.push(m);
        s_col.push(sig);
        h_col.push(m - sig);
    }
}

pub(crate) fn bbands(xs: &[f64], n: usize, up: f64, down: f64, cols: &mut [Vec<f64>]) {
    let len = xs.len();
    let [u_col, m_col, l_col] = cols else {
        return;
    };
    column(u_col, len, n - 1);
    column(m_col, len, n - 1);
    column(l_col, len, n - 1);
    if len >= n {
        let nf = n as f64;
        let inv = 1.0 / nf;
        let mut shift = xs[0];
        let (mut total, mut t1, mut t2) = (0.0, 0.0, 0.0);
        for &x in &xs[..n - 1] {
            total += x;
            let d = x - shift;
            t1 += d;
            t2 += d * d;
        }
        let mut since = 32 * n;
        // `start` is the first bar of the window that ends with `x`.
        for (start, (&x, &oldest)) in xs[n - 1..].iter().zip(xs).enumerate() {
            total += x;
            let d = x - shift;
            t1 += d;
            t2 += d * d;
            let mean = total / nf;
            total -= oldest;
            let m1 = t1 * inv;
            let mut variance = t2 * inv - m1 * m1;
            let mut r = oldest - shift;
            t1 -= r;
            r *= r;
            t2 -= r;
            since -= 1;
            if variance < 0.000001 * (t2 * inv) || r > 1000000.0 * t2 || since == 0 {
                since = 32 * n;
                let window = &xs[start..start + n];
                let mut sum = 0.0;
                for &v in window {
                    sum += v;
                }
                shift = sum * inv;
                t1 = 0.0;
                t2 = 0.0;
                for &v in window {
                    let d = v - shift;
                    t1 += d;
                    t2 += d * d;
                }
                let m1 = t1 * inv;
                variance = t2 * inv - m1 * m1;
                if variance < 0.000000000001 * (t2 * inv) {
                    variance = 0.0;
                }
                let d = oldest - shift;
                t1 -= d;
                t2 -= d * d;
            }
            let sd = variance.sqrt();
            u_col.push(mean + sd * up);
            m_col.push(mean);
            l_col.push(mean - sd * down);
        }
    }
}
