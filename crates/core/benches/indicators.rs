//! Indicator benchmarks (issue "IndicatorService", §8), printed as a markdown table:
//! 1. Kernels: SMA(20), EMA(20), RSI(14), MACD(12,26,9), BBANDS(20,2,2) over 10,000,000 f64
//!    closes, ns/bar (median of several runs), against TA-Lib's Python wheel timing the same
//!    functions on the same array (written to a temp file) in the same run; the last value of
//!    each output is cross-checked to 1e-9. Twice: "fresh" (every call allocates its outputs,
//!    whose pages fault in on first touch, on both sides) and "warm" (outputs on pages already
//!    mapped on both sides: ours reuses its vectors, TA-Lib runs under
//!    `glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295` so numpy's freed arrays
//!    come back from the heap);
//! 2. Online: the full 15-indicator set advanced by one candle, median ns per candle, with the
//!    number of heap allocations made while advancing (counted by a global allocator; must be 0).
//!
//! Run: `cargo bench -p qs-core --bench indicators` (needs `python3` with `TA-Lib` and `numpy`:
//! `pip install --only-binary=:all: TA-Lib numpy`; without them the anchor column says so).
//! `QS_BENCH_BARS` changes the kernel series length, `QS_BENCH_RUNS` the runs per kernel,
//! `QS_BENCH_ONLY=kernels|online` runs one part. The bench re-runs itself under
//! `GLIBC_TUNABLES=glibc.malloc.hugetlb=1` (see `main`); `QS_BENCH_NO_THP=1` keeps 4 KiB pages.
#![allow(clippy::unwrap_used)] // a benchmark driver, like a test

use std::alloc::System;
use std::hint::black_box;
use std::io::Write;
use std::process::Command;
use std::time::Instant;

use qs_core::indicators::{batch_closes, batch_closes_into, Bar, Indicator, Spec, STANDARD_SET};
use stats_alloc::{Region, StatsAlloc, INSTRUMENTED_SYSTEM};

#[global_allocator]
static GLOBAL: &StatsAlloc<System> = &INSTRUMENTED_SYSTEM;

const KERNELS: [(&str, &str); 5] = [
    ("SMA(20)", "sma(20)"),
    ("EMA(20)", "ema(20)"),
    ("RSI(14)", "rsi(14)"),
    ("MACD(12,26,9)", "macd(12,26,9)"),
    ("BBANDS(20)", "bbands(20,2,2)"),
];

const TALIB_SCRIPT: &str = r#"
import sys, time
import numpy as np
import talib
x = np.fromfile(sys.argv[1], dtype="<f8")
runs = int(sys.argv[2])
fns = [
    ("SMA(20)", lambda: (talib.SMA(x, 20),)),
    ("EMA(20)", lambda: (talib.EMA(x, 20),)),
    ("RSI(14)", lambda: (talib.RSI(x, 14),)),
    ("MACD(12,26,9)", lambda: talib.MACD(x, 12, 26, 9)),
    ("BBANDS(20)", lambda: talib.BBANDS(x, 20, 2.0, 2.0, 0)),
]
for name, f in fns:
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter_ns()
        out = f()
        ts.append(time.perf_counter_ns() - t0)
    ts.sort()
    last = ",".join(repr(float(o[-1])) for o in out)
    print(f"{name}\t{ts[len(ts) // 2] / len(x)}\t{last}")
"#;

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// A seeded geometric random walk (xorshift64*), OHLCV around it.
fn walk(n: usize) -> Vec<Bar> {
    let mut s: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut rnd = move || {
        s ^= s >> 12;
        s ^= s << 25;
        s ^= s >> 27;
        (s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11) as f64 / (1u64 << 53) as f64
    };
    let mut price = 40_000.0;
    (0..n)
        .map(|_| {
            let open = price;
            price *= 1.0 + (rnd() - 0.5) * 0.004;
            let high = open.max(price) * (1.0 + rnd() * 0.001);
            let low = open.min(price) * (1.0 - rnd() * 0.001);
            let volume = rnd() * 100.0;
            Bar {
                open,
                high,
                low,
                close: price,
                volume,
                quote_volume: volume * (high + low) / 2.0,
            }
        })
        .collect()
}

