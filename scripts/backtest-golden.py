#!/usr/bin/env python3
"""Golden files for the backtest parity tests: backtesting.py 0.6.6's trades and statistics.

    python3 -m venv /tmp/btvenv && /tmp/btvenv/bin/pip install backtesting==0.6.6
    /tmp/btvenv/bin/pip install --only-binary=:all: TA-Lib
    /tmp/btvenv/bin/python scripts/backtest-golden.py

Writes tests/data/backtest/<case>.json.gz: every closed trade (bars, size, prices, PnL, return)
and every statistic (floats as repr, durations in ms), for the cases below.
"""
import gzip
import io
import json
import math
import os
import sys

import numpy as np
import pandas as pd
from backtesting import Backtest, Strategy
from backtesting.lib import crossover

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
DATA = os.path.join(ROOT, "tests", "data")


def sma(arr, n):
    return pd.Series(arr).rolling(n).mean()


def ema(arr, n):
    # TA-Lib's EMA: seeded with the SMA of the first n values.
    x = np.asarray(arr, dtype=float)
    out = np.full(len(x), np.nan)
    if len(x) >= n:
        k = 2.0 / (n + 1)
        prev = x[:n].sum() / n
        out[n - 1] = prev
        for i in range(n, len(x)):
            prev = (x[i] - prev) * k + prev
            out[i] = prev
    return out


class SmaCross(Strategy):
    fast = 10
    slow = 20

    def init(self):
        self.a = self.I(sma, self.data.Close, self.fast)
        self.b = self.I(sma, self.data.Close, self.slow)

    def next(self):
        if crossover(self.a, self.b):
            self.buy()
        elif crossover(self.b, self.a):
            self.sell()


class SmaCrossLongOnly(SmaCross):
    def next(self):
        if crossover(self.a, self.b):
            self.buy()
        elif crossover(self.b, self.a):
            self.position.close()


class EmaCross(Strategy):
    fast = 10
    slow = 20

    def init(self):
        import talib
        self.a = self.I(talib.EMA, self.data.Close.astype(float), self.fast)
        self.b = self.I(talib.EMA, self.data.Close.astype(float), self.slow)

    def next(self):
        if crossover(self.a, self.b):
            self.buy()
        elif crossover(self.b, self.a):
            self.sell()


class RsiReversion(Strategy):
    n = 14
    low = 30
    high = 70

    def init(self):
        import talib
        self.rsi = self.I(talib.RSI, self.data.Close.astype(float), self.n)

    def next(self):
        if crossover(self.low, self.rsi):
            self.buy()
        elif crossover(self.rsi, self.high):
            self.sell()


class MacdCross(Strategy):
    fast = 12
    slow = 26
    signal = 9

    def init(self):
        import talib
        c = self.data.Close.astype(float)
        self.macd = self.I(lambda x: talib.MACD(x, self.fast, self.slow, self.signal)[0], c)
        self.sig = self.I(lambda x: talib.MACD(x, self.fast, self.slow, self.signal)[1], c)

    def next(self):
        if crossover(self.macd, self.sig):
            self.buy()
        elif crossover(self.sig, self.macd):
            self.sell()


class BbandsBreakout(Strategy):
    n = 20
    k = 2

    def init(self):
        import talib
        c = self.data.Close.astype(float)
        self.up = self.I(lambda x: talib.BBANDS(x, self.n, self.k, self.k)[0], c)
        self.lo = self.I(lambda x: talib.BBANDS(x, self.n, self.k, self.k)[2], c)

    def next(self):
        if crossover(self.data.Close, self.up):
            self.buy()
        elif crossover(self.lo, self.data.Close):
            self.sell()


def goog():
    return pd.read_csv(os.path.join(DATA, "backtest", "GOOG.csv"), index_col=0, parse_dates=True)


def binance(path):
    df = pd.read_csv(path, header=None, skiprows=1 if not open(path).read(1).isdigit() else 0)
    out = pd.DataFrame(
        {
            "Open": df[1].astype(float).values,
            "High": df[2].astype(float).values,
            "Low": df[3].astype(float).values,
            "Close": df[4].astype(float).values,
            "Volume": df[5].astype(float).values,
        },
        index=pd.to_datetime(df[0], unit="ms"),
    )
    return out


