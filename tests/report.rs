//! The backtest report in a real browser: backtesting.py's Quick Start (`SmaCross(10, 20)` over
//! its `GOOG.csv`, 10,000 cash, 0.2 % commission, exclusive orders) run by the engine, rendered
//! by `backtest::report`, then opened from a file by headless Chromium (Debian package
//! `chromium`; `scripts/install-deps` installs it): its screenshot must be a PNG of the
//! window's size with the charts' colours on it, and the DOM it builds must hold the charts,
//! every trade's marker and the statistics table. The HTML must name no URL (self-contained).
//!
//! Chromium gets no network: every host name resolves to nothing and its background services
//! are off, so nothing leaves the machine. With `QS_REPORT_OUT=<dir>` the report is also
//! written there; `docs/backtest-report.png` is that file's screenshot at 1280x1400
//! (`chromium --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,1400
//! --screenshot=shot.png file://<dir>/report.html`, then `pngquant --quality=70-90 --strip`).
#![allow(clippy::unwrap_used)] // tests may unwrap

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use qs_core::backtest::{self, strategies, Options};
use quantservice::backtest::{csv, report};

const WIDTH: u32 = 1280;
const HEIGHT: u32 = 2000;

/// `chromium` (or `chromium-browser`); the test fails with an install hint without it.
fn chromium() -> PathBuf {
    ["chromium", "chromium-browser", "/usr/bin/chromium"]
        .into_iter()
        .map(PathBuf::from)
        .find(|p| {
            Command::new(p)
                .arg("--version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        })
        .expect("chromium is needed to render the report: run scripts/install-deps (Debian package chromium)")
}

/// Headless Chromium on `args`, with no network and a deadline (coreutils `timeout`).
fn run_chromium(profile: &Path, args: &[String]) -> Output {
    let out = Command::new("timeout")
        .arg("120")
        .arg(chromium())
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-sync",
            "--disable-domain-reliability",
            "--hide-scrollbars",
            "--host-resolver-rules=MAP * ~NOTFOUND",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(args)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "chromium failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// backtesting.py's Quick Start over GOOG.csv, rendered.
fn quick_start_report() -> (String, usize) {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/backtest/GOOG.csv");
    let series = csv::read_csv(&data).unwrap();
    let mut strategy = strategies::build(
        "sma_cross",
        &[("fast".to_string(), 10.0), ("slow".to_string(), 20.0)],
    )
    .unwrap();
    let options = Options {
        cash: 10_000.0,
        commission: 0.002,
        exclusive: true,
        ..Options::default()
    };
    let outcome = backtest::run(&mut *strategy, &series, &options);
    assert!(outcome.trades.len() > 10, "{} trades", outcome.trades.len());
    let params = [
        ("data", "GOOG.csv"),
        ("strategy", "sma_cross"),
        ("fast", "10"),
        ("slow", "20"),
        ("cash", "10000"),
        ("commission", "0.002"),
        ("exclusive orders", "true"),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    let html = report::render("SmaCross(10, 20) on GOOG", &series, &outcome, &params);
    (html, outcome.trades.len())
}

#[test]
fn the_report_renders_in_a_headless_browser() {
    let (html, trades) = quick_start_report();
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "the report must be self-contained"
    );
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(&page, &html).unwrap();
    if let Some(out) = std::env::var_os("QS_REPORT_OUT") {
        std::fs::create_dir_all(&out).unwrap();
        std::fs::write(Path::new(&out).join("report.html"), &html).unwrap();
    }
    let url = format!("file://{}", page.display());

    // The DOM the browser built from it.
    let dom = run_chromium(
        &dir.path().join("profile-dom"),
        &["--dump-dom".to_string(), url.clone()],
    );
    let dom = String::from_utf8(dom.stdout).unwrap();
    for id in ["price", "equity", "drawdown"] {
        assert!(
            dom.contains(&format!("<svg class=\"chart\" id=\"{id}\"")),
            "no {id} chart in the DOM"
        );
    }
    assert_eq!(dom.matches("<g class=\"trade\">").count(), trades);
    assert!(dom.contains("<path class=\"close\" d=\" M"));
    assert!(dom.contains("<table class=\"stats\" id=\"stats\">"));
    for label in [
        "Start",
        "Sharpe Ratio",
        "Buy &amp; Hold Return [%]",
        "Kelly Criterion",
    ] {
        assert!(
            dom.contains(&format!("<td>{label}</td>")),
            "no {label} in the statistics"
        );
    }
    assert!(dom.contains("<td>2004-08-19 00:00:00</td>"));
    assert!(dom.contains("<td>sma_cross</td>"));
    assert_eq!(
        dom.matches("<tr><td>").count(),
        32 + 7 + trades,
        "statistics, parameters and trade rows"
    );

    // A screenshot: a PNG of the window's size, with the charts drawn on it.
    let shot = dir.path().join("report.png");
    run_chromium(
        &dir.path().join("profile-shot"),
        &[
            format!("--screenshot={}", shot.display()),
            format!("--window-size={WIDTH},{HEIGHT}"),
            url,
        ],
    );
    let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(&shot).unwrap()));
    let mut reader = decoder.read_info().unwrap();
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let info = reader.next_frame(&mut buf).unwrap();
    assert_eq!((info.width, info.height), (WIDTH, HEIGHT));
    let channels = info.color_type.samples();
    assert!(channels >= 3, "{:?}", info.color_type);
    assert_eq!(info.bit_depth, png::BitDepth::Eight);
    let pixels = &buf[..info.buffer_size()];
    let near = |p: &[u8], rgb: [u8; 3]| (0..3).all(|i| p[i].abs_diff(rgb[i]) <= 12);
    let (mut non_white, mut close_blue, mut equity_green) = (0usize, 0usize, 0usize);
    for p in pixels.chunks_exact(channels) {
        if p[..3].iter().any(|&c| c < 200) {
            non_white += 1;
        }
        if near(p, [0x3b, 0x6e, 0xa8]) {
            close_blue += 1;
        }
        if near(p, [0x2a, 0x7a, 0x3b]) {
            equity_green += 1;
        }
    }
    let total = (WIDTH * HEIGHT) as usize;
    assert!(
        non_white > total / 100,
        "nearly blank: {non_white} dark pixels"
    );
    assert!(close_blue > 500, "no price line: {close_blue} pixels");
    assert!(equity_green > 500, "no equity line: {equity_green} pixels");
}
