//! The Binance simulator over real sockets: per-market pagination (spot/um vs cm), the open
//! candle, error codes, weight headers and 429 → 418 escalation, 451/403/503 faults, archive
//! zips and checksums with their quirks, maintenance gaps and a real CSV series.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use common::binance_decimal as fmt;
use std::io::Read;
use std::net::IpAddr;
use std::path::Path;
use std::time::Duration;

use qs_sim::{
    self as sim, now_ms, synthetic, ManualClock, RequestKind, SimClock, SimConfig, SimHandle,
};
use quantservice::market::{Decimal, Kline, Market, PairKey};
use serde_json::Value;
use sha2::{Digest, Sha256};

const HOUR: i64 = 3_600_000;
const DAY: i64 = 86_400_000;
/// 2023-01-01T00:00Z
const T2023: i64 = 1_672_531_200_000;
const SPOT_CSV: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/binance/spot/BTCUSDT-1h-2022-01.csv"
);
const UM_CSV: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/tests/data/binance/um/BTCUSDT-1h-2024-01-01_2025-12-20.csv"
);

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

async fn start(cfg: SimConfig) -> SimHandle {
    sim::start(cfg, "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

fn client_from(local: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .local_address(ip(local))
        .build()
        .unwrap()
}

struct Resp {
    status: u16,
    headers: reqwest::header::HeaderMap,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap()
    }
    fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_string())
    }
    fn code(&self) -> i64 {
        self.json()["code"].as_i64().unwrap()
    }
}

async fn get_with(client: &reqwest::Client, url: &str) -> Resp {
    let r = client.get(url).send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let body = r.bytes().await.unwrap().to_vec();
    Resp {
        status,
        headers,
        body,
    }
}

async fn get(url: &str) -> Resp {
    get_with(&client_from("127.0.0.1"), url).await
}

fn klines_url(sim: &SimHandle, market: Market, query: &str) -> String {
    format!("{}?{query}", sim.rest_url(market))
}

async fn klines(sim: &SimHandle, market: Market, query: &str) -> Vec<Vec<Value>> {
    let r = get(&klines_url(sim, market, query)).await;
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    serde_json::from_slice(&r.body).unwrap()
}

fn opens(rows: &[Vec<Value>]) -> Vec<i64> {
    rows.iter().map(|r| r[0].as_i64().unwrap()).collect()
}

fn pair(market: &str, symbol: &str, period: &str) -> PairKey {
    PairKey::parse(market, symbol, period).unwrap()
}

/// The 12 fields of a candle as strings, as REST or an archive CSV prints them.
fn fields(k: &Kline, time_scale: i64) -> Vec<String> {
    let m = k.pair.market;
    vec![
        (k.open_time * time_scale).to_string(),
        fmt(m, k.open),
        fmt(m, k.high),
        fmt(m, k.low),
        fmt(m, k.close),
        fmt(m, k.volume),
        ((k.close_time + 1) * time_scale - 1).to_string(),
        fmt(m, k.quote_volume),
        k.trades.to_string(),
        fmt(m, k.taker_buy_volume),
        fmt(m, k.taker_buy_quote_volume),
        "0".to_string(),
    ]
}

fn row_fields(row: &[Value]) -> Vec<String> {
    row.iter()
        .map(|v| match v {
            Value::String(s) => s.clone(),
            other => other.to_string(),
        })
        .collect()
}

fn assert_rest_row(row: &[Value], k: &Kline) {
    assert_eq!(row.len(), 12);
    assert!(row[0].is_i64() && row[6].is_i64() && row[8].is_u64());
    for i in [1, 2, 3, 4, 5, 7, 9, 10, 11] {
        assert!(row[i].is_string(), "field {i} must be a string");
    }
    assert_eq!(row_fields(row), fields(k, 1));
}

/// 2023-11-14T22:14:00Z, a boundary of every window up to a minute: where the manual rate
/// clocks of the limit tests start.
const WINDOW_START: i64 = 1_700_000_040_000;

