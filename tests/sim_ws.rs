#![allow(clippy::unwrap_used)] // tests may unwrap
//! The simulator's WebSocket kline streams over real sockets: paths per market (and USD-M's
//! routed `/market` rule), control messages, events equal to REST and `synthetic` candles,
//! message-rate and stream limits, pings, lifetime and the fault switches.

mod common;

use common::binance_decimal as fmt;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use qs_sim::{self as sim, now_ms, synthetic, RequestKind, SimConfig, SimHandle};
use quantservice::market::{Kline, Market, PairKey};
use serde_json::{json, Value};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{connect_async, MaybeTlsStream, WebSocketStream};

type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const WAIT: Duration = Duration::from_secs(10);

async fn start() -> SimHandle {
    sim::start(SimConfig::default(), "127.0.0.1:0".parse().unwrap())
        .await
        .unwrap()
}

async fn connect(url: &str) -> Ws {
    connect_async(url).await.unwrap().0
}

/// The combined-stream URL a client derives from the configured raw base.
fn combined_url(sim: &SimHandle, market: Market, streams: &[&str]) -> String {
    let base = sim.ws_url(market);
    let base = base.strip_suffix("ws/").unwrap();
    format!("{base}stream?streams={}", streams.join("/"))
}

fn legacy_um_url(sim: &SimHandle, rest: &str) -> String {
    format!("ws://{}/um/{rest}", sim.addr())
}

async fn send(ws: &mut Ws, v: Value) {
    ws.send(Message::text(v.to_string())).await.unwrap();
}

/// The next frame (pings included); panics on timeout or when the connection ends.
async fn next_msg(ws: &mut Ws) -> Message {
    tokio::time::timeout(WAIT, ws.next())
        .await
        .expect("timed out waiting for a WebSocket message")
        .expect("connection ended")
        .expect("connection failed")
}

/// The next text message as JSON (ping/pong frames skipped).
async fn next_json(ws: &mut Ws) -> Value {
    loop {
        match next_msg(ws).await {
            Message::Text(t) => return serde_json::from_str(t.as_str()).unwrap(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("unexpected frame {other:?}"),
        }
    }
}

/// The next control reply; kline events before it are skipped.
async fn reply(ws: &mut Ws) -> Value {
    loop {
        let v = next_json(ws).await;
        if v.get("e").is_none() && v.get("stream").is_none() {
            return v;
        }
    }
}

/// The next message, which must be a control reply (no kline event before it).
async fn reply_first(ws: &mut Ws) -> Value {
    let v = next_json(ws).await;
    assert!(
        v.get("e").is_none() && v.get("stream").is_none(),
        "a kline event came before the reply: {v}"
    );
    v
}

/// The next kline event: (stream name if combined, payload).
async fn next_event(ws: &mut Ws) -> (Option<String>, Value) {
    loop {
        let v = next_json(ws).await;
        if let Some(stream) = v.get("stream") {
            return (
                Some(stream.as_str().unwrap().to_string()),
                v["data"].clone(),
            );
        }
        if v.get("e").is_some() {
            return (None, v);
        }
    }
}

/// The next final (`x: true`) kline event.
async fn next_final(ws: &mut Ws) -> Value {
    loop {
        let (_, ev) = next_event(ws).await;
        if ev["k"]["x"] == json!(true) {
            return ev;
        }
    }
}

enum Ended {
    CloseFrame(Option<CloseFrame>),
    /// Error or end of stream without a close frame.
    Abrupt,
}

/// Reads until the connection ends (any message before that is ignored).
async fn until_closed(ws: &mut Ws) -> Ended {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        match tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("the connection was not closed in time")
        {
            Some(Ok(Message::Close(frame))) => return Ended::CloseFrame(frame),
            Some(Ok(_)) => {}
            Some(Err(_)) | None => return Ended::Abrupt,
        }
    }
}

fn close_code(ended: Ended) -> u16 {
    match ended {
        Ended::CloseFrame(Some(f)) => u16::from(f.code),
        Ended::CloseFrame(None) => panic!("close frame without a code"),
        Ended::Abrupt => panic!("connection ended without a close frame"),
    }
}

