"""ccxt's fetch_ohlcv against QuantService's Binance-compatible REST facade (tests/facade.rs).

Usage: python3 tests/ccxt_ohlcv.py BASE_URL EXCHANGE SYMBOL TIMEFRAME SINCE LIMIT
(EXCHANGE: binance or binanceusdm; SYMBOL in ccxt's form: BTC/USDT, BTC/USDT:USDT, BTC/USD:BTC).
Prints the candles as JSON: [[open_time_ms, "open", "high", "low", "close", "volume"], ...],
numbers as the exact strings the facade sent (ccxt's `number = str` mode), so the caller
compares digit for digit.
"""

import json
import sys

import ccxt


def main():
    base, exchange_id, symbol, timeframe, since, limit = sys.argv[1:7]
    exchange = getattr(ccxt, exchange_id)(
        {
            # Only the public market-data APIs, all pointed at the facade.
            "urls": {
                "api": {
                    "public": base + "/api/v3",
                    "fapiPublic": base + "/fapi/v1",
                    "dapiPublic": base + "/dapi/v1",
                }
            },
            "options": {
                # load_markets reads the exchangeInfo of these markets only; no currencies
                # (a signed /sapi call), no margin pairs (they need keys anyway).
                "fetchCurrencies": False,
                "fetchMargins": False,
            },
            # Numbers stay the strings the facade sent.
            "number": str,
            "timeout": 20000,
        }
    )
    exchange.load_markets()
    candles = exchange.fetch_ohlcv(symbol, timeframe, since=int(since), limit=int(limit))
    json.dump(candles, sys.stdout)


if __name__ == "__main__":
    main()