#[tokio::test]
async fn spot_and_um_paginate_forward_from_start_time() {
    let sim = start(SimConfig::default()).await;
    for (market, name) in [(Market::Spot, "spot"), (Market::Um, "um")] {
        let p = pair(name, "BTCUSDT", "1h");
        // startTime only: the oldest rows from startTime.
        let rows = klines(
            &sim,
            market,
            &format!("symbol=BTCUSDT&interval=1h&startTime={T2023}&limit=3"),
        )
        .await;
        assert_eq!(opens(&rows), vec![T2023, T2023 + HOUR, T2023 + 2 * HOUR]);
        for row in &rows {
            assert_rest_row(row, &synthetic::candle(&p, row[0].as_i64().unwrap()));
        }
        // An unaligned startTime starts at the next candle.
        let rows = klines(
            &sim,
            market,
            &format!("symbol=BTCUSDT&interval=1h&startTime={}&limit=2", T2023 + 1),
        )
        .await;
        assert_eq!(opens(&rows), vec![T2023 + HOUR, T2023 + 2 * HOUR]);
        // start + end: not past endTime (inclusive of a candle opening at endTime).
        let rows = klines(
            &sim,
            market,
            &format!(
                "symbol=BTCUSDT&interval=1h&startTime={T2023}&endTime={}&limit=10",
                T2023 + 2 * HOUR
            ),
        )
        .await;
        assert_eq!(opens(&rows), vec![T2023, T2023 + HOUR, T2023 + 2 * HOUR]);
        // endTime only: the most recent up to endTime.
        let rows = klines(
            &sim,
            market,
            &format!(
                "symbol=BTCUSDT&interval=1h&endTime={}&limit=3",
                T2023 + 10 * HOUR + 5
            ),
        )
        .await;
        assert_eq!(
            opens(&rows),
            vec![T2023 + 8 * HOUR, T2023 + 9 * HOUR, T2023 + 10 * HOUR]
        );
        // The first candle is found with startTime=0.
        let rows = klines(
            &sim,
            market,
            "symbol=BTCUSDT&interval=1d&startTime=0&limit=1",
        )
        .await;
        assert_eq!(opens(&rows), vec![sim::DEFAULT_LISTING_MS]);
        // Default limit 500.
        let rows = klines(
            &sim,
            market,
            &format!("symbol=BTCUSDT&interval=1m&startTime={T2023}"),
        )
        .await;
        assert_eq!(rows.len(), 500);
    }
    // Spot accepts µs parameters and answers in µs when asked.
    let rows = klines(
        &sim,
        Market::Spot,
        &format!(
            "symbol=ETHUSDT&interval=1h&startTime={}&limit=1",
            T2023 * 1000
        ),
    )
    .await;
    assert_eq!(opens(&rows), vec![T2023]);
    let r = reqwest::Client::new()
        .get(klines_url(
            &sim,
            Market::Spot,
            &format!("symbol=ETHUSDT&interval=1h&startTime={T2023}&limit=1"),
        ))
        .header("X-MBX-TIME-UNIT", "MICROSECOND")
        .send()
        .await
        .unwrap();
    let rows: Vec<Vec<Value>> = r.json().await.unwrap();
    assert_eq!(
        row_fields(&rows[0]),
        fields(
            &synthetic::candle(&pair("spot", "ETHUSDT", "1h"), T2023),
            1000
        )
    );
}

#[tokio::test]
async fn the_open_candle_is_last_and_not_final() {
    let sim = start(SimConfig::default()).await;
    for (market, name, symbol) in [
        (Market::Spot, "spot", "BNBBTC"),
        (Market::Um, "um", "ETHUSDT"),
        (Market::Cm, "cm", "BTCUSD_PERP"),
    ] {
        let p = pair(name, symbol, "1m");
        let before = now_ms();
        let rows = klines(
            &sim,
            market,
            &format!("symbol={symbol}&interval=1m&limit=3"),
        )
        .await;
        let after = now_ms();
        assert_eq!(rows.len(), 3);
        let last = rows.last().unwrap();
        let open = last[0].as_i64().unwrap();
        assert!(
            open <= after && last[6].as_i64().unwrap() >= before,
            "{market}: last row is the open candle"
        );
        assert_ne!(
            row_fields(last),
            fields(&synthetic::candle(&p, open), 1),
            "{market}: open candle differs from the final one"
        );
        // The rows before it are final.
        for row in &rows[..2] {
            assert_rest_row(row, &synthetic::candle(&p, row[0].as_i64().unwrap()));
        }
        // An endTime in the future is capped at now.
        let rows = klines(
            &sim,
            market,
            &format!(
                "symbol={symbol}&interval=1m&endTime={}&limit=1",
                after + 10 * DAY
            ),
        )
        .await;
        assert!(rows[0][0].as_i64().unwrap() <= now_ms());
    }
    let p = pair("um", "ETHUSDT", "1h");
    let open = p.period.align(now_ms());
    let part = synthetic::partial(&p, open, open + 10);
    assert!(!part.is_final);
    assert_ne!(part, synthetic::candle(&p, open));
}