/// Polls the simulator's observable state (not a stand-in for synchronisation: the condition
/// is what we wait for).
async fn wait_until(what: &str, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn open_ids(sim: &SimHandle) -> Vec<u64> {
    sim.ws_open_connections().iter().map(|c| c.id).collect()
}

fn pair(market: &str, symbol: &str, period: &str) -> PairKey {
    PairKey::parse(market, symbol, period).unwrap()
}

/// The `k` object a kline event must carry for `k`.
fn expected_k(k: &Kline) -> Value {
    let m = k.pair.market;
    let (f, l) = if k.trades == 0 {
        (-1, -1)
    } else {
        (0, k.trades as i64 - 1)
    };
    json!({
        "t": k.open_time,
        "T": k.close_time,
        "s": k.pair.symbol.as_str(),
        "i": k.pair.period.as_str(),
        "f": f,
        "L": l,
        "o": fmt(m, k.open),
        "c": fmt(m, k.close),
        "h": fmt(m, k.high),
        "l": fmt(m, k.low),
        "v": fmt(m, k.volume),
        "n": k.trades,
        "x": k.is_final,
        "q": fmt(m, k.quote_volume),
        "V": fmt(m, k.taker_buy_volume),
        "Q": fmt(m, k.taker_buy_quote_volume),
        "B": "0",
    })
}

#[tokio::test]
async fn every_market_serves_raw_and_combined_paths() {
    let sim = start().await;
    let addr = sim.addr();
    assert_eq!(sim.ws_url(Market::Spot), format!("ws://{addr}/spot/ws/"));
    assert_eq!(sim.ws_url(Market::Um), format!("ws://{addr}/um/market/ws/"));
    assert_eq!(sim.ws_url(Market::Cm), format!("ws://{addr}/cm/ws/"));
    sim.set_ws_update_interval(Some(Duration::from_millis(50)));

    for (market, symbol, stream) in [
        (Market::Spot, "BTCUSDT", "btcusdt@kline_1m"),
        (Market::Um, "ETHUSDT", "ethusdt@kline_5m"),
        (Market::Cm, "BTCUSD_PERP", "btcusd_perp@kline_1h"),
    ] {
        let mut combined = connect(&combined_url(&sim, market, &[stream])).await;
        let (name, ev) = next_event(&mut combined).await;
        assert_eq!(name.as_deref(), Some(stream));
        assert_eq!(ev["e"], "kline");
        assert_eq!(ev["s"], symbol);
        assert_eq!(ev["k"]["s"], symbol);

        let mut raw = connect(&format!("{}{stream}", sim.ws_url(market))).await;
        let (name, ev) = next_event(&mut raw).await;
        assert_eq!(name, None, "raw connections send bare payloads");
        assert_eq!(ev["s"], symbol);

        // A combined connection without streams subscribes later.
        let bare = combined_url(&sim, market, &[]);
        let mut later = connect(bare.strip_suffix("?streams=").unwrap()).await;
        send(
            &mut later,
            json!({"method": "SUBSCRIBE", "params": [stream], "id": 1}),
        )
        .await;
        assert_eq!(reply(&mut later).await, json!({"result": null, "id": 1}));
        let (name, _) = next_event(&mut later).await;
        assert_eq!(name.as_deref(), Some(stream));
        assert_eq!(sim.ws_connections_opened(market), 3);
    }

    let ws_requests: Vec<_> = sim
        .requests()
        .into_iter()
        .filter(|r| r.kind == RequestKind::Ws)
        .collect();
    assert_eq!(ws_requests.len(), 9);
    assert!(ws_requests.iter().all(|r| r.status == 101 && r.weight == 0));
    assert!(ws_requests
        .iter()
        .any(|r| r.path == "/um/market/stream" && r.query == "streams=ethusdt@kline_5m"));
    assert!(ws_requests
        .iter()
        .any(|r| r.path == "/cm/ws/btcusd_perp@kline_1h" && r.market == Some(Market::Cm)));

    // Plain HTTP on a WebSocket path is refused (and logged); REST is untouched.
    let r = reqwest::get(format!("http://{addr}/spot/ws/btcusdt@kline_1m"))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 400);
    let r = reqwest::get(format!("{}/ping", sim.rest_base(Market::Spot)))
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 200);
    let last = sim.requests();
    assert_eq!(last[last.len() - 2].kind, RequestKind::Ws);
    assert_eq!(last[last.len() - 2].status, 400);
    assert_eq!(last[last.len() - 1].kind, RequestKind::Rest);
    sim.shutdown().await;
}

