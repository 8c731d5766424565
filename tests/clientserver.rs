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

fn candle(pair: &PairKey, i: i64) -> Kline {
    let d = |m: i128| Decimal::from_mantissa(m);
    Kline {
        pair: pair.clone(),
        open_time: 1_700_000_000_000 + i * 60_000,
        close_time: 1_700_000_000_000 + i * 60_000 + 59_999,
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
    assert_eq!(data["data"]["open_time"], 1_700_000_000_000i64);
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
    let reading = tokio::spawn(async move {
        let mut next = 0i64;
        loop {
            let v = next_json(&mut reader).await;
            let t = v["data"]["open_time"].as_i64().unwrap();
            assert_eq!(
                t,
                1_700_000_000_000 + next * 60_000,
                "in order, none missing"
            );
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
