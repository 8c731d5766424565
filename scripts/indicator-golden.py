#!/usr/bin/env python3
"""Writes the indicator golden files in tests/data/indicators/ from TA-Lib's PyPI wheel.

    pip install --only-binary=:all: TA-Lib numpy
    python3 scripts/indicator-golden.py          # run from the repository root

One gzipped CSV per series: the inputs (open, high, low, close, volume, quote_volume) then one
column per indicator output, named `rsi(14)` or `macd(12,26,9).signal`; values printed with
Python's repr (shortest round-trip form), warm-up cells empty. The 13 TA-Lib kinds come from
`talib` (default compatibility, unstable period 0); vwap(n) and donchian(n), which TA-Lib
lacks, from the plain numpy reference below. crates/core/tests/indicators_golden.rs compares.
"""
import csv
import gzip
import io
import os
import sys

import numpy as np
import talib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "tests", "data", "indicators")
BINANCE = os.path.join(ROOT, "tests", "data", "binance")

DEFAULT = [
    "sma(20)", "ema(20)", "wma(20)", "rsi(14)", "macd(12,26,9)", "bbands(20,2,2)", "atr(14)",
    "stoch(14,3,3)", "obv", "cci(20)", "adx(14)", "mfi(14)", "willr(14)", "vwap(20)",
    "donchian(20)",
]
# Other parameters, on the synthetic series: short periods, period-1 corner cases, asymmetric
# bands, a MACD whose fast seed window is not the slow one's tail by one bar.
VARIANTS = [
    "sma(2)", "ema(2)", "ema(50)", "wma(5)", "rsi(2)", "macd(5,13,4)", "macd(2,3,1)",
    "bbands(5,1.5,0.5)", "atr(1)", "atr(5)", "stoch(5,3,4)", "stoch(1,1,1)", "cci(2)", "adx(2)",
    "adx(5)", "mfi(2)", "willr(2)", "vwap(1)", "vwap(7)", "donchian(1)", "donchian(7)",
]


def parse(spec):
    if "(" not in spec:
        return spec, []
    name, args = spec[:-1].split("(")
    return name, [float(a) if "." in a else int(a) for a in args.split(",")]


def vwap(quote, vol, close, n):
    """Σ quote_volume / Σ volume over the last n bars; the close when the window has no volume."""
    out = np.full(len(close), np.nan)
    if len(close) >= n:
        w = np.lib.stride_tricks.sliding_window_view
        q = w(quote, n).sum(axis=1)
        v = w(vol, n).sum(axis=1)
        c = close[n - 1:]
        with np.errstate(divide="ignore", invalid="ignore"):
            out[n - 1:] = np.where(v > 0, q / v, c)
    return out


def donchian(high, low, n):
    up = np.full(len(high), np.nan)
    lo = np.full(len(high), np.nan)
    if len(high) >= n:
        w = np.lib.stride_tricks.sliding_window_view
        up[n - 1:] = w(high, n).max(axis=1)
        lo[n - 1:] = w(low, n).min(axis=1)
    return up, lo


def compute(spec, o, h, l, c, v, q):
    """[(column name, values)] for one spec, outputs in the order qs_core gives them."""
    name, p = parse(spec)
    if name == "sma":
        outs = [talib.SMA(c, p[0])]
    elif name == "ema":
        outs = [talib.EMA(c, p[0])]
    elif name == "wma":
        outs = [talib.WMA(c, p[0])]
    elif name == "rsi":
        outs = [talib.RSI(c, p[0])]
    elif name == "macd":
        outs = list(talib.MACD(c, fastperiod=p[0], slowperiod=p[1], signalperiod=p[2]))
    elif name == "bbands":
        outs = list(talib.BBANDS(c, timeperiod=p[0], nbdevup=p[1], nbdevdn=p[2], matype=0))
    elif name == "atr":
        outs = [talib.ATR(h, l, c, p[0])]
    elif name == "stoch":
        outs = list(talib.STOCH(h, l, c, fastk_period=p[0], slowk_period=p[1], slowk_matype=0,
                                slowd_period=p[2], slowd_matype=0))
    elif name == "obv":
        outs = [talib.OBV(c, v)]
    elif name == "cci":
        outs = [talib.CCI(h, l, c, p[0])]
    elif name == "adx":
        outs = [talib.ADX(h, l, c, p[0])]
    elif name == "mfi":
        outs = [talib.MFI(h, l, c, v, p[0])]
    elif name == "willr":
        outs = [talib.WILLR(h, l, c, p[0])]
    elif name == "vwap":
        outs = [vwap(q, v, c, p[0])]
    elif name == "donchian":
        outs = list(donchian(h, l, p[0]))
    else:
        raise ValueError(spec)
    names = {"macd": ["macd", "signal", "hist"], "bbands": ["upper", "middle", "lower"],
             "stoch": ["k", "d"], "donchian": ["upper", "lower"]}.get(name)
    if names is None:
        return [(spec, outs[0])]
    return [(f"{spec}.{n}", x) for n, x in zip(names, outs)]


