#!/usr/bin/env python3
"""The backtest benchmark's anchor: vectorbt 1.2.0 on the same candles (benches/backtest.rs).

    python3 -m venv /tmp/vbtvenv && /tmp/vbtvenv/bin/pip install vectorbt==1.2.0
    QS_BENCH_VBT_PYTHON=/tmp/vbtvenv/bin/python cargo bench --bench backtest

Usage: bench-vectorbt.py CSV RUNS FAST SLOW GRID_FAST GRID_SLOW CHUNK
(GRID_* as comma-separated windows; the grid is their product, run CHUNK columns per
vectorised call: all 100 columns of 1,000,000 candles at once need more than 24 GB). Reads the CSV (time,open,
high,low,close,volume; not timed), warms numba's JIT (not timed), then times, RUNS times each:
- single: MA(fast), MA(slow), crossed above/below, Portfolio.from_signals (long only, fees 0),
  and the stats (pf.stats());
- grid: the same for every (fast, slow) pair at once, vectorised (one from_signals over all
  columns), and each column's total return, Sharpe ratio and max drawdown.
Prints one JSON object: medians in seconds and checks (trade counts, final value).
"""
import json
import sys
import time
import warnings

import numpy as np
import pandas as pd
import vectorbt as vbt

warnings.filterwarnings("ignore")


def single(close, fast, slow):
    f = vbt.MA.run(close, fast)
    s = vbt.MA.run(close, slow)
    entries = f.ma_crossed_above(s)
    exits = f.ma_crossed_below(s)
    pf = vbt.Portfolio.from_signals(close, entries, exits, init_cash=10_000, fees=0.0, freq="1min")
    st = pf.stats()
    return pf, st


def grid(close, fasts, slows, chunk):
    pairs = [(a, b) for a in fasts for b in slows]
    out = []
    for k in range(0, len(pairs), chunk):
        out.append(grid_chunk(close, pairs[k:k + chunk]))
    return out[-1][0], out


def grid_chunk(close, pairs):
    fw = [a for a, _ in pairs]
    sw = [b for _, b in pairs]
    f = vbt.MA.run(close, fw).ma.values
    s = vbt.MA.run(close, sw).ma.values
    fp, sp = np.roll(f, 1, axis=0), np.roll(s, 1, axis=0)
    fp[0], sp[0] = np.nan, np.nan
    entries = (fp < sp) & (f > s)
    exits = (fp > sp) & (f < s)
    idx = close.index
    pf = vbt.Portfolio.from_signals(
        close, pd.DataFrame(entries, index=idx), pd.DataFrame(exits, index=idx),
        init_cash=10_000, fees=0.0, freq="1min")
    return pf, (pf.total_return(), pf.sharpe_ratio(), pf.max_drawdown())


def main():
    path, runs, fast, slow, gf, gs, chunk = sys.argv[1:8]
    chunk = int(chunk)
    runs, fast, slow = int(runs), int(fast), int(slow)
    gf = [int(x) for x in gf.split(",")]
    gs = [int(x) for x in gs.split(",")]
    df = pd.read_csv(path)
    close = pd.Series(df["close"].values, index=pd.to_datetime(df["time"], unit="ms"))
    # Warm the JIT (numba compiles on first call; its cache persists across processes too).
    single(close.iloc[:1000], fast, slow)
    grid(close.iloc[:1000], gf[:2], gs[:2], chunk)
    ts, tg = [], []
    for _ in range(runs):
        t = time.perf_counter()
        pf, st = single(close, fast, slow)
        ts.append(time.perf_counter() - t)
        t = time.perf_counter()
        gpf, _ = grid(close, gf, gs, chunk)
        tg.append(time.perf_counter() - t)
    out = {
        "single_s": float(np.median(ts)),
        "grid_s": float(np.median(tg)),
        "single_runs": ts,
        "grid_runs": tg,
        "single_trades": int(st["Total Trades"]),
        "single_final_value": float(pf.final_value()),
        "grid_columns": len(gf) * len(gs),
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