#[tokio::test]
async fn cm_anchors_at_end_time_and_caps_ranges_at_200_days() {
    let sim = start(SimConfig::default()).await;
    let p = pair("cm", "BTCUSD_PERP", "1h");
    // More than 200 days → -4088.
    let r = get(&klines_url(
        &sim,
        Market::Cm,
        &format!(
            "symbol=BTCUSD_PERP&interval=1d&startTime={T2023}&endTime={}",
            T2023 + 200 * DAY + 1
        ),
    ))
    .await;
    assert_eq!((r.status, r.code()), (400, -4088));
    assert_eq!(r.json()["msg"], "Maximum time interval is 200 days.");
    // startTime=0 with endTime=now fails too: the spot trick does not work on cm.
    let r = get(&klines_url(
        &sim,
        Market::Cm,
        &format!(
            "symbol=BTCUSD_PERP&interval=1d&startTime=0&endTime={}",
            now_ms()
        ),
    ))
    .await;
    assert_eq!(r.code(), -4088);
    // Exactly 200 days is allowed.
    let rows = klines(
        &sim,
        Market::Cm,
        &format!(
            "symbol=BTCUSD_PERP&interval=1d&startTime={T2023}&endTime={}&limit=1",
            T2023 + 200 * DAY
        ),
    )
    .await;
    assert_eq!(opens(&rows), vec![T2023 + 200 * DAY]);
    // start + end: the most recent `limit` rows, anchored at endTime.
    let rows = klines(
        &sim,
        Market::Cm,
        &format!(
            "symbol=BTCUSD_PERP&interval=1h&startTime={T2023}&endTime={}&limit=3",
            T2023 + 10 * HOUR
        ),
    )
    .await;
    assert_eq!(
        opens(&rows),
        vec![T2023 + 8 * HOUR, T2023 + 9 * HOUR, T2023 + 10 * HOUR]
    );
    for row in &rows {
        assert_rest_row(row, &synthetic::candle(&p, row[0].as_i64().unwrap()));
    }
    // startTime only: the end of a 200-day window, not the start.
    let rows = klines(
        &sim,
        Market::Cm,
        &format!("symbol=BTCUSD_PERP&interval=1d&startTime={T2023}&limit=2"),
    )
    .await;
    assert_eq!(opens(&rows), vec![T2023 + 199 * DAY, T2023 + 200 * DAY]);
    // endTime only: 200 days back from endTime, most recent first.
    let rows = klines(
        &sim,
        Market::Cm,
        &format!("symbol=BTCUSD_PERP&interval=1d&endTime={T2023}&limit=2"),
    )
    .await;
    assert_eq!(opens(&rows), vec![T2023 - DAY, T2023]);
    let rows = klines(
        &sim,
        Market::Cm,
        &format!("symbol=BTCUSD_PERP&interval=1d&endTime={T2023}&limit=1500"),
    )
    .await;
    assert_eq!(rows.len(), 201);
    // startTime=0 alone looks at 1970 + 200 days: empty.
    assert!(klines(
        &sim,
        Market::Cm,
        "symbol=BTCUSD_PERP&interval=1d&startTime=0"
    )
    .await
    .is_empty());
    // The range from onboardDate works.
    let rows = klines(
        &sim,
        Market::Cm,
        &format!(
            "symbol=ETHUSD_PERP&interval=1d&startTime={}&endTime={}&limit=1500",
            sim::DEFAULT_CM_LISTING_MS - 10 * DAY,
            sim::DEFAULT_CM_LISTING_MS + 9 * DAY
        ),
    )
    .await;
    assert_eq!(rows.len(), 10);
    assert_eq!(rows[0][0].as_i64().unwrap(), sim::DEFAULT_CM_LISTING_MS);
    // Limits: 1500 is the max on futures, 1000 on spot.
    let r = get(&klines_url(
        &sim,
        Market::Cm,
        "symbol=BTCUSD_PERP&interval=1m&limit=1501",
    ))
    .await;
    assert_eq!((r.status, r.code()), (400, -1130));
    let r = get(&klines_url(
        &sim,
        Market::Spot,
        "symbol=BTCUSDT&interval=1m&limit=1001",
    ))
    .await;
    assert_eq!((r.status, r.code()), (400, -1130));
    assert_eq!(
        klines(
            &sim,
            Market::Um,
            &format!("symbol=BTCUSDT&interval=1m&startTime={T2023}&limit=1500")
        )
        .await
        .len(),
        1500
    );
}

#[tokio::test]
async fn bad_requests_get_binance_error_codes() {
    let sim = start(SimConfig::default()).await;
    for (market, query, code) in [
        (Market::Spot, "symbol=XRPUSDT&interval=1m", -1121),
        (Market::Cm, "symbol=BTCUSDT&interval=1m", -1121),
        (Market::Spot, "symbol=BTCUSDT&interval=2m", -1120),
        (Market::Um, "symbol=BTCUSDT&interval=1s", -1120),
        (Market::Um, "symbol=BTCUSDT&interval=1mo", -1120),
        (Market::Spot, "interval=1m", -1102),
        (Market::Spot, "symbol=BTCUSDT", -1102),
        (
            Market::Spot,
            "symbol=BTCUSDT&interval=1m&startTime=abc",
            -1100,
        ),
        (Market::Um, "symbol=BTCUSDT&interval=1m&limit=-5", -1100),
        (Market::Um, "symbol=BTCUSDT&interval=1m&limit=0", -1130),
        (
            Market::Spot,
            &format!(
                "symbol=BTCUSDT&interval=1m&startTime={}&endTime={T2023}",
                T2023 + 1
            ),
            -1023,
        ),
    ] {
        let r = get(&klines_url(&sim, market, query)).await;
        assert_eq!((r.status, r.code()), (400, code), "{market} {query}");
        assert!(r.json()["msg"].as_str().unwrap().ends_with('.'));
        assert!(
            r.header("x-mbx-used-weight-1m").is_some(),
            "errors carry the weight header"
        );
    }
    let r = get(&klines_url(
        &sim,
        Market::Spot,
        "symbol=XRPUSDT&interval=1m",
    ))
    .await;
    assert_eq!(
        r.json(),
        serde_json::json!({"code": -1121, "msg": "Invalid symbol."})
    );
    let r = get(&klines_url(
        &sim,
        Market::Spot,
        "symbol=BTCUSDT&interval=2m",
    ))
    .await;
    assert_eq!(
        r.json(),
        serde_json::json!({"code": -1120, "msg": "Invalid interval."})
    );
    // 1s exists on spot.
    assert_eq!(
        klines(&sim, Market::Spot, "symbol=BTCUSDT&interval=1s&limit=5")
            .await
            .len(),
        5
    );
    let r = get(&format!(
        "{}/exchangeInfo?symbol=NOPE",
        sim.rest_base(Market::Spot)
    ))
    .await;
    assert_eq!(r.code(), -1121);
    assert_eq!(sim.count_status(400), 14);
    assert!(sim
        .requests()
        .iter()
        .all(|r| r.kind == RequestKind::Rest && r.peer == ip("127.0.0.1")));
}