#[tokio::test]
async fn control_messages_subscribe_unsubscribe_list_and_properties() {
    let sim = start().await;
    // No pushes during this test: only replies arrive.
    sim.set_ws_update_interval(Some(Duration::from_secs(3600)));
    let mut ws = connect(&combined_url(&sim, Market::Um, &["btcusdt@kline_1m"])).await;

    send(&mut ws, json!({"method": "LIST_SUBSCRIPTIONS", "id": 1})).await;
    assert_eq!(
        reply_first(&mut ws).await,
        json!({"result": ["btcusdt@kline_1m"], "id": 1})
    );
    // Unknown symbols and stream types are accepted (and never pushed), like Binance.
    send(
        &mut ws,
        json!({"method": "SUBSCRIBE", "params": ["ethusdt@kline_1m", "xyzusdt@kline_1m", "btcusdt@trade"], "id": 2}),
    )
    .await;
    assert_eq!(reply_first(&mut ws).await, json!({"result": null, "id": 2}));
    send(&mut ws, json!({"method": "LIST_SUBSCRIPTIONS", "id": 3})).await;
    assert_eq!(
        reply_first(&mut ws).await,
        json!({"result": ["btcusdt@kline_1m", "btcusdt@trade", "ethusdt@kline_1m", "xyzusdt@kline_1m"], "id": 3})
    );
    send(
        &mut ws,
        json!({"method": "UNSUBSCRIBE", "params": ["btcusdt@kline_1m", "btcusdt@trade"], "id": "a1"}),
    )
    .await;
    assert_eq!(
        reply_first(&mut ws).await,
        json!({"result": null, "id": "a1"})
    );
    send(
        &mut ws,
        json!({"method": "GET_PROPERTY", "params": ["combined"], "id": 5}),
    )
    .await;
    assert_eq!(reply_first(&mut ws).await, json!({"result": true, "id": 5}));
    send(
        &mut ws,
        json!({"method": "SET_PROPERTY", "params": ["combined", false], "id": 6}),
    )
    .await;
    assert_eq!(reply_first(&mut ws).await, json!({"result": null, "id": 6}));
    send(
        &mut ws,
        json!({"method": "GET_PROPERTY", "params": ["combined"], "id": 7}),
    )
    .await;
    assert_eq!(
        reply_first(&mut ws).await,
        json!({"result": false, "id": 7})
    );
    send(&mut ws, json!({"method": "FOO", "params": [], "id": 8})).await;
    let err = reply_first(&mut ws).await;
    assert_eq!(
        (err["code"].as_i64(), err["id"].as_i64()),
        (Some(2), Some(8))
    );
    assert!(err["msg"]
        .as_str()
        .unwrap()
        .starts_with("Invalid request: unknown variant `FOO`"));
    ws.send(Message::text("{not json")).await.unwrap();
    let err = reply_first(&mut ws).await;
    assert_eq!(err["code"], 3);
    assert!(err["msg"].as_str().unwrap().starts_with("Invalid JSON: "));
    assert!(err.get("id").is_none());

    let conns = sim.ws_open_connections();
    assert_eq!(conns.len(), 1);
    let conn = &conns[0];
    assert!(conn.market == Market::Um && conn.routed);
    assert!(conn.opened_at_ms <= now_ms());
    assert_eq!(conn.subscriptions, ["ethusdt@kline_1m", "xyzusdt@kline_1m"]);
    let log = sim.ws_control_log();
    let methods: Vec<&str> = log.iter().map(|r| r.method.as_str()).collect();
    assert_eq!(
        methods,
        [
            "LIST_SUBSCRIPTIONS",
            "SUBSCRIBE",
            "LIST_SUBSCRIPTIONS",
            "UNSUBSCRIBE",
            "GET_PROPERTY",
            "SET_PROPERTY",
            "GET_PROPERTY",
            "FOO",
            ""
        ]
    );
    assert!(log.iter().all(|r| r.conn == conn.id));
    assert_eq!(log[5].params, json!(["combined", false]));
    assert_eq!(log[3].id, Some(json!("a1")));
    sim.shutdown().await;
}

