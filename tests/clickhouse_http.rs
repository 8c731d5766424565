//! The parts of ClickHouse's HTTP interface that QuantService and its tests rely on, on the
//! lane's engine: Debian's `clickhouse-server` 18.16, or ClickHouse 26.x through
//! `scripts/chdb-server` (`QS_TEST_CLICKHOUSE_ENGINE=chdb`). In the chdb lane these pin the
//! front to what a modern server does (status codes, headers, error text).

mod common;

use common::{engine, http_reply, percent_encode, Engine, HttpReply, TestDb, PW_PASSWORD, PW_USER};

fn post(db: &TestDb, query: Option<&str>, body: &str, auth: Option<(&str, &str)>) -> HttpReply {
    let mut path = format!("/?database={}", percent_encode(&db.name));
    if let Some(q) = query {
        path.push_str(&format!("&query={}", percent_encode(q)));
    }
    http_reply(&db.host, db.port, "POST", &path, body, auth).expect("ClickHouse answers HTTP")
}

#[test]
fn ping_answers_ok_and_version_names_the_lanes_engine() {
    let db = TestDb::new_private("http_version");
    db.create();
    let ping = http_reply(&db.host, db.port, "GET", "/ping", "", None).unwrap();
    assert_eq!((ping.status, ping.body.as_str()), (200, "Ok.\n"));
    let version = db.sql("SELECT version()");
    let major: u32 = version.split('.').next().unwrap().parse().unwrap();
    match engine() {
        Engine::Server => assert!(major >= 18, "{version}"),
        Engine::Chdb => assert!(major >= 24, "chdb lane runs {version}"),
    }
}

#[test]
fn the_query_parameter_and_the_body_form_one_query_with_inline_data() {
    let db = TestDb::new_private("http_concat");
    db.create();
    db.sql("CREATE TABLE t (a UInt32, s String, d Decimal(38, 8)) ENGINE = MergeTree ORDER BY a");
    // INSERT in the URL, its data in the body.
    let r = post(
        &db,
        Some("INSERT INTO t FORMAT TabSeparated"),
        "2\ttwo\t0.00000001\n1\tone\t1.5\n",
        None,
    );
    assert_eq!(r.status, 200, "{}", r.body);
    // A query split between the URL and the body (joined by a line break).
    let r = post(&db, Some("SELECT a, s, d FROM t"), "ORDER BY a", None);
    assert_eq!(r.status, 200, "{}", r.body);
    common::assert_tsv_eq(&r.body, "1\tone\t1.50000000\n2\ttwo\t0.00000001\n");
    // The password-protected user works through the X-ClickHouse-* headers.
    let r = post(
        &db,
        None,
        "SELECT count() FROM t",
        Some((PW_USER, PW_PASSWORD)),
    );
    assert_eq!((r.status, r.body.as_str()), (200, "2\n"));
}

#[test]
fn errors_carry_the_code_in_text_header_and_status() {
    let db = TestDb::new_private("http_errors");
    db.create();
    let cases: [(&str, HttpReply, u32, u16); 5] = [
        (
            "unknown table",
            post(&db, None, "SELECT * FROM no_such_table", None),
            60,
            404,
        ),
        ("syntax error", post(&db, None, "SELEC 1", None), 62, 400),
        (
            "multi-statements",
            post(&db, None, "SELECT 1; SELECT 2", None),
            62,
            400,
        ),
        (
            "wrong password",
            post(&db, None, "SELECT 1", Some((PW_USER, "not-the-password"))),
            if engine() == Engine::Chdb { 516 } else { 193 },
            // 18.16 answers 401 for its WRONG_PASSWORD, modern servers 403.
            if engine() == Engine::Chdb { 403 } else { 401 },
        ),
        (
            "GET implies read-only",
            http_reply(
                &db.host,
                db.port,
                "GET",
                &format!(
                    "/?database={}&query={}",
                    percent_encode(&db.name),
                    percent_encode("CREATE TABLE t (a UInt8) ENGINE = Memory")
                ),
                "",
                None,
            )
            .unwrap(),
            164,
            500,
        ),
    ];
    for (what, r, code, status) in cases {
        assert!(
            r.body.starts_with(&format!("Code: {code}")),
            "{what}: {}",
            r.body
        );
        assert!(!r.body.contains(PW_PASSWORD), "{what}: {}", r.body);
        assert_eq!(r.status, status, "{what}: {}", r.body);
        if engine() == Engine::Chdb {
            // What a modern server adds (18.16 has no such header).
            assert_eq!(
                r.header("X-ClickHouse-Exception-Code"),
                Some(code.to_string().as_str()),
                "{what}"
            );
            assert!(r.body.contains(" (version 2"), "{what}: {}", r.body);
        }
    }
}