#[tokio::test]
async fn exchange_info_time_and_ping() {
    let cfg = SimConfig::default()
        .with_symbol(Market::Cm, "SOLUSD_PERP", 1_600_000_000_000)
        .with_symbol(Market::Spot, "BTCUSDT", T2023)
        .with_budget(Market::Cm, 100, Duration::from_secs(2));
    let sim = start(cfg).await;
    let info = get(&format!("{}/exchangeInfo", sim.rest_base(Market::Spot))).await;
    assert_eq!(info.header("x-mbx-used-weight-1m").as_deref(), Some("20"));
    let info = info.json();
    assert_eq!(
        info["rateLimits"],
        serde_json::json!([{"rateLimitType": "REQUEST_WEIGHT", "interval": "MINUTE", "intervalNum": 1, "limit": 6000}])
    );
    let syms: Vec<&str> = info["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(syms, vec!["BNBBTC", "BTCUSDT", "ETHUSDT"]);
    assert!(info["symbols"]
        .as_array()
        .unwrap()
        .iter()
        .all(|s| s["status"] == "TRADING"));

    let um = get(&format!("{}/exchangeInfo", sim.rest_base(Market::Um)))
        .await
        .json();
    assert_eq!(um["rateLimits"][0]["limit"], 2400);
    let btc = &um["symbols"][0];
    assert_eq!(
        (
            btc["symbol"].as_str(),
            btc["status"].as_str(),
            btc["contractType"].as_str()
        ),
        (Some("BTCUSDT"), Some("TRADING"), Some("PERPETUAL"))
    );
    assert_eq!(btc["onboardDate"], sim::DEFAULT_LISTING_MS);

    let cm = get(&format!("{}/exchangeInfo", sim.rest_base(Market::Cm))).await;
    assert_eq!(cm.header("x-mbx-used-weight-2s").as_deref(), Some("1"));
    let cm = cm.json();
    assert_eq!(
        cm["rateLimits"],
        serde_json::json!([{"rateLimitType": "REQUEST_WEIGHT", "interval": "SECOND", "intervalNum": 2, "limit": 100}])
    );
    let syms = cm["symbols"].as_array().unwrap();
    assert_eq!(syms.len(), 3);
    let perp = syms.iter().find(|s| s["symbol"] == "BTCUSD_PERP").unwrap();
    assert_eq!(perp["contractStatus"], "TRADING");
    assert_eq!(perp["pair"], "BTCUSD");
    assert_eq!(perp["contractType"], "PERPETUAL");
    assert_eq!(perp["onboardDate"], sim::DEFAULT_CM_LISTING_MS);
    let sol = syms.iter().find(|s| s["symbol"] == "SOLUSD_PERP").unwrap();
    assert_eq!(sol["onboardDate"], 1_600_000_000_000i64);

    // with_symbol overrides the listing time.
    let rows = klines(
        &sim,
        Market::Spot,
        "symbol=BTCUSDT&interval=1h&startTime=0&limit=1",
    )
    .await;
    assert_eq!(opens(&rows), vec![T2023]);

    for market in Market::ALL {
        let before = now_ms();
        let t = get(&format!("{}/time", sim.rest_base(market))).await.json();
        let server = t["serverTime"].as_i64().unwrap();
        assert!(server >= before && server <= now_ms());
        let ping = get(&format!("{}/ping", sim.rest_base(market))).await;
        assert_eq!((ping.status, ping.json()), (200, serde_json::json!({})));
    }
    let unknown = get(&format!("{}/nope", sim.rest_base(Market::Um))).await;
    assert_eq!(unknown.status, 404);
}

#[tokio::test]
async fn weight_is_charged_then_429_then_418_ban() {
    // The rate windows run on a manual clock: no request can straddle a window boundary.
    let clock = ManualClock::new(WINDOW_START);
    let cfg = SimConfig::default()
        .with_budget(Market::Spot, 10, Duration::from_secs(60))
        .with_ban_duration(Duration::from_secs(30))
        .with_clock(SimClock::Manual(clock.clone()));
    let sim = start(cfg).await;
    let url = klines_url(&sim, Market::Spot, "symbol=BTCUSDT&interval=1m&limit=1");
    let me = ip("127.0.0.1");
    for used in [2, 4, 6, 8, 10] {
        let r = get(&url).await;
        assert_eq!(r.status, 200);
        assert_eq!(r.header("x-mbx-used-weight-1m"), Some(used.to_string()));
    }
    assert_eq!(sim.used_weight(Market::Spot, me), 10);
    clock.advance(Duration::from_secs(15));
    for _ in 0..2 {
        let r = get(&url).await;
        assert_eq!((r.status, r.code()), (429, -1003));
        assert_eq!(r.header("x-mbx-used-weight-1m").as_deref(), Some("10"));
        // Until the window ends.
        assert_eq!(r.header("retry-after").as_deref(), Some("45"));
    }
    // The third refusal in the window bans the IP on that market.
    for _ in 0..2 {
        let r = get(&url).await;
        assert_eq!((r.status, r.code()), (418, -1003));
        assert_eq!(r.header("retry-after").as_deref(), Some("30"));
        let banned_until = WINDOW_START + 45_000;
        assert!(
            r.json()["msg"]
                .as_str()
                .unwrap()
                .contains(&format!("IP banned until {banned_until}.")),
            "{:?}",
            r.json()
        );
    }
    let r = get(&format!("{}/ping", sim.rest_base(Market::Spot))).await;
    assert_eq!(r.status, 418);
    // Refused requests were not charged.
    assert_eq!(sim.used_weight(Market::Spot, me), 10);
    assert_eq!((sim.count_status(429), sim.count_status(418)), (2, 3));
    let charged: u32 = sim.requests().iter().map(|r| r.weight).sum();
    assert_eq!(charged, 10);
    // Other markets and other IPs are separate.
    let r = get(&format!("{}/ping", sim.rest_base(Market::Um))).await;
    assert_eq!(
        (r.status, r.header("x-mbx-used-weight-1m").as_deref()),
        (200, Some("1"))
    );
    let r = get_with(&client_from("127.0.0.2"), &url).await;
    assert_eq!(
        (r.status, r.header("x-mbx-used-weight-1m").as_deref()),
        (200, Some("2"))
    );
    sim.clear_bans();
    assert_eq!(get(&url).await.status, 429);
    // The next window: the budget is back.
    clock.advance(Duration::from_secs(45));
    let r = get(&url).await;
    assert_eq!(
        (r.status, r.header("x-mbx-used-weight-1m").as_deref()),
        (200, Some("2"))
    );
}

#[tokio::test]
async fn a_short_window_resets_after_retry_after() {
    let clock = ManualClock::new(WINDOW_START);
    let cfg = SimConfig::default()
        .with_budget(Market::Um, 4, Duration::from_secs(2))
        .with_clock(SimClock::Manual(clock.clone()));
    let sim = start(cfg).await;
    let url = klines_url(&sim, Market::Um, "symbol=BTCUSDT&interval=1m&limit=100"); // weight 2
    assert_eq!(
        get(&url).await.header("x-mbx-used-weight-2s").as_deref(),
        Some("2")
    );
    assert_eq!(
        get(&url).await.header("x-mbx-used-weight-2s").as_deref(),
        Some("4")
    );
    clock.advance(Duration::from_millis(500));
    let r = get(&url).await;
    assert_eq!(r.status, 429);
    // 1.5 s are left in the window, rounded up.
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert_eq!(retry, 2);
    // A moment before the window ends, still refused.
    clock.advance(Duration::from_millis(1_499));
    assert_eq!(get(&url).await.status, 429);
    // Honouring Retry-After is enough.
    clock.set(WINDOW_START + 500 + 1000 * i64::try_from(retry).unwrap());
    let r = get(&url).await;
    assert_eq!(
        (r.status, r.header("x-mbx-used-weight-2s").as_deref()),
        (200, Some("2"))
    );
}

#[tokio::test]
async fn faults_451_403_and_503() {
    let sim = start(SimConfig::default()).await;
    let url = klines_url(&sim, Market::Um, "symbol=BTCUSDT&interval=1h&limit=1");
    sim.set_deny_451(vec![ip("127.0.0.2")]);
    let r = get_with(&client_from("127.0.0.2"), &url).await;
    assert_eq!((r.status, r.code()), (451, 0));
    assert!(r.json()["msg"]
        .as_str()
        .unwrap()
        .starts_with("Service unavailable from a restricted location"));
    assert_eq!(get(&url).await.status, 200);
    assert_eq!(sim.used_weight(Market::Um, ip("127.0.0.2")), 0);
    let denied: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.status == 451)
        .collect();
    assert_eq!(denied.len(), 1);
    assert_eq!(
        (denied[0].peer, denied[0].market, denied[0].path.as_str()),
        (ip("127.0.0.2"), Some(Market::Um), "/fapi/v1/klines")
    );
    assert_eq!(denied[0].query, "symbol=BTCUSDT&interval=1h&limit=1");

    sim.set_forbid_403(true);
    assert_eq!(get(&url).await.status, 403);
    sim.set_forbid_403(false);

    sim.fail_next_5xx(2);
    assert_eq!(get(&url).await.status, 503);
    assert_eq!(
        get(&format!("{}/ping", sim.rest_base(Market::Spot)))
            .await
            .status,
        503
    );
    assert_eq!(get(&url).await.status, 200);
    assert_eq!(sim.count_status(503), 2);
}

