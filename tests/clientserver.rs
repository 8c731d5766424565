//! The client WebSocket endpoint over real loopback sockets with a real WebSocket client:
//! subscribe / list / ping / unsubscribe, error frames that keep the connection open, the
//! subscription limit, live frames from the hub, a client that stops reading cut off as a slow
//! consumer (close 1008) while another keeps every frame, and 1001 on shutdown.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use quantservice::market::{Decimal, Kline, PairKey, Source};
use quantservice::server::client::{router, serve, ClientState, Limits};
use quantservice::server::hub::Hub;
use quantservice::store::writer::Writer;
use quantservice::store::{migrate, Store};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;
use tokio_util::sync::CancellationToken;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The `i`-th one-minute candle from the minute the tests started (live-only subscribers get
/// candles from the one before the forming one on, so these are recent).
fn candle(pair: &PairKey, i: i64) -> Kline {
    static BASE: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
    let base = *BASE
        .get_or_init(|| quantservice::market::Period::M1.align(quantservice::market::now_ms()));
    candle_at(pair, base, i)
}

/// The `i`-th one-minute candle from `base`.
fn candle_at(pair: &PairKey, base: i64, i: i64) -> Kline {
    let d = |m: i128| Decimal::from_mantissa(m);
    Kline {
        pair: pair.clone(),
        open_time: base + i * 60_000,
        close_time: base + i * 60_000 + 59_999,
        open: d(4_200_000_000_000 + i128::from(i)),
        high: d(4_300_000_000_000),
        low: d(4_100_000_000_000),
        close: d(4_250_000_000_001),
        volume: d(123_456_789),
        quote_volume: d(987_654_321_000),
        trades: 7,
        taker_buy_volume: d(1),
        taker_buy_quote_volume: d(2),
        is_final: true,
        source: Source::Ws,
    }
}

struct Server {
    url: String,
    hub: Hub,
    shutdown: CancellationToken,
}

async fn server(limits: Limits) -> Server {
    server_with_tokens(limits, Vec::new()).await
}

async fn server_with_tokens(limits: Limits, tokens: Vec<String>) -> Server {
    server_on(None, limits, tokens).await
}

async fn server_on(store: Option<Store>, limits: Limits, tokens: Vec<String>) -> Server {
    let hub = Hub::default();
    let shutdown = CancellationToken::new();
    let state = ClientState::new(hub.clone(), store, limits, tokens, shutdown.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(serve(listener, router(state), CancellationToken::new()));
    Server {
        url: format!("ws://{addr}/ws"),
        hub,
        shutdown,
    }
}

async fn connect(url: &str) -> Ws {
    tokio_tungstenite::connect_async(url).await.unwrap().0
}

/// The next text frame as JSON (pings skipped), within 10 s.
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a frame within 10 s")
            .expect("connection open")
            .unwrap();
        match msg {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn say(ws: &mut Ws, text: &str) -> Value {
    ws.send(Message::text(text)).await.unwrap();
    next_json(ws).await
}

fn sub(id: u64, symbol: &str) -> String {
    format!(
        r#"{{"op":"subscribe","id":{id},"channel":"klines","market":"um","symbol":"{symbol}","period":"1m"}}"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_are_answered_and_bad_ones_keep_the_connection() {
    let srv = server(Limits {
        max_subscriptions: 2,
        ..Limits::default()
    })
    .await;
    let mut ws = connect(&srv.url).await;
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();

    let r = say(&mut ws, &sub(1, "BTCUSDT")).await;
    assert_eq!(
        (r["op"].as_str(), r["id"].as_u64()),
        (Some("subscribed"), Some(1))
    );
    srv.hub.publish_kline(&candle(&pair, 0));
    let data = next_json(&mut ws).await;
    assert_eq!(data["channel"], "klines");
    assert_eq!(data["data"]["open_time"], candle(&pair, 0).open_time);
    assert_eq!(data["data"]["open"], candle(&pair, 0).open.to_string());

    for (text, code) in [
        ("{not json", "bad_request"),
        (r#"{"op":"dance","id":4}"#, "bad_request"),
        (
            r#"{"op":"subscribe","id":5,"channel":"klines","market":"um","symbol":"BTCUSDT","period":"7m"}"#,
            "bad_request",
        ),
    ] {
        let r = say(&mut ws, text).await;
        assert_eq!(r["op"], "error", "{text}");
        assert_eq!(r["code"], code, "{text}");
    }
    let r = say(&mut ws, &sub(6, "ETHUSDT")).await;
    assert_eq!(r["op"], "subscribed");
    let r = say(&mut ws, &sub(7, "SOLUSDT")).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str()),
        (Some("error"), Some("limit"))
    );
    assert_eq!(r["id"], 7);

    let r = say(&mut ws, r#"{"op":"list","id":8}"#).await;
    let symbols: Vec<&str> = r["subscriptions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["symbol"].as_str().unwrap())
        .collect();
    assert_eq!(symbols, ["BTCUSDT", "ETHUSDT"]);
    let r = say(&mut ws, r#"{"op":"ping","id":9}"#).await;
    assert_eq!(
        (r["op"].as_str(), r["id"].as_u64()),
        (Some("pong"), Some(9))
    );

    let r = say(
        &mut ws,
        r#"{"op":"unsubscribe","id":10,"channel":"klines","market":"um","symbol":"BTCUSDT","period":"1m"}"#,
    )
    .await;
    assert_eq!(r["op"], "unsubscribed");
    srv.hub.publish_kline(&candle(&pair, 1));
    // Nothing for BTCUSDT any more: the next frame is the answer to this ping.
    let r = say(&mut ws, r#"{"op":"ping","id":11}"#).await;
    assert_eq!(r["op"], "pong");

    srv.shutdown.cancel();
    loop {
        match ws.next().await {
            Some(Ok(Message::Close(Some(f)))) => {
                assert_eq!(u16::from(f.code), 1001);
                break;
            }
            Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_is_cut_off_and_others_get_every_frame() {
    let srv = server(Limits {
        send_queue: 256,
        ..Limits::default()
    })
    .await;
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    let mut stalled = connect(&srv.url).await;
    let mut reader = connect(&srv.url).await;
    assert_eq!(
        say(&mut stalled, &sub(1, "BTCUSDT")).await["op"],
        "subscribed"
    );
    assert_eq!(
        say(&mut reader, &sub(1, "BTCUSDT")).await["op"],
        "subscribed"
    );

    // The reader counts what it gets, in order.
    let got = Arc::new(AtomicU64::new(0));
    let counter = got.clone();
    let pair_r = pair.clone();
    let reading = tokio::spawn(async move {
        let mut next = 0i64;
        loop {
            let v = next_json(&mut reader).await;
            let t = v["data"]["open_time"].as_i64().unwrap();
            assert_eq!(t, candle(&pair_r, next).open_time, "in order, none missing");
            next += 1;
            counter.store(next as u64, Ordering::SeqCst);
            if next == 200_000 || v["data"]["trades"] == 0 {
                return next;
            }
        }
    });
    // Publish in steps the reader keeps up with, until the stalled client is cut off.
    let mut sent = 0i64;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while srv.hub.stats().slow_consumers() == 0 {
        assert!(tokio::time::Instant::now() < deadline, "never cut off");
        for _ in 0..100 {
            srv.hub.publish_kline(&candle(&pair, sent));
            sent += 1;
        }
        while got.load(Ordering::SeqCst) + 100 < sent as u64 {
            assert!(
                tokio::time::Instant::now() < deadline && !reading.is_finished(),
                "the reader stopped getting frames"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }
    assert_eq!(srv.hub.stats().slow_consumers(), 1, "only the stalled one");
    // The last frame tells the reader to stop.
    let mut last = candle(&pair, sent);
    last.trades = 0;
    srv.hub.publish_kline(&last);
    let received = reading.await.unwrap();
    assert_eq!(received, sent + 1, "the reader got every frame");

    // The stalled client, reading again, finds what was buffered, then close 1008.
    let code = loop {
        match tokio::time::timeout(Duration::from_secs(10), stalled.next()).await {
            Ok(Some(Ok(Message::Close(Some(f))))) => break u16::from(f.code),
            Ok(Some(Ok(_))) => {}
            other => panic!("expected a close frame, got {other:?}"),
        }
    };
    assert_eq!(code, 1008);
}

/// The HTTP status a handshake to `url` (with an optional `Authorization` header) gets.
async fn handshake(url: &str, bearer: Option<&str>) -> u16 {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    match tokio_tungstenite::connect_async(req).await {
        Ok((_, resp)) => resp.status().as_u16(),
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => resp.status().as_u16(),
        Err(e) => panic!("handshake failed: {e}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_are_checked_at_the_handshake_and_connections_are_limited_per_ip() {
    let srv = server_with_tokens(
        Limits {
            max_connections_per_ip: 2,
            ..Limits::default()
        },
        vec!["s3cret-token".to_string()],
    )
    .await;
    assert_eq!(handshake(&srv.url, None).await, 401, "no token");
    assert_eq!(handshake(&srv.url, Some("wrong")).await, 401, "wrong token");
    assert_eq!(
        handshake(&format!("{}?token=wrong", srv.url), None).await,
        401
    );
    // Two connections are allowed from 127.0.0.1 (by header and by query), the third is not.
    let mut a = connect_with(&srv.url, Some("s3cret-token")).await;
    let mut b = connect_with(&format!("{}?token=s3cret-token", srv.url), None).await;
    assert_eq!(say(&mut a, r#"{"op":"ping"}"#).await["op"], "pong");
    assert_eq!(say(&mut b, r#"{"op":"ping"}"#).await["op"], "pong");
    assert_eq!(handshake(&srv.url, Some("s3cret-token")).await, 429);
    // A closed connection frees its place.
    a.close(None).await.unwrap();
    drop(a);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match handshake(&srv.url, Some("s3cret-token")).await {
            101 => break,
            429 if tokio::time::Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(20)).await
            }
            other => panic!("status {other}"),
        }
    }
}

async fn connect_with(url: &str, bearer: Option<&str>) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let mut req = url.into_client_request().unwrap();
    if let Some(t) = bearer {
        req.headers_mut()
            .insert("authorization", format!("Bearer {t}").parse().unwrap());
    }
    tokio_tungstenite::connect_async(req).await.unwrap().0
}

/// The frames' `open_time`s until (and with) `last`, in arrival order (pings skipped).
async fn open_times_until(ws: &mut Ws, last: i64) -> Vec<i64> {
    let mut got = Vec::new();
    loop {
        let v = next_json(ws).await;
        assert_eq!(v["channel"], "klines", "{v}");
        assert_eq!(v["data"]["is_final"], true, "{v}");
        let t = v["data"]["open_time"].as_i64().unwrap();
        got.push(t);
        if t >= last {
            return got;
        }
    }
}

/// A store with the schema, and a writer running on it (flushing every `flush`).
async fn store_and_writer(
    db: &common::TestDb,
    flush: &str,
) -> (Store, quantservice::store::writer::WriterHandle) {
    let cfg = db.config(&format!(
        "  writer:\n    batch_rows: 5000\n    flush_interval: {flush}\n"
    ));
    let store = Store::new(&cfg.clickhouse).unwrap();
    migrate::run(&store).await.unwrap();
    let (writer, handle) = Writer::new(store.clone(), cfg.writer.clone());
    tokio::spawn(writer.run(CancellationToken::new()));
    (store, handle)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replay_then_live_has_no_gap_and_no_duplicate_at_the_seam() {
    let db = common::TestDb::new("cs_seam");
    // A slow flush: live candles are published well before they are stored, as in the daemon.
    let (store, writer) = store_and_writer(&db, "400ms").await;
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    const STORED: i64 = 30_000;
    const LIVE: i64 = 3_000;
    for i in 0..STORED {
        writer.send(candle(&pair, i)).await.unwrap();
    }
    common::wait_stored(
        &db,
        &pair,
        candle(&pair, 0).open_time,
        candle(&pair, STORED).open_time,
        60,
    )
    .await;
    let srv = server_on(Some(store), Limits::default(), Vec::new()).await;
    // As in the daemon: the hub forgets pending candles once the writer stored them.
    let hub = srv.hub.clone();
    writer.commits().set_hook(Arc::new(move |c| hub.confirm(c)));

    // The live sink's order: the hub first, then the writer.
    let published = Arc::new(AtomicU64::new(0));
    let producer = {
        let (hub, writer, pair, published) = (
            srv.hub.clone(),
            writer.clone(),
            pair.clone(),
            published.clone(),
        );
        tokio::spawn(async move {
            for i in STORED..STORED + LIVE {
                let k = candle(&pair, i);
                hub.publish_kline(&k);
                writer.send(k).await.unwrap();
                published.fetch_add(1, Ordering::SeqCst);
                // Paced, so that the replay runs while candles keep arriving.
                tokio::time::sleep(Duration::from_micros(500)).await;
            }
        })
    };
    while published.load(Ordering::SeqCst) < 100 {
        tokio::task::yield_now().await;
    }
    let from = 1_000;
    let since = candle(&pair, from).open_time;
    let mut ws = connect(&srv.url).await;
    let at_subscribe = published.load(Ordering::SeqCst);
    let r = say(
        &mut ws,
        &format!(
            r#"{{"op":"subscribe","id":1,"channel":"klines","market":"um","symbol":"BTCUSDT","period":"1m","since":{since}}}"#
        ),
    )
    .await;
    assert_eq!(r["op"], "subscribed", "{r}");
    let got = open_times_until(&mut ws, candle(&pair, STORED + LIVE - 1).open_time).await;
    producer.await.unwrap();
    assert!(
        at_subscribe < LIVE as u64 / 2,
        "the subscription must start while candles are still arriving ({at_subscribe} published)"
    );
    let want: Vec<i64> = (from..STORED + LIVE)
        .map(|i| candle(&pair, i).open_time)
        .collect();
    assert_eq!(got.len(), want.len(), "no gap, no duplicate");
    assert_eq!(got, want, "every candle once, in order");
    // And nothing more is queued: the next frame answers a ping.
    let r = say(&mut ws, r#"{"op":"ping","id":2}"#).await;
    assert_eq!(r["op"], "pong", "{r}");
    common::wait_stored(
        &db,
        &pair,
        candle(&pair, 0).open_time,
        candle(&pair, STORED + LIVE).open_time,
        60,
    )
    .await;
    let ch = quantservice::server::protocol::Channel::Klines(pair.clone());
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while srv.hub.pending(&ch) > 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "stored candles are forgotten: {} still pending",
            srv.hub.pending(&ch)
        );
        tokio::task::yield_now().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_pairs_are_refused_and_declared_or_stored_ones_accepted() {
    let db = common::TestDb::new("cs_unknown");
    let (store, writer) = store_and_writer(&db, "50ms").await;
    let srv = server_on(Some(store), Limits::default(), Vec::new()).await;
    let mut ws = connect(&srv.url).await;
    let r = say(&mut ws, &sub(1, "XRPUSDT")).await;
    assert_eq!(
        (r["op"].as_str(), r["code"].as_str(), r["id"].as_u64()),
        (Some("error"), Some("unknown_pair"), Some(1)),
        "{r}"
    );
    // Declared: accepted, though nothing is stored yet.
    db.sql("INSERT INTO trading_pairs (market, symbol, period) VALUES ('um', 'XRPUSDT', '1m')");
    let r = say(&mut ws, &sub(2, "XRPUSDT")).await;
    assert_eq!(r["op"], "subscribed", "{r}");
    // Stored only (no longer collected): accepted, and replayed.
    let pair = PairKey::parse("um", "ADAUSDT", "1m").unwrap();
    for i in 0..5 {
        writer.send(candle(&pair, i)).await.unwrap();
    }
    common::wait_stored(
        &db,
        &pair,
        candle(&pair, 0).open_time,
        candle(&pair, 5).open_time,
        60,
    )
    .await;
    let since = candle(&pair, 2).open_time;
    let r = say(
        &mut ws,
        &format!(
            r#"{{"op":"subscribe","id":3,"channel":"klines","market":"um","symbol":"ADAUSDT","period":"1m","since":{since}}}"#
        ),
    )
    .await;
    assert_eq!(r["op"], "subscribed", "{r}");
    let got = open_times_until(&mut ws, candle(&pair, 4).open_time).await;
    assert_eq!(
        got,
        (2..5)
            .map(|i| candle(&pair, i).open_time)
            .collect::<Vec<_>>()
    );
    // The connection is still fine.
    let r = say(&mut ws, r#"{"op":"ping","id":4}"#).await;
    assert_eq!(r["op"], "pong");
}

fn load_csv(rel: &str, pair: &PairKey) -> Vec<Kline> {
    let text = std::fs::read_to_string(common::binance_data(rel)).unwrap();
    text.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[0].parse::<i64>().is_ok())
        .map(|f| Kline::from_fields(pair.clone(), &f, true, Source::Archive).unwrap())
        .collect()
}

/// Indicator frames until one at `last` arrives: (open_time, values, correction) each.
async fn indicator_frames_until(ws: &mut Ws, last: i64) -> Vec<(i64, Value, bool)> {
    let mut got = Vec::new();
    loop {
        let v = next_json(ws).await;
        assert_eq!(v["channel"], "indicators", "{v}");
        let t = v["data"]["open_time"].as_i64().unwrap();
        got.push((
            t,
            v["data"]["values"].clone(),
            v["correction"].as_bool().unwrap_or(false),
        ));
        if t == last {
            return got;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_candle_sends_indicator_corrections_equal_to_the_healed_series() {
    use quantservice::tasks::indicators::api::{batch, Bar, Spec};
    use quantservice::tasks::indicators::IndicatorTask;

    let db = common::TestDb::new("cs_correct");
    let (store, writer) = store_and_writer(&db, "50ms").await;
    let pair = PairKey::parse("um", "ETHUSDT", "1h").unwrap();
    let klines: Vec<Kline> = load_csv("um/ETHUSDT-1h-2024-01-01_2025-12-20.csv", &pair)
        .into_iter()
        .take(700)
        .collect();
    let srv = server_on(Some(store.clone()), Limits::default(), Vec::new()).await;
    let hub = srv.hub.clone();
    writer.commits().set_hook(Arc::new(move |c| hub.confirm(c)));
    // History with a hole at 300..303.
    let hole = 300..303;
    let history: Vec<Kline> = klines[..600]
        .iter()
        .enumerate()
        .filter(|(i, _)| !hole.contains(i))
        .map(|(_, k)| k.clone())
        .collect();
    writer.send_many(history.clone()).await.unwrap();
    common::wait_stored(&db, &pair, klines[0].open_time, klines[300].open_time, 60).await;
    let spec = Spec::parse("macd(12,26,9)").unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(
        IndicatorTask::new(pair.clone(), spec.clone(), store.clone(), writer.clone())
            .with_hub(Some(srv.hub.clone()))
            .run(cancel.clone()),
    );

    let mut ws = connect(&srv.url).await;
    let r = say(
        &mut ws,
        &format!(
            r#"{{"op":"subscribe","id":1,"channel":"indicators","market":"um","symbol":"ETHUSDT","period":"1h","indicator":"MACD(12, 26, 9)","since":{}}}"#,
            klines[0].open_time
        ),
    )
    .await;
    assert_eq!(r["op"], "subscribed", "{r}");
    assert_eq!(r["indicator"], "macd(12,26,9)");
    // Replayed or live, every value of the history arrives (the task may still be computing).
    let mut got = indicator_frames_until(&mut ws, klines[599].open_time).await;
    // Online candles, then the hole is healed.
    writer.send_many(klines[600..].to_vec()).await.unwrap();
    got.extend(indicator_frames_until(&mut ws, klines[699].open_time).await);
    writer
        .send_many(klines[hole.clone()].to_vec())
        .await
        .unwrap();
    let corrections = indicator_frames_until(&mut ws, klines[699].open_time).await;
    assert!(
        corrections.iter().all(|(_, _, c)| *c),
        "values recomputed after the late candles come as corrections"
    );
    assert!(
        got.windows(2).all(|w| w[0].0 < w[1].0),
        "before the late candles: every value once, in order"
    );
    assert!(
        corrections.iter().filter(|(_, _, c)| *c).count() >= 390,
        "every value after the hole is sent again: {}",
        corrections.len()
    );
    got.extend(corrections);

    // What the client holds (the latest frame per candle) is the healed series' values.
    let mut held: std::collections::BTreeMap<i64, Value> = std::collections::BTreeMap::new();
    for (t, v, _) in got {
        held.insert(t, v);
    }
    let bars: Vec<Bar> = klines.iter().map(Bar::from_kline).collect();
    let want = batch(&spec, &bars);
    let mut compared = 0;
    for (i, k) in klines.iter().enumerate() {
        if want[0][i].is_nan() {
            assert!(!held.contains_key(&k.open_time), "no value in the warm-up");
            continue;
        }
        let v = held
            .get(&k.open_time)
            .unwrap_or_else(|| panic!("no value at candle {i}"));
        for (o, output) in spec.outputs().iter().enumerate() {
            assert_eq!(
                v[*output].as_f64().map(f64::to_bits),
                Some(want[o][i].to_bits()),
                "candle {i} {output}"
            );
        }
        compared += 1;
    }
    assert!(compared > 600, "{compared}");
    cancel.cancel();
    task.await.unwrap().unwrap();
}

/// Connects to `url`, retrying while the server starts (up to 30 s).
async fn connect_when_up(url: &str) -> Ws {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match tokio_tungstenite::connect_async(url).await {
            Ok((ws, _)) => return ws,
            Err(e) => {
                assert!(
                    std::time::Instant::now() < deadline,
                    "{url} did not come up: {e}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

/// The close frame's code, skipping data frames, within 10 s.
async fn close_code(ws: &mut Ws) -> u16 {
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a close frame within 10 s");
        match msg {
            Some(Ok(Message::Close(Some(f)))) => return u16::from(f.code),
            Some(Ok(Message::Close(None))) | None => panic!("closed without a close frame"),
            Some(Ok(_)) => {}
            Some(Err(e)) => panic!("connection error before a close frame: {e}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_standalone_server_replays_and_follows_what_another_process_stores() {
    use quantservice::store::writer::IndicatorValue;

    let db = common::TestDb::new("cs_standalone");
    let (_store, writer) = store_and_writer(&db, "50ms").await;
    let pair = PairKey::parse("um", "BTCUSDT", "1m").unwrap();
    // Recent candles: the server follows the newest periods of each pair.
    let base = quantservice::market::Period::M1.align(quantservice::market::now_ms()) - 90 * 60_000;
    let at = |i: i64| candle_at(&pair, base, i);
    writer.send_many((0..50).map(at).collect()).await.unwrap();
    common::wait_stored(&db, &pair, at(0).open_time, at(50).open_time, 60).await;

    let port = common::dead_port();
    let (_dir, path, _) =
        common::write_config(&db.yaml("  clientserver:\n    follow_interval: 100ms\n"));
    let mut server = common::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_quantservice"))
            .arg("--config")
            .arg(&path)
            .args([
                "clientserver",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut ws = connect_when_up(&url).await;
    let r = say(
        &mut ws,
        &format!(
            r#"{{"op":"subscribe","id":1,"channel":"klines","market":"um","symbol":"BTCUSDT","period":"1m","since":{}}}"#,
            at(20).open_time
        ),
    )
    .await;
    assert_eq!(r["op"], "subscribed", "{r}");
    let mut got = open_times_until(&mut ws, at(49).open_time).await;
    // Stored by another process while the client is connected: followed.
    for i in 50..60 {
        writer.send(at(i)).await.unwrap();
    }
    got.extend(open_times_until(&mut ws, at(59).open_time).await);
    assert_eq!(
        got,
        (20..60).map(|i| at(i).open_time).collect::<Vec<_>>(),
        "replayed, then followed: every candle once, in order"
    );

    // The REST facade on the same port.
    let page: Vec<Value> = reqwest::get(format!(
        "http://127.0.0.1:{port}/fapi/v1/klines?symbol=BTCUSDT&interval=1m&startTime={}&limit=3",
        at(20).open_time
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    let times: Vec<i64> = page.iter().map(|r| r[0].as_i64().unwrap()).collect();
    assert_eq!(times, (20..23).map(|i| at(i).open_time).collect::<Vec<_>>());

    // An indicator value, then a newer computation of it: sent, then sent again as a correction.
    let mut other = connect(&url).await;
    let r = say(
        &mut other,
        r#"{"op":"subscribe","id":2,"channel":"indicators","market":"um","symbol":"BTCUSDT","period":"1m","indicator":"rsi(14)"}"#,
    )
    .await;
    assert_eq!(r["op"], "subscribed", "{r}");
    // The forming candle: live-only subscribers get values from the candle before it on.
    let now = quantservice::market::Period::M1.align(quantservice::market::now_ms());
    let value = |v: f64| IndicatorValue {
        pair: pair.clone(),
        open_time: now,
        indicator: Arc::from("rsi(14)"),
        output: "value",
        value: v,
    };
    writer.send_indicators(vec![value(55.5)]).await.unwrap();
    let v = next_json(&mut other).await;
    assert_eq!(v["data"]["values"]["value"], 55.5, "{v}");
    assert!(v.get("correction").is_none(), "{v}");
    writer.send_indicators(vec![value(56.25)]).await.unwrap();
    let v = next_json(&mut other).await;
    assert_eq!(v["data"]["values"]["value"], 56.25, "{v}");
    assert_eq!(v["correction"], true, "{v}");

    // SIGTERM: every client gets 1001, and the process exits 0.
    let pid = server.id();
    std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .unwrap();
    assert_eq!(close_code(&mut ws).await, 1001);
    assert_eq!(close_code(&mut other).await, 1001);
    let status = tokio::task::spawn_blocking(move || server.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}

/// The stored closed candles of `pair` in `[from, to]` as the client server renders them.
fn stored_frames(db: &common::TestDb, pair: &PairKey, from: i64, to: i64) -> Vec<Value> {
    let out = db.sql(&format!(
        "SELECT open_time, close_time, toString(open), toString(high), toString(low), \
         toString(close), toString(volume), toString(quote_volume), trades \
         FROM klines FINAL WHERE market = '{}' AND symbol = '{}' AND period = '{}' \
         AND is_final = 1 AND open_time >= {from} AND open_time <= {to} \
         ORDER BY open_time FORMAT TSV",
        pair.market.as_str(),
        pair.symbol.as_str(),
        pair.period.as_str()
    ));
    // Decimal(38, 8) prints its digits; the frames carry the shortest exact form.
    let dec = |s: &str| s.parse::<Decimal>().unwrap().to_string();
    out.lines()
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            serde_json::json!({
                "open_time": f[0].parse::<i64>().unwrap(),
                "close_time": f[1].parse::<i64>().unwrap(),
                "open": dec(f[2]), "high": dec(f[3]), "low": dec(f[4]), "close": dec(f[5]),
                "volume": dec(f[6]), "quote_volume": dec(f[7]),
                "trades": f[8].parse::<u64>().unwrap(),
                "is_final": true,
            })
        })
        .collect()
}

/// The embedded server end to end: a daemon streaming from the simulator, its client server
/// enabled, moved and disabled by config edits without a restart; a client replays from the
/// past, then goes live with in-progress candles; every closed candle it got equals ClickHouse.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_embedded_server_streams_what_the_daemon_stores_and_follows_config_edits() {
    use quantservice::config_watch::{ReloadResult, Reloads};
    use quantservice::market::{Market, Period};

    let sim = qs_sim::start(qs_sim::SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap();
    sim.set_ws_update_interval(Some(Duration::from_millis(100)));
    let db = common::TestDb::new("cs_embedded");
    let yaml = |cs: &str| {
        db.yaml(&format!(
            "{}  writer:\n    flush_interval: 100ms\n  operator:\n    poll_interval: 200ms\n{cs}",
            common::sim_endpoints_yaml(&sim, &sim.ws_url(Market::Um))
        ))
    };
    let cs = |enabled: bool, port: u16| {
        format!(
            "  clientserver:\n    enabled: {enabled}\n    host: \"127.0.0.1\"\n    port: {port}\n"
        )
    };
    let (a, b) = (common::dead_port(), common::dead_port());
    let (_dir, path, cfg) = common::write_config(&yaml(&cs(false, a)));
    let reloads = Reloads::new();
    let shutdown = CancellationToken::new();
    let daemon = tokio::spawn(quantservice::app::run_daemon(
        cfg,
        path.clone(),
        reloads.clone(),
        shutdown.clone(),
    ));
    let edit = |yaml: String| {
        let (reloads, path) = (reloads.clone(), path.clone());
        async move { common::edit_config(&reloads, &path, &yaml).await }
    };
    common::wait_for(30, "the schema", || async {
        db.try_sql("SELECT count() FROM trading_pairs").is_ok()
    })
    .await;
    let pair = PairKey::parse("spot", "BTCUSDT", "1s").unwrap();
    let start = Period::S1.align(qs_sim::now_ms()) - 30_000;
    db.sql(&format!(
        "INSERT INTO trading_pairs (market, symbol, period, backfill_from) VALUES ('spot', 'BTCUSDT', '1s', {start})"
    ));
    let applied = ReloadResult::Applied {
        changed: vec!["clientserver".to_string()],
    };
    // Enabled by an edit.
    assert_eq!(edit(yaml(&cs(true, a))).await, applied);
    let mut ws = connect_when_up(&format!("ws://127.0.0.1:{a}/ws")).await;
    let since = start + 5_000;
    // The history is backfilled by REST while the stream already stores live candles: a
    // replay read before the backfill commits finds only the live ones, and the older ones
    // reach the client later, as healed candles do (out of order). This test wants one ordered
    // replay, so it subscribes once the history up to the live edge is stored.
    let edge = Period::S1.align(qs_sim::now_ms()) - 1_000;
    common::wait_stored(&db, &pair, start, edge, 30).await;
    let r = say(
        &mut ws,
        &format!(
            r#"{{"op":"subscribe","id":1,"channel":"klines","market":"spot","symbol":"BTCUSDT","period":"1s","since":{since},"partial":true}}"#
        ),
    )
    .await;
    assert_eq!(r["op"], "subscribed", "{r}");
    // Replay, then live: until 5 closed candles newer than the moment we subscribed.
    let live_from = Period::S1.align(qs_sim::now_ms());
    let mut finals: Vec<Value> = Vec::new();
    let mut partials = 0;
    while finals
        .last()
        .is_none_or(|d| d["open_time"].as_i64().unwrap() < live_from + 5_000)
    {
        let v = next_json(&mut ws).await;
        assert_eq!(v["symbol"], "BTCUSDT", "{v}");
        if v["data"]["is_final"] == true {
            finals.push(v["data"].clone());
        } else {
            partials += 1;
        }
    }
    assert!(partials > 0, "in-progress candles were asked for");
    let last = finals.last().unwrap()["open_time"].as_i64().unwrap();
    common::wait_stored(&db, &pair, since, last + 1_000, 30).await;
    let stored = stored_frames(&db, &pair, since, last);
    let times =
        |v: &[Value]| -> Vec<i64> { v.iter().map(|d| d["open_time"].as_i64().unwrap()).collect() };
    assert_eq!(
        times(&finals),
        times(&stored),
        "every closed candle from since, once, in order"
    );
    for (got, want) in finals.iter().zip(&stored) {
        assert_eq!(got, want, "as stored");
    }
    // Counted for the metrics (this process's servers all count into the same figures).
    use quantservice::metrics::clients;
    assert!(clients::MESSAGES.load(Ordering::Relaxed) >= finals.len() as u64);
    assert!(clients::BYTES.load(Ordering::Relaxed) > clients::MESSAGES.load(Ordering::Relaxed));
    assert!(clients::CONNECTIONS.load(Ordering::Relaxed) >= 1);
    // The REST facade answers on the same port, from the same rows.
    let page: Vec<Value> = reqwest::get(format!(
        "http://127.0.0.1:{a}/api/v3/klines?symbol=BTCUSDT&interval=1s&startTime={since}&limit=5"
    ))
    .await
    .unwrap()
    .json()
    .await
    .unwrap();
    assert_eq!(page.len(), 5);
    for (row, want) in page.iter().zip(&stored) {
        assert_eq!(row[0], want["open_time"]);
        assert_eq!(
            row[4]
                .as_str()
                .unwrap()
                .parse::<Decimal>()
                .unwrap()
                .to_string(),
            want["close"].as_str().unwrap()
        );
    }

    // Moved by an edit: the client is told (1001), the old port closes, the new one serves.
    assert_eq!(edit(yaml(&cs(true, b))).await, applied);
    assert_eq!(close_code(&mut ws).await, 1001);
    let mut ws = connect_when_up(&format!("ws://127.0.0.1:{b}/ws")).await;
    assert!(
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{a}/ws"))
            .await
            .is_err(),
        "the old port is closed"
    );
    let r = say(&mut ws, r#"{"op":"ping","id":3}"#).await;
    assert_eq!(r["op"], "pong");
    // Disabled by an edit.
    assert_eq!(edit(yaml(&cs(false, b))).await, applied);
    assert_eq!(close_code(&mut ws).await, 1001);
    assert!(
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{b}/ws"))
            .await
            .is_err(),
        "disabled"
    );
    assert!(!daemon.is_finished(), "no restart");
    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(30), daemon)
        .await
        .expect("the daemon stops")
        .unwrap()
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_sends_every_client_of_the_daemon_a_1001_close() {
    let db = common::TestDb::new("cs_sigterm");
    let port = common::dead_port();
    let (_dir, path, _) = common::write_config(&db.yaml(&format!(
        "  clientserver:\n    enabled: true\n    port: {port}\n"
    )));
    let mut daemon = common::KillOnDrop(
        std::process::Command::new(env!("CARGO_BIN_EXE_quantservice"))
            .arg("--config")
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap(),
    );
    let url = format!("ws://127.0.0.1:{port}/ws");
    let mut clients = Vec::new();
    for i in 0..3 {
        let mut ws = connect_when_up(&url).await;
        let r = say(&mut ws, &format!(r#"{{"op":"ping","id":{i}}}"#)).await;
        assert_eq!(r["op"], "pong");
        clients.push(ws);
    }
    std::process::Command::new("kill")
        .args(["-TERM", &daemon.id().to_string()])
        .status()
        .unwrap();
    for ws in &mut clients {
        assert_eq!(close_code(ws).await, 1001);
    }
    let status = tokio::task::spawn_blocking(move || daemon.0.wait().unwrap())
        .await
        .unwrap();
    assert!(status.success(), "{status}");
}