#[tokio::test]
async fn final_spot_1s_candle_equals_rest_and_synthetic() {
    let sim = start().await;
    let p = pair("spot", "BTCUSDT", "1s");
    let mut ws = connect(&format!("{}btcusdt@kline_1s", sim.ws_url(Market::Spot))).await;
    let ev = next_final(&mut ws).await;
    let k = &ev["k"];
    let open = k["t"].as_i64().unwrap();
    let close = k["T"].as_i64().unwrap();
    let event_time = ev["E"].as_i64().unwrap();
    assert_eq!(ev["e"], "kline");
    assert_eq!(ev["s"], "BTCUSDT");
    assert!(event_time > close, "a final is sent after its close");
    assert!(
        event_time - close < 1_000,
        "the final came {} ms after close",
        event_time - close
    );
    // Exactly the synthetic candle, in REST's digits.
    assert_eq!(*k, expected_k(&synthetic::candle(&p, open)));
    // And exactly what REST prints for that candle.
    let url = format!(
        "{}?symbol=BTCUSDT&interval=1s&startTime={open}&limit=1",
        sim.rest_url(Market::Spot)
    );
    let rows: Vec<Vec<Value>> = reqwest::get(url).await.unwrap().json().await.unwrap();
    let row = &rows[0];
    let text = |v: &Value| v.as_str().unwrap().to_string();
    assert_eq!(row[0], k["t"]);
    assert_eq!(row[6], k["T"]);
    assert_eq!(row[8], k["n"]);
    for (i, field) in [
        (1, "o"),
        (2, "h"),
        (3, "l"),
        (4, "c"),
        (5, "v"),
        (7, "q"),
        (9, "V"),
        (10, "Q"),
    ] {
        assert_eq!(text(&row[i]), text(&k[field]), "field {field}");
    }
    // The following in-progress event belongs to the next candle.
    let (_, next) = next_event(&mut ws).await;
    assert_eq!(next["k"]["x"], false);
    assert!(next["k"]["t"].as_i64().unwrap() > open);
    assert!(sim.ws_finals_sent() >= 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn in_progress_events_equal_the_partial_candle() {
    let sim = start().await;
    sim.set_ws_update_interval(Some(Duration::from_millis(50)));
    let p = pair("um", "BTCUSDT", "1m");
    let mut ws = connect(&combined_url(&sim, Market::Um, &["btcusdt@kline_1m"])).await;
    for _ in 0..3 {
        let (_, ev) = next_event(&mut ws).await;
        let (open, at) = (ev["k"]["t"].as_i64().unwrap(), ev["E"].as_i64().unwrap());
        let expected = if ev["k"]["x"] == json!(true) {
            synthetic::candle(&p, open)
        } else {
            synthetic::partial(&p, open, at)
        };
        assert_eq!(ev["k"], expected_k(&expected));
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn um_legacy_paths_accept_but_push_nothing() {
    let sim = start().await;
    sim.set_ws_update_interval(Some(Duration::from_millis(50)));
    let mut legacy_combined =
        connect(&legacy_um_url(&sim, "stream?streams=btcusdt@kline_1m")).await;
    let mut legacy_raw = connect(&legacy_um_url(&sim, "ws/btcusdt@kline_1m")).await;
    let mut routed = connect(&combined_url(
        &sim,
        Market::Um,
        &["btcusdt@kline_1m", "xyzusdt@kline_1m", "btcusdt@trade"],
    ))
    .await;
    send(
        &mut legacy_combined,
        json!({"method": "SUBSCRIBE", "params": ["ethusdt@kline_1m"], "id": 1}),
    )
    .await;
    assert_eq!(
        reply_first(&mut legacy_combined).await,
        json!({"result": null, "id": 1})
    );
    // Ten pushes on the routed connection (only for the existing kline stream) …
    for _ in 0..10 {
        let (name, _) = next_event(&mut routed).await;
        assert_eq!(name.as_deref(), Some("btcusdt@kline_1m"));
    }
    // … and meanwhile nothing on the legacy ones: their next message is the reply.
    for ws in [&mut legacy_combined, &mut legacy_raw] {
        send(ws, json!({"method": "LIST_SUBSCRIPTIONS", "id": 2})).await;
        let r = reply_first(ws).await;
        assert_eq!(r["id"], 2);
    }
    let mut conns = sim.ws_open_connections();
    conns.sort_by_key(|c| c.id);
    let routed_flags: Vec<bool> = conns.iter().map(|c| c.routed).collect();
    assert_eq!(routed_flags, [false, false, true]);
    assert!(conns.iter().all(|c| c.market == Market::Um));
    assert_eq!(sim.ws_connections_opened(Market::Um), 3);
    sim.shutdown().await;
}

#[tokio::test]
async fn maintenance_gap_candles_are_not_pushed() {
    let sim = start().await;
    sim.set_ws_update_interval(Some(Duration::from_millis(50)));
    let now = now_ms();
    sim.add_maintenance(
        Market::Spot,
        Some("BTCUSDT".parse().unwrap()),
        now - 60_000,
        now + 3_600_000,
    );
    let mut ws = connect(&combined_url(
        &sim,
        Market::Spot,
        &["btcusdt@kline_1s", "ethusdt@kline_1s"],
    ))
    .await;
    for _ in 0..10 {
        let (name, _) = next_event(&mut ws).await;
        assert_eq!(name.as_deref(), Some("ethusdt@kline_1s"));
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn message_rate_limit_closes_the_connection() {
    let sim = start().await;
    let mut spot = connect(&combined_url(&sim, Market::Spot, &[])).await;
    // Five messages within a second are fine on spot …
    for id in 0..5 {
        send(&mut spot, json!({"method": "LIST_SUBSCRIPTIONS", "id": id})).await;
    }
    for id in 0..5 {
        assert_eq!(reply(&mut spot).await, json!({"result": [], "id": id}));
    }
    assert_eq!(sim.ws_open_connections().len(), 1);
    // … the sixth closes the connection.
    send(&mut spot, json!({"method": "LIST_SUBSCRIPTIONS", "id": 5})).await;
    assert_eq!(close_code(until_closed(&mut spot).await), 1008);
    assert_eq!(sim.ws_closed_for_rate(), 1);
    wait_until("the spot connection is gone", || {
        sim.ws_open_connections().is_empty()
    })
    .await;

    // Futures allow ten.
    let mut cm = connect(&combined_url(&sim, Market::Cm, &[])).await;
    for id in 0..10 {
        send(&mut cm, json!({"method": "LIST_SUBSCRIPTIONS", "id": id})).await;
    }
    for id in 0..10 {
        assert_eq!(reply(&mut cm).await["id"], id);
    }
    assert_eq!(sim.ws_open_connections().len(), 1);
    // Pings count too.
    ws_ping(&mut cm).await;
    assert_eq!(close_code(until_closed(&mut cm).await), 1008);
    assert_eq!(sim.ws_closed_for_rate(), 2);
    sim.shutdown().await;
}

async fn ws_ping(ws: &mut Ws) {
    ws.send(Message::Ping(vec![1u8].into())).await.unwrap();
}

#[tokio::test]
async fn stream_limit_per_connection() {
    let sim = start().await;
    sim.set_ws_update_interval(Some(Duration::from_secs(3600)));
    let names =
        |n: usize| -> Vec<String> { (0..n).map(|i| format!("s{i}usdt@kline_1m")).collect() };

    let mut um = connect(&combined_url(&sim, Market::Um, &[])).await;
    send(
        &mut um,
        json!({"method": "SUBSCRIBE", "params": names(200), "id": 1}),
    )
    .await;
    assert_eq!(reply(&mut um).await, json!({"result": null, "id": 1}));
    // Re-subscribing held streams does not count twice.
    send(
        &mut um,
        json!({"method": "SUBSCRIBE", "params": ["s0usdt@kline_1m"], "id": 2}),
    )
    .await;
    assert_eq!(reply(&mut um).await, json!({"result": null, "id": 2}));
    send(
        &mut um,
        json!({"method": "SUBSCRIBE", "params": ["btcusdt@kline_1m"], "id": 3}),
    )
    .await;
    let err = reply(&mut um).await;
    assert_eq!(
        (err["code"].as_i64(), err["id"].as_i64()),
        (Some(2), Some(3))
    );
    assert!(err["msg"].as_str().unwrap().contains("too many streams"));
    send(&mut um, json!({"method": "LIST_SUBSCRIPTIONS", "id": 4})).await;
    let list = reply(&mut um).await;
    assert_eq!(list["result"].as_array().unwrap().len(), 200);
    assert!(!list["result"]
        .as_array()
        .unwrap()
        .contains(&json!("btcusdt@kline_1m")));

    // Spot holds 1024; a SUBSCRIBE that would exceed it adds nothing.
    let mut spot = connect(&combined_url(&sim, Market::Spot, &[])).await;
    send(
        &mut spot,
        json!({"method": "SUBSCRIBE", "params": names(1024), "id": 1}),
    )
    .await;
    assert_eq!(reply(&mut spot).await, json!({"result": null, "id": 1}));
    send(
        &mut spot,
        json!({"method": "SUBSCRIBE", "params": ["a@kline_1m", "b@kline_1m"], "id": 2}),
    )
    .await;
    assert_eq!(reply(&mut spot).await["code"], 2);
    let spot_conn = sim
        .ws_open_connections()
        .into_iter()
        .find(|c| c.market == Market::Spot)
        .unwrap();
    assert_eq!(spot_conn.subscriptions.len(), 1024);

    // Too many streams in the URL: the upgrade is refused.
    let n = names(201);
    let refs: Vec<&str> = n.iter().map(String::as_str).collect();
    match connect_async(combined_url(&sim, Market::Cm, &refs)).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            assert_eq!(resp.status().as_u16(), 400)
        }
        other => panic!("expected an HTTP 400, got {:?}", other.map(|_| ())),
    }
    sim.shutdown().await;
}

#[tokio::test]
async fn drop_all_cuts_every_connection_without_a_close_frame() {
    let sim = start().await;
    sim.set_ws_update_interval(Some(Duration::from_secs(3600)));
    let mut conns = Vec::new();
    for market in Market::ALL {
        conns.push(connect(&combined_url(&sim, market, &[])).await);
    }
    assert_eq!(sim.ws_open_connections().len(), 3);
    sim.ws_drop_all();
    for ws in &mut conns {
        assert!(matches!(until_closed(ws).await, Ended::Abrupt));
    }
    wait_until("every connection is gone", || {
        sim.ws_open_connections().is_empty()
    })
    .await;
    // Reconnecting works; the totals count every accepted connection.
    let mut again = connect(&combined_url(&sim, Market::Spot, &[])).await;
    send(&mut again, json!({"method": "LIST_SUBSCRIPTIONS", "id": 1})).await;
    assert_eq!(reply(&mut again).await["id"], 1);
    assert_eq!(sim.ws_connections_opened(Market::Spot), 2);
    assert_eq!(sim.ws_connections_opened(Market::Um), 1);
    assert_eq!(sim.ws_open_connections().len(), 1);
    sim.shutdown().await;
}

#[tokio::test]
async fn stall_sends_no_events_but_pings_continue() {
    let sim = start().await;
    sim.set_ws_update_interval(Some(Duration::from_millis(100)));
    sim.set_ws_ping_interval(Duration::from_millis(400));
    let mut ws = connect(&format!("{}btcusdt@kline_1s", sim.ws_url(Market::Spot))).await;
    next_event(&mut ws).await;

    sim.set_ws_stall(true);
    let stalled_at = now_ms();
    send(&mut ws, json!({"method": "LIST_SUBSCRIPTIONS", "id": 1})).await;
    reply(&mut ws).await; // events sent before the stall may precede it
    let finals = sim.ws_finals_sent();
    // Wait for pings until a whole 1 s candle has opened and closed during the stall.
    let whole_candle_closed = (stalled_at / 1000 + 2) * 1000;
    let mut pings = 0;
    while pings < 3 || now_ms() <= whole_candle_closed {
        match next_msg(&mut ws).await {
            Message::Ping(_) => pings += 1,
            Message::Pong(_) => {}
            other => panic!("no event may be sent during a stall, got {other:?}"),
        }
    }
    assert_eq!(sim.ws_finals_sent(), finals);

    let resumed_at = now_ms();
    sim.set_ws_stall(false);
    let fin = next_final(&mut ws).await;
    assert!(
        fin["k"]["T"].as_i64().unwrap() >= resumed_at,
        "a candle that closed during the stall was pushed: {fin}"
    );
    sim.shutdown().await;
}

#[tokio::test]
async fn skip_finals_suppresses_only_final_events() {
    let sim = start().await;
    sim.set_ws_update_interval(Some(Duration::from_millis(100)));
    sim.set_ws_skip_finals(true);
    let mut ws = connect(&format!("{}btcusdt@kline_1s", sim.ws_url(Market::Spot))).await;
    let finals = sim.ws_finals_sent();
    // In-progress events keep flowing across two candle boundaries, none of them final.
    let (_, first) = next_event(&mut ws).await;
    let mut open = first["k"]["t"].as_i64().unwrap();
    let mut boundaries = 0;
    while boundaries < 2 {
        let (_, ev) = next_event(&mut ws).await;
        assert_eq!(ev["k"]["x"], false, "final sent while skipped: {ev}");
        let t = ev["k"]["t"].as_i64().unwrap();
        if t != open {
            boundaries += 1;
            open = t;
        }
    }
    assert_eq!(sim.ws_finals_sent(), finals);
    sim.set_ws_skip_finals(false);
    let fin = next_final(&mut ws).await;
    assert!(fin["k"]["T"].as_i64().unwrap() >= open);
    assert!(sim.ws_finals_sent() > finals);
    sim.shutdown().await;
}

#[tokio::test]
async fn max_lifetime_closes_the_connection() {
    let sim = start().await;
    sim.set_ws_max_lifetime(Duration::from_millis(400));
    let started = Instant::now();
    let mut ws = connect(&combined_url(&sim, Market::Cm, &["btcusd_perp@kline_1m"])).await;
    assert_eq!(
        close_code(until_closed(&mut ws).await),
        u16::from(CloseCode::Away)
    );
    assert!(started.elapsed() >= Duration::from_millis(400));
    wait_until("the connection is gone", || {
        sim.ws_open_connections().is_empty()
    })
    .await;
    sim.shutdown().await;
}

#[tokio::test]
async fn answered_pings_keep_the_connection_and_silence_closes_it() {
    let sim = start().await;
    sim.set_ws_ping_interval(Duration::from_millis(150));
    sim.set_ws_pong_deadline(Duration::from_millis(600));
    // This client never reads, so it never answers a ping.
    let mut silent = connect(&combined_url(&sim, Market::Um, &[])).await;
    let silent_id = open_ids(&sim)[0];
    // This one reads, and tungstenite answers every ping with its payload.
    let mut reader = connect(&combined_url(&sim, Market::Um, &[])).await;
    let reader_id = *open_ids(&sim).iter().max().unwrap();
    // Keep reading (and so answering) until the silent one is gone and pings have gone on
    // well past the deadline.
    let started = Instant::now();
    let mut pings = 0;
    while pings < 8 || open_ids(&sim).contains(&silent_id) {
        if let Message::Ping(_) = next_msg(&mut reader).await {
            pings += 1;
        }
    }
    assert!(started.elapsed() > Duration::from_millis(600));
    assert_eq!(open_ids(&sim), [reader_id]);
    // The server sent a close frame (1008), but by now it has also dropped the socket, so the
    // pong this client queues when it finally reads the buffered pings may reset the
    // connection before the frame is read: either ending is fine here.
    if let Ended::CloseFrame(frame) = until_closed(&mut silent).await {
        assert_eq!(frame.map(|f| u16::from(f.code)), Some(1008));
    }
    // Still alive: it answers control messages.
    send(
        &mut reader,
        json!({"method": "LIST_SUBSCRIPTIONS", "id": 9}),
    )
    .await;
    assert_eq!(reply(&mut reader).await["id"], 9);
    sim.shutdown().await;
}