/// Downloads an archive zip and its checksum; returns (zip bytes, checksum text).
async fn archive(sim: &SimHandle, path: &str) -> (Resp, Resp) {
    let base = format!("{}/data/{path}", sim.archive_url());
    (get(&base).await, get(&format!("{base}.CHECKSUM")).await)
}

fn unzip_one(bytes: &[u8]) -> (String, String) {
    let mut z = zip::ZipArchive::new(std::io::Cursor::new(bytes)).unwrap();
    assert_eq!(z.len(), 1);
    let mut f = z.by_index(0).unwrap();
    let name = f.name().unwrap().to_string();
    let mut text = String::new();
    f.read_to_string(&mut text).unwrap();
    (name, text)
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[tokio::test]
async fn archives_with_checksums_and_quirks() {
    let sim = start(SimConfig::default()).await;

    // Futures 2022+: header row; checksum in sha256sum format.
    let (zip, sum) = archive(
        &sim,
        "futures/um/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-2023-03.zip",
    )
    .await;
    assert_eq!((zip.status, sum.status), (200, 200));
    assert_eq!(
        String::from_utf8(sum.body.clone()).unwrap(),
        format!("{}  BTCUSDT-1h-2023-03.zip\n", sha256_hex(&zip.body))
    );
    let (name, csv) = unzip_one(&zip.body);
    assert_eq!(name, "BTCUSDT-1h-2023-03.csv");
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines[0], "open_time,open,high,low,close,volume,close_time,quote_volume,count,taker_buy_volume,taker_buy_quote_volume,ignore");
    assert_eq!(lines.len(), 1 + 31 * 24);
    let p = pair("um", "BTCUSDT", "1h");
    let march: i64 = 1_677_628_800_000;
    for (i, line) in lines[1..].iter().enumerate() {
        assert_eq!(
            line.split(',').collect::<Vec<_>>(),
            fields(&synthetic::candle(&p, march + i as i64 * HOUR), 1)
        );
    }

    // Futures before 2022: no header.
    let (zip, _) = archive(
        &sim,
        "futures/cm/daily/klines/BTCUSD_PERP/1h/BTCUSD_PERP-1h-2021-12-31.zip",
    )
    .await;
    let (_, csv) = unzip_one(&zip.body);
    assert_eq!(csv.lines().count(), 24);
    assert!(csv.starts_with("1640908800000,"));

    // Spot: no header; microseconds from 2025 on, milliseconds before.
    let (zip, sum) = archive(
        &sim,
        "spot/monthly/klines/BTCUSDT/1d/BTCUSDT-1d-2025-01.zip",
    )
    .await;
    assert!(String::from_utf8(sum.body)
        .unwrap()
        .starts_with(&sha256_hex(&zip.body)));
    let (_, csv) = unzip_one(&zip.body);
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 31);
    assert!(lines[0].starts_with("1735689600000000,"));
    assert_eq!(lines[0].split(',').nth(6), Some("1735775999999999"));
    let p = pair("spot", "BTCUSDT", "1d");
    assert_eq!(
        lines[30].split(',').collect::<Vec<_>>(),
        fields(&synthetic::candle(&p, 1_735_689_600_000 + 30 * DAY), 1000)
    );
    let (zip, _) = archive(
        &sim,
        "spot/daily/klines/BTCUSDT/1m/BTCUSDT-1m-2024-12-31.zip",
    )
    .await;
    let (_, csv) = unzip_one(&zip.body);
    assert_eq!(csv.lines().count(), 1440);
    assert!(csv.starts_with("1735603200000,"));
    assert!(csv.lines().next().unwrap().contains(",1735603259999,"));

    // Listing: the cm month of the listing holds candles from the listing day on.
    let (zip, _) = archive(
        &sim,
        "futures/cm/monthly/klines/ETHUSD_PERP/1d/ETHUSD_PERP-1d-2020-08.zip",
    )
    .await;
    let (_, csv) = unzip_one(&zip.body);
    assert_eq!(csv.lines().count(), 22);
    assert!(csv.starts_with(&sim::DEFAULT_CM_LISTING_MS.to_string()));
    // One monthly candle per 1mo file.
    let (zip, _) = archive(
        &sim,
        "futures/um/monthly/klines/ETHUSDT/1mo/ETHUSDT-1mo-2021-02.zip",
    )
    .await;
    assert_eq!(unzip_one(&zip.body).1.lines().count(), 1);

    // Files that do not exist.
    let this_month = quantservice::market::month_label(now_ms());
    let today = quantservice::market::day_label(now_ms());
    for missing in [
        "futures/cm/monthly/klines/ETHUSD_PERP/1d/ETHUSD_PERP-1d-2020-07.zip".to_string(),
        "spot/monthly/klines/XRPUSDT/1h/XRPUSDT-1h-2023-01.zip".to_string(),
        "spot/daily/klines/BTCUSDT/1w/BTCUSDT-1w-2023-01-02.zip".to_string(),
        "spot/monthly/klines/BTCUSDT/1M/BTCUSDT-1M-2023-01.zip".to_string(),
        "futures/um/monthly/klines/BTCUSDT/1s/BTCUSDT-1s-2023-01.zip".to_string(),
        format!("spot/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-{this_month}.zip"),
        format!("spot/daily/klines/BTCUSDT/1h/BTCUSDT-1h-{today}.zip"),
        format!("spot/daily/klines/BTCUSDT/1h/BTCUSDT-1h-{today}.zip.CHECKSUM"),
    ] {
        assert_eq!(
            get(&format!("{}/data/{missing}", sim.archive_url()))
                .await
                .status,
            404,
            "{missing}"
        );
    }

    // Bad checksums: same zip, wrong digest.
    sim.set_bad_checksum(true);
    let (zip, sum) = archive(
        &sim,
        "futures/um/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-2023-03.zip",
    )
    .await;
    let sum = String::from_utf8(sum.body).unwrap();
    assert!(sum.ends_with("  BTCUSDT-1h-2023-03.zip\n") && sum.len() == 64 + 2 + 22 + 1);
    assert!(!sum.starts_with(&sha256_hex(&zip.body)));
    sim.set_bad_checksum(false);

    // Archives switched off.
    sim.set_archives_available(false);
    let (zip, sum) = archive(
        &sim,
        "futures/um/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-2023-03.zip",
    )
    .await;
    assert_eq!((zip.status, sum.status), (404, 404));
    sim.set_archives_available(true);

    // Archive requests are recorded but weigh nothing.
    let recs: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.kind == RequestKind::Archive)
        .collect();
    assert!(recs.len() > 20 && recs.iter().all(|r| r.weight == 0));
    assert!(recs.iter().any(|r| r.market == Some(Market::Cm)));
    assert_eq!(sim.used_weight(Market::Um, ip("127.0.0.1")), 0);
}