/// TA-Lib's figures per kernel: (ns/bar, last value of each output); None without python/talib.
/// `tunables` replaces `GLIBC_TUNABLES` for the Python process.
fn talib_anchor(
    closes: &[f64],
    runs: usize,
    tunables: &str,
) -> Option<Vec<(String, f64, Vec<f64>)>> {
    let dir = std::env::temp_dir().join(format!("qs-ind-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).ok()?;
    let data = dir.join("closes.f64");
    let script = dir.join("talib_bench.py");
    let mut bytes = Vec::with_capacity(closes.len() * 8);
    for x in closes {
        bytes.extend_from_slice(&x.to_le_bytes());
    }
    std::fs::write(&data, bytes).ok()?;
    std::fs::File::create(&script)
        .ok()?
        .write_all(TALIB_SCRIPT.as_bytes())
        .ok()?;
    let out = Command::new("python3")
        .env("GLIBC_TUNABLES", tunables)
        .arg(&script)
        .arg(&data)
        .arg(runs.to_string())
        .output()
        .ok();
    let _ = std::fs::remove_dir_all(&dir);
    let out = out?;
    if !out.status.success() {
        eprintln!(
            "TA-Lib anchor failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        return None;
    }
    Some(
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let mut f = l.split('\t');
                let name = f.next()?.to_string();
                let ns = f.next()?.parse().ok()?;
                let last = f
                    .next()?
                    .split(',')
                    .filter_map(|v| v.parse().ok())
                    .collect();
                Some((name, ns, last))
            })
            .collect(),
    )
}

fn kernels() {
    let n = env_usize("QS_BENCH_BARS", 10_000_000);
    let runs = env_usize("QS_BENCH_RUNS", 5);
    let closes: Vec<f64> = walk(n).iter().map(|b| b.close).collect();
    // Fresh: both sides allocate their outputs per call, as numpy does (first touches fault
    // pages in). Warm: outputs land on pages already mapped — ours reuses its vectors, and
    // TA-Lib runs with glibc's mmap disabled and the heap never trimmed, so numpy's freed
    // arrays come back from the heap —
    // which compares the kernels themselves.
    let base = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
    let keep = "glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=4294967295";
    let warm_tunables = if base.is_empty() {
        keep.to_string()
    } else {
        format!("{base}:{keep}")
    };
    let anchor = talib_anchor(&closes, runs, &base);
    let warm_anchor = talib_anchor(&closes, runs, &warm_tunables);
    for (label, spec) in KERNELS {
        let spec = Spec::parse(spec).unwrap();
        // Fresh output vectors each run (what TA-Lib's wrapper does: numpy allocates them).
        let mut ts = Vec::new();
        let mut last = Vec::new();
        for _ in 0..runs {
            let t0 = Instant::now();
            let cols = black_box(batch_closes(&spec, black_box(&closes)).unwrap());
            ts.push(t0.elapsed().as_nanos() as f64 / n as f64);
            last = cols.iter().map(|c| c[n - 1]).collect();
        }
        let fresh = median(&mut ts);
        // Reused output vectors (the first, page-faulting run not counted).
        let mut cols = Vec::new();
        let mut ts = Vec::new();
        for run in 0..=runs {
            let t0 = Instant::now();
            batch_closes_into(&spec, black_box(&closes), &mut cols);
            black_box(&cols);
            if run > 0 {
                ts.push(t0.elapsed().as_nanos() as f64 / n as f64);
            }
        }
        let reused = median(&mut ts);
        let find = |a: &Option<Vec<(String, f64, Vec<f64>)>>| {
            a.as_ref()
                .and_then(|a| a.iter().find(|(name, _, _)| name == label).cloned())
        };
        match (find(&anchor), find(&warm_anchor)) {
            (Some((_, t, their_last)), Some((_, tw, _))) => {
                let agree = last.len() == their_last.len()
                    && last
                        .iter()
                        .zip(&their_last)
                        .all(|(a, b)| (a - b).abs() <= 1e-9 * b.abs().max(1e-300));
                println!(
                    "| kernel {label}, {n} bars | {fresh:.2} ns/bar fresh, {reused:.2} warm | TA-Lib {t:.2} fresh, {tw:.2} warm | {:.2}× fresh, {:.2}× warm (target ≥ 1.0×){} |",
                    t / fresh,
                    tw / reused,
                    if agree { "" } else { " — LAST VALUES DIFFER" }
                );
            }
            _ => println!(
                "| kernel {label}, {n} bars | {fresh:.2} ns/bar fresh, {reused:.2} warm | TA-Lib unavailable | — |"
            ),
        }
    }
}

fn online() {
    let specs: Vec<Spec> = STANDARD_SET
        .iter()
        .map(|s| Spec::parse(s).unwrap())
        .collect();
    let mut set: Vec<Indicator> = specs.iter().map(Indicator::new).collect();
    let warm = 1_000;
    let batches = 2_000;
    let per_batch = 100;
    let bars = walk(warm + batches * per_batch);
    let mut out = [0.0f64; 3];
    let mut sink = 0.0;
    for b in &bars[..warm] {
        for ind in set.iter_mut() {
            ind.update(b, &mut out);
            sink += out[0];
        }
    }
    let mut ts = Vec::with_capacity(batches);
    let region = Region::new(GLOBAL);
    for chunk in bars[warm..].chunks(per_batch) {
        let t0 = Instant::now();
        for b in chunk {
            for ind in set.iter_mut() {
                ind.update(black_box(b), &mut out);
                sink += out[0];
            }
        }
        ts.push(t0.elapsed().as_nanos() as f64 / per_batch as f64);
    }
    let stats = region.change();
    black_box(sink);
    let allocs = stats.allocations + stats.reallocations;
    // `ts` was allocated before the region with its full capacity, so any count is update's.
    let ns = median(&mut ts);
    println!(
        "| online, 15 indicators, one candle ({} candles) | {ns:.0} ns/candle (median of {batches} batches) | {allocs} allocations while advancing | {} (target < 1 µs, 0 allocations) |",
        batches * per_batch,
        if ns < 1000.0 && allocs == 0 { "met" } else { "MISSED" }
    );
}

fn main() {
    // numpy asks for transparent huge pages on its large arrays (madvise); Rust's Vec cannot
    // without `unsafe`, and on a 4 KiB-page machine the first touch of a fresh 80 MB output
    // then costs more than the kernel. glibc's `malloc.hugetlb=1` tunable makes malloc do the
    // same madvise, so both sides allocate alike: re-run under it unless told otherwise
    // (`QS_BENCH_NO_THP=1`, or any GLIBC_TUNABLES already set).
    if std::env::var_os("GLIBC_TUNABLES").is_none() && std::env::var_os("QS_BENCH_NO_THP").is_none()
    {
        let status = Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env("GLIBC_TUNABLES", "glibc.malloc.hugetlb=1")
            .status()
            .unwrap();
        std::process::exit(status.code().unwrap_or(1));
    }
    println!(
        "GLIBC_TUNABLES={}",
        std::env::var("GLIBC_TUNABLES").unwrap_or_default()
    );
    println!();
    println!("| benchmark | ours | anchor | ratio / target |");
    println!("|---|---|---|---|");
    let only = std::env::var("QS_BENCH_ONLY").unwrap_or_default();
    if only.is_empty() || only == "kernels" {
        kernels();
    }
    if only.is_empty() || only == "online" {
        online();
    }
}