def fmt(x):
    return "" if np.isnan(x) else repr(float(x))


def write(series, bars, specs):
    o, h, l, c, v, q = (np.ascontiguousarray(bars[:, i], dtype=np.float64) for i in range(6))
    cols = []
    for s in specs:
        cols.extend(compute(s, o, h, l, c, v, q))
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    # Unquoted: a reader re-joins the commas inside a name's parentheses.
    buf.write(",".join(["open", "high", "low", "close", "volume", "quote_volume"]
                       + [n for n, _ in cols]) + "\n")
    for i in range(len(c)):
        w.writerow([fmt(x) for x in (o[i], h[i], l[i], c[i], v[i], q[i])]
                   + [fmt(x[i]) for _, x in cols])
    path = os.path.join(OUT, f"{series}.csv.gz")
    with open(path, "wb") as f:
        # mtime=0: the same inputs give the same bytes.
        with gzip.GzipFile(fileobj=f, mode="wb", mtime=0, filename="") as g:
            g.write(buf.getvalue().encode())
    print(f"{path}: {len(c)} bars, {len(cols)} output columns, {os.path.getsize(path)} bytes")


def random_walk(rng, n, start=100.0, vol=0.01):
    close = start * np.exp(np.cumsum(rng.normal(0, vol, n)))
    open_ = np.concatenate([[start], close[:-1]])
    high = np.maximum(open_, close) * (1 + np.abs(rng.normal(0, vol / 3, n)))
    low = np.minimum(open_, close) * (1 - np.abs(rng.normal(0, vol / 3, n)))
    volume = rng.gamma(2.0, 500.0, n)
    quote = volume * (high + low + close) / 3
    return np.column_stack([open_, high, low, close, volume, quote])


def binance(path, limit):
    rows = []
    with open(os.path.join(BINANCE, path)) as f:
        for r in csv.reader(f):
            if not r[0].isdigit():  # a header row
                continue
            rows.append([float(r[1]), float(r[2]), float(r[3]), float(r[4]), float(r[5]),
                         float(r[7])])
            if len(rows) == limit:
                break
    return np.array(rows)


def main():
    os.makedirs(OUT, exist_ok=True)
    print(f"TA-Lib {talib.__version__} (C {talib.__ta_version__.decode()})", file=sys.stderr)
    rng = np.random.default_rng(20261202)
    write("synthetic", random_walk(rng, 3000), DEFAULT + VARIANTS)

    flat = np.tile([100.0, 100.0, 100.0, 100.0, 5.0, 500.0], (120, 1))
    write("flat", flat, DEFAULT + VARIANTS)

    tiny = random_walk(rng, 800, start=3e-8)
    write("tiny", tiny, DEFAULT + VARIANTS)

    # Zero-volume stretches (prices moving and flat), as thin pairs print them.
    zv = random_walk(rng, 600)
    for a, b in [(0, 30), (100, 140), (300, 310), (450, 520)]:
        zv[a:b, 4] = 0.0
        zv[a:b, 5] = 0.0
    zv[200:240, 0:4] = zv[199, 3]  # a flat stretch with volume
    zv[460:500, 0:4] = zv[459, 3]  # a flat stretch without volume
    write("zero_volume", zv, DEFAULT + VARIANTS)

    # Windows flat to within rounding (BBANDS' variance floor, STOCH/WILLR/CCI's scaled zero
    # tests): alternating c±d with d/c from 1e-7 down to 1e-15, at three price levels, between
    # volatile stretches.
    parts = []
    for c in (1.0, 40000.0, 2e-8):
        for r in (1e-7, 1e-10, 1e-13, 1e-15):
            d = c * r
            parts.append(np.array([c + d, c - d] * 15))
            parts.append(c * np.exp(np.cumsum(rng.normal(0, 0.01, 30))))
        parts.append(np.full(30, c))
    x = np.concatenate(parts)
    prev = np.concatenate([[x[0]], x[:-1]])
    nf = np.column_stack([prev, np.maximum(prev, x), np.minimum(prev, x), x,
                          np.full(len(x), 3.0), 3.0 * x])
    write("near_flat", nf, DEFAULT + VARIANTS)

    write("btcusdt_um_1h", binance("um/BTCUSDT-1h-2024-01-01_2025-12-20.csv", 3000), DEFAULT)
    write("ethusdt_um_1h", binance("um/ETHUSDT-1h-2024-01-01_2025-12-20.csv", 2000), DEFAULT)
    write("btcusdt_spot_1h_2022_01", binance("spot/BTCUSDT-1h-2022-01.csv", 744), DEFAULT)


if __name__ == "__main__":
    main()