#[tokio::test]
async fn maintenance_gaps_hide_candles_in_rest_and_archives() {
    let sim = start(SimConfig::default()).await;
    let day = T2023 + 30 * DAY;
    let (gap_start, gap_end) = (day + 5 * 60_000, day + 10 * 60_000);
    sim.add_maintenance(
        Market::Um,
        Some("BTCUSDT".parse().unwrap()),
        gap_start,
        gap_end,
    );
    sim.add_maintenance(Market::Cm, None, gap_start, gap_end);

    let minutes = |rows: &[Vec<Value>]| {
        opens(rows)
            .iter()
            .map(|o| (o - day) / 60_000)
            .collect::<Vec<_>>()
    };
    let rows = klines(
        &sim,
        Market::Um,
        &format!("symbol=BTCUSDT&interval=1m&startTime={day}&limit=10"),
    )
    .await;
    assert_eq!(minutes(&rows), vec![0, 1, 2, 3, 4, 10, 11, 12, 13, 14]);
    let rows = klines(
        &sim,
        Market::Um,
        &format!(
            "symbol=BTCUSDT&interval=1m&endTime={}&limit=7",
            day + 11 * 60_000
        ),
    )
    .await;
    assert_eq!(minutes(&rows), vec![0, 1, 2, 3, 4, 10, 11]);
    // Other symbols of um are unaffected; every cm symbol is affected.
    let rows = klines(
        &sim,
        Market::Um,
        &format!("symbol=ETHUSDT&interval=1m&startTime={day}&limit=10"),
    )
    .await;
    assert_eq!(rows.len(), 10);
    assert_eq!(minutes(&rows)[9], 9);
    let rows = klines(
        &sim,
        Market::Cm,
        &format!(
            "symbol=ETHUSD_PERP&interval=1m&startTime={day}&endTime={}&limit=20",
            day + 14 * 60_000
        ),
    )
    .await;
    assert_eq!(minutes(&rows), vec![0, 1, 2, 3, 4, 10, 11, 12, 13, 14]);
    // A candle that only partly overlaps the gap still exists.
    let rows = klines(
        &sim,
        Market::Um,
        &format!("symbol=BTCUSDT&interval=1h&startTime={day}&limit=1"),
    )
    .await;
    assert_eq!(opens(&rows), vec![day]);

    let label = quantservice::market::day_label(day);
    let (zip, sum) = archive(
        &sim,
        &format!("futures/um/daily/klines/BTCUSDT/1m/BTCUSDT-1m-{label}.zip"),
    )
    .await;
    assert!(String::from_utf8(sum.body)
        .unwrap()
        .starts_with(&sha256_hex(&zip.body)));
    let (_, csv) = unzip_one(&zip.body);
    assert_eq!(csv.lines().count(), 1 + 1440 - 5);
    assert!(!csv.contains(&format!("\n{gap_start},")));
}