def ms(x):
    if isinstance(x, pd.Timedelta):
        return int(x.value // 1_000_000)
    if isinstance(x, pd.Timestamp):
        return int(x.value // 1_000_000)
    return None


def num(x):
    if x is None:
        return None
    x = float(x)
    if math.isnan(x):
        return "NaN"
    if math.isinf(x):
        return "inf" if x > 0 else "-inf"
    return x


def case(name, data, strategy, params, **bt):
    stats = Backtest(data, strategy, **bt).run(**params)
    trades = stats["_trades"]
    out = {
        "case": name,
        "params": params,
        "backtest": {k: v for k, v in bt.items()},
        "bars": len(data),
        "trades": [
            {
                "size": num(t.Size),
                "entry_bar": int(t.EntryBar),
                "exit_bar": int(t.ExitBar),
                "entry_price": num(t.EntryPrice),
                "exit_price": num(t.ExitPrice),
                "pnl": num(t.PnL),
                "return_pct": num(t.ReturnPct),
                "commission": num(t.Commission),
            }
            for t in trades.itertuples()
        ],
        "stats": {},
        "equity": [num(x) for x in stats["_equity_curve"]["Equity"].values],
    }
    for k, v in stats.items():
        if k.startswith("_"):
            continue
        if isinstance(v, (pd.Timedelta, pd.Timestamp)):
            out["stats"][k] = ms(v)
        elif v is pd.NaT:
            out["stats"][k] = None
        else:
            out["stats"][k] = num(v)
    path = os.path.join(DATA, "backtest", name + ".json.gz")
    # mtime=0: the same results give the same bytes.
    with gzip.GzipFile(path, "wb", mtime=0) as raw, io.TextIOWrapper(raw) as f:
        json.dump(out, f, separators=(",", ":"))
    print(name, len(out["trades"]), "trades", "return", out["stats"]["Return [%]"], file=sys.stderr)


def main():
    g = goog()
    case("goog_sma_cross_10_20", g, SmaCross, {"fast": 10, "slow": 20},
         cash=10_000, commission=0.002, exclusive_orders=True)
    btc = binance(os.path.join(DATA, "binance", "um", "BTCUSDT-1h-2024-01-01_2025-12-20.csv"))
    case("btcusdt_um_1h_sma_cross_24_72", btc, SmaCross, {"fast": 24, "slow": 72},
         cash=1_000_000, commission=0.0004, exclusive_orders=True)
    case("btcusdt_um_1h_sma_cross_50_200_long_only", btc, SmaCrossLongOnly, {"fast": 50, "slow": 200},
         cash=1_000_000, commission=0.001, trade_on_close=True, finalize_trades=True)

    spot = binance(os.path.join(DATA, "binance", "spot", "BTCUSDT-1h-2022-01.csv"))
    case("btcusdt_um_1h_ema_cross_12_26_spread", btc, EmaCross, {"fast": 12, "slow": 26},
         cash=1_000_000, commission=0.0004, spread=0.0002, exclusive_orders=True)
    case("btcusdt_um_1h_rsi_reversion_14_30_70", btc, RsiReversion, {"n": 14, "low": 30, "high": 70},
         cash=1_000_000, commission=0.001, exclusive_orders=True)
    case("btcusdt_um_1h_macd_cross_12_26_9", btc, MacdCross, {"fast": 12, "slow": 26, "signal": 9},
         cash=1_000_000, commission=0.0004)
    case("goog_bbands_breakout_20_2", g, BbandsBreakout, {"n": 20, "k": 2},
         cash=10_000, commission=0.002, exclusive_orders=True)
    case("btcusdt_spot_1h_2022_01_sma_cross_5_15", spot, SmaCross, {"fast": 5, "slow": 15},
         cash=1_000_000, commission=0.001, exclusive_orders=True, finalize_trades=True)

    eurusd = pd.read_csv(os.path.join(DATA, "backtest", "EURUSD.csv"), index_col=0, parse_dates=True)
    case("eurusd_1h_sma_cross_10_30", eurusd, SmaCross, {"fast": 10, "slow": 30},
         cash=10_000, commission=0.0002, exclusive_orders=True)
    btcusd = pd.read_csv(os.path.join(DATA, "backtest", "BTCUSD.csv"), index_col=0, parse_dates=True)
    case("btcusd_monthly_sma_cross_3_6", btcusd, SmaCross, {"fast": 3, "slow": 6},
         cash=100_000, commission=0.001, exclusive_orders=True)


if __name__ == "__main__":
    main()