/// Parses a CSV line's decimals so trailing zeros do not matter.
fn same_values(served: &[String], csv_line: &str) -> bool {
    let expected: Vec<&str> = csv_line.split(',').collect();
    served.len() == 12
        && served
            .iter()
            .zip(&expected)
            .enumerate()
            .all(|(i, (a, b))| match i {
                0 | 6 | 8 | 11 => a == b,
                _ => a.parse::<Decimal>().unwrap() == b.parse::<Decimal>().unwrap(),
            })
}

#[tokio::test]
async fn real_csv_series_are_served_exactly() {
    let spot = pair("spot", "BTCUSDT", "1h");
    let um = pair("um", "BTCUSDT", "1h");
    let cfg = SimConfig::default()
        .with_csv_series(spot.clone(), Path::new(SPOT_CSV))
        .unwrap()
        .with_csv_series(um.clone(), Path::new(UM_CSV))
        .unwrap();
    let sim = start(cfg).await;
    let text = std::fs::read_to_string(SPOT_CSV).unwrap();
    let csv: Vec<&str> = text.lines().skip(1).collect();
    assert_eq!(csv.len(), 744);
    let jan: i64 = 1_640_995_200_000;

    // The pair starts at the first row.
    let rows = klines(
        &sim,
        Market::Spot,
        "symbol=BTCUSDT&interval=1h&startTime=0&limit=1",
    )
    .await;
    assert_eq!(opens(&rows), vec![jan]);
    // Spot prints 8 decimals, exactly as the CSV.
    let rows = klines(
        &sim,
        Market::Spot,
        &format!("symbol=BTCUSDT&interval=1h&startTime={jan}&limit=1000"),
    )
    .await;
    assert_eq!(rows.len(), 1000);
    for (row, line) in rows.iter().zip(&csv) {
        assert_eq!(row_fields(row).join(","), *line);
    }
    // After the last row synthetic candles continue.
    assert_eq!(rows[744][0].as_i64().unwrap(), jan + 744 * HOUR);
    assert_rest_row(&rows[744], &synthetic::candle(&spot, jan + 744 * HOUR));
    // Other periods of the symbol stay synthetic from the symbol's listing.
    let rows = klines(
        &sim,
        Market::Spot,
        "symbol=BTCUSDT&interval=1d&startTime=0&limit=1",
    )
    .await;
    assert_eq!(opens(&rows), vec![sim::DEFAULT_LISTING_MS]);

    // The monthly archive holds the same lines (spot: no header).
    let (zip, _) = archive(
        &sim,
        "spot/monthly/klines/BTCUSDT/1h/BTCUSDT-1h-2022-01.zip",
    )
    .await;
    let (_, served) = unzip_one(&zip.body);
    assert_eq!(served.lines().collect::<Vec<_>>(), csv);

    // um: futures print the shortest form; equal values, trailing zeros aside.
    let text = std::fs::read_to_string(UM_CSV).unwrap();
    let um_csv: Vec<&str> = text.lines().skip(1).collect();
    let june: i64 = 1_717_200_000_000; // 2024-06-01
    let first = um_csv
        .iter()
        .position(|l| l.starts_with(&june.to_string()))
        .unwrap();
    let rows = klines(
        &sim,
        Market::Um,
        &format!("symbol=BTCUSDT&interval=1h&startTime={june}&limit=1500"),
    )
    .await;
    assert_eq!(rows.len(), 1500);
    for (row, line) in rows.iter().zip(&um_csv[first..]) {
        assert!(same_values(&row_fields(row), line), "{line}");
    }
    let rows = klines(
        &sim,
        Market::Um,
        "symbol=BTCUSDT&interval=1h&startTime=0&limit=1",
    )
    .await;
    assert_eq!(opens(&rows), vec![1_704_067_200_000]);
}

#[tokio::test]
async fn shutdown_stops_the_server() {
    let sim = start(SimConfig::default()).await;
    let url = format!("{}/ping", sim.rest_base(Market::Spot));
    assert_eq!(
        sim.rest_url(Market::Um),
        format!("http://{}/fapi/v1/klines", sim.addr())
    );
    assert_eq!(
        sim.rest_url(Market::Cm),
        format!("http://{}/dapi/v1/klines", sim.addr())
    );
    assert_eq!(sim.archive_url(), format!("http://{}", sim.addr()));
    assert_eq!(get(&url).await.status, 200);
    let clone = sim.clone();
    clone.shutdown().await;
    let err = reqwest::Client::new().get(&url).send().await;
    assert!(err.is_err());
}
