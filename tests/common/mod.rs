//! Test harness: a real ClickHouse server per test binary (private data dir, free ports) unless
//! `QS_TEST_CLICKHOUSE_URL` names one, a database per test (dropped afterwards), and a tiny
//! blocking HTTP client for verification queries. Never silently passes without ClickHouse.
#![allow(dead_code, clippy::unwrap_used)] // shared by several test binaries; tests may unwrap

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use quantservice::config::Config;

/// A user with a password on every private server (for `--check-config` tests).
pub const PW_USER: &str = "qs_pw";
pub const PW_PASSWORD: &str = "Sup3r-s3cret-PW-4711";

const INSTALL_HINT: &str = "ClickHouse is needed for the integration tests and none could be \
    started. Install it with `sudo apt-get install -y clickhouse-server clickhouse-client` (the \
    README's test command does this), or point QS_TEST_CLICKHOUSE_URL at a running server \
    (e.g. http://127.0.0.1:8123).";

/// A private `clickhouse-server` process with its own data dir and ports. A watchdog shell
/// kills it when the test process exits, and removes the data dir.
pub struct ChServer {
    pub http_port: u16,
    tcp_port: u16,
    interserver_port: u16,
    dir: PathBuf,
    child: Mutex<Option<Child>>,
}

/// A loopback port nobody listens on (bound, then released).
pub fn dead_port() -> u16 {
    free_port()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The server command: `clickhouse-server` or `clickhouse server`.
fn server_command() -> Option<(PathBuf, Vec<String>)> {
    if let Some(p) = find_in_path("clickhouse-server") {
        return Some((p, vec![]));
    }
    find_in_path("clickhouse").map(|p| (p, vec!["server".to_string()]))
}

impl ChServer {
    /// Starts a new private server; panics with an install hint if none can be started.
    pub fn start() -> ChServer {
        let base = std::env::temp_dir().join(format!(
            "qs-ch-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("tmp")).expect("create ClickHouse temp dir");
        let server = ChServer {
            http_port: free_port(),
            tcp_port: free_port(),
            interserver_port: free_port(),
            dir: base,
            child: Mutex::new(None),
        };
        server.write_configs();
        server.launch();
        server
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn write_configs(&self) {
        let d = self.dir.display().to_string();
        let config = include_str!("../../scripts/clickhouse/config.xml")
            .replace("@DIR@", &d)
            .replace("@HTTP_PORT@", &self.http_port.to_string())
            .replace("@TCP_PORT@", &self.tcp_port.to_string())
            .replace("@INTERSERVER_PORT@", &self.interserver_port.to_string());
        let users = include_str!("../../scripts/clickhouse/users.xml")
            .replace("@PW_USER@", PW_USER)
            .replace("@PW_PASSWORD@", PW_PASSWORD);
        std::fs::write(self.dir.join("config.xml"), config).expect("write config.xml");
        std::fs::write(self.dir.join("users.xml"), users).expect("write users.xml");
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("server.pid")
    }

    /// Starts the server process and waits until it answers `/ping`.
    fn launch(&self) {
        let Some((bin, pre)) = server_command() else {
            panic!("{INSTALL_HINT}");
        };
        let _ = std::fs::remove_file(self.pid_file());
        // The watchdog ends the server when this test process is gone.
        let script = r#"
            "$@" & srv=$!
            echo "$srv" > "$QS_CH_DIR/server.pid"
            while kill -0 "$QS_WATCH_PID" 2>/dev/null && kill -0 "$srv" 2>/dev/null; do sleep 0.2; done
            kill "$srv" 2>/dev/null; wait "$srv"
            kill -0 "$QS_WATCH_PID" 2>/dev/null || rm -rf "$QS_CH_DIR"
        "#;
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(script)
            .arg("sh")
            .arg(&bin)
            .args(&pre)
            .arg(format!(
                "--config-file={}",
                self.dir.join("config.xml").display()
            ))
            .env("QS_WATCH_PID", std::process::id().to_string())
            .env("QS_CH_DIR", &self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.dir.join("stderr.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("{INSTALL_HINT} ({e})"));
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if ping(self.http_port) {
                return;
            }
            if let Some(status) = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                let stderr =
                    std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                panic!("{INSTALL_HINT}\nclickhouse-server exited with {status}:\n{stderr}\n{log}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{INSTALL_HINT}\nclickhouse-server did not answer /ping within 60 s");
    }

    /// Kills the server (SIGKILL, like a crash) and waits until it is gone.
    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.pid_file()).unwrap_or_default();
        let pid = pid.trim();
        assert!(!pid.is_empty(), "no pid file for the ClickHouse server");
        let _ = Command::new("kill").args(["-KILL", pid]).status();
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.wait();
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while ping(self.http_port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(!ping(self.http_port), "ClickHouse still answers after kill");
    }

    /// Starts the server again on the same data dir and ports.
    pub fn restart(&self) {
        self.launch();
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ping(port: u16) -> bool {
    matches!(http(port, "GET", "/ping", ""), Ok((200, body)) if body.starts_with("Ok"))
}

/// A minimal blocking HTTP/1.0 request to 127.0.0.1:`port`. Returns (status, body).
pub fn http(
    port: u16,
    method: &str,
    path_query: &str,
    body: &str,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        Duration::from_secs(2),
    )?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    write!(
        s,
        "{method} {path_query} HTTP/1.0\r\nHost: 127.0.0.1\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Where the shared server for this test binary is.
pub struct Shared {
    pub host: String,
    pub port: u16,
    server: Option<ChServer>,
}

/// The ClickHouse every test in this binary shares: `QS_TEST_CLICKHOUSE_URL`, or a private one.
pub fn shared() -> &'static Shared {
    static SHARED: OnceLock<Shared> = OnceLock::new();
    SHARED.get_or_init(|| match std::env::var("QS_TEST_CLICKHOUSE_URL") {
        Ok(url) if !url.is_empty() => {
            let u = url::Url::parse(&url).expect("QS_TEST_CLICKHOUSE_URL must be a URL");
            Shared {
                host: u.host_str().unwrap_or("127.0.0.1").to_string(),
                port: u.port().unwrap_or(8123),
                server: None,
            }
        }
        _ => {
            let server = ChServer::start();
            Shared {
                host: "127.0.0.1".to_string(),
                port: server.http_port,
                server: Some(server),
            }
        }
    })
}

/// A database of its own for one test, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub host: String,
    pub port: u16,
}

impl TestDb {
    pub fn new(tag: &str) -> TestDb {
        let s = shared();
        TestDb::on(&s.host, s.port, tag)
    }

    pub fn on(host: &str, port: u16, tag: &str) -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "qs_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            tag
        );
        let db = TestDb {
            name,
            host: host.to_string(),
            port,
        };
        db.sql_default(&format!("DROP DATABASE IF EXISTS `{}`", db.name));
        db
    }

    /// YAML for a config pointing at this database; `extra` is appended under `app:`.
    pub fn yaml(&self, extra: &str) -> String {
        format!(
            "app:\n  environment: test\n  clickhouse:\n    host: \"{}\"\n    port: {}\n    database: \"{}\"\n    username: \"default\"\n    password: \"\"\n{extra}",
            self.host, self.port, self.name
        )
    }

    pub fn config(&self, extra: &str) -> Config {
        Config::from_yaml_with_env(&self.yaml(extra), Path::new("test.yaml"), |_| None)
            .expect("test config is valid")
    }

    /// Runs SQL in this database; panics with the server's message on failure.
    pub fn sql(&self, sql: &str) -> String {
        self.try_sql(sql)
            .unwrap_or_else(|e| panic!("{e}\nSQL: {sql}"))
    }

    pub fn try_sql(&self, sql: &str) -> Result<String, String> {
        run_sql(self.port, Some(&self.name), sql)
    }

    fn sql_default(&self, sql: &str) -> String {
        run_sql(self.port, None, sql).unwrap_or_else(|e| panic!("{e}\nSQL: {sql}"))
    }
}

pub fn run_sql(port: u16, db: Option<&str>, sql: &str) -> Result<String, String> {
    let path = match db {
        Some(db) => format!("/?database={}", percent_encode(db)),
        None => "/".to_string(),
    };
    match http(port, "POST", &path, sql) {
        Ok((200, body)) => Ok(body),
        Ok((code, body)) => Err(format!("ClickHouse answered {code}: {body}")),
        Err(e) => Err(format!("cannot reach ClickHouse on port {port}: {e}")),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = run_sql(
            self.port,
            None,
            &format!("DROP DATABASE IF EXISTS `{}`", self.name),
        );
    }
}

/// Path of a file in shared/data/binance (the real klines): `$QS_SHARED_DIR`, else the
/// `shared/` beside the checkout, else /work/shared.
pub fn binance_data(rel: &str) -> PathBuf {
    let candidates = [
        std::env::var_os("QS_SHARED_DIR").map(PathBuf::from),
        Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared")),
        Some(PathBuf::from("/work/shared")),
    ];
    for dir in candidates.into_iter().flatten() {
        let p = dir.join("data/binance").join(rel);
        if p.is_file() {
            return p;
        }
    }
    panic!("real kline data {rel} not found: set QS_SHARED_DIR to the shared/ directory");
}

/// The file exactly as users have it today.
pub const SEED: &str = r#"app:
  environment: prod

  clickhouse:
    host: "localhost"          # ClickHouse server address
    port: 8123
    database: "maxaira"
    username: "default"
    password: ""               # set a password in production

  binance:
    spot:
      ws_url: "wss://stream.binance.com:9443/ws/"
      rest_url: "https://data-api.binance.vision/api/v3/klines"
    um:
      ws_url: "wss://fstream.binance.com/ws/"
      rest_url: "https://fapi.binance.com/fapi/v1/klines"
    cm:
      ws_url: "wss://dstream.binance.com/ws/"
      rest_url: "https://dapi.binance.com/dapi/v1/klines"
"#;

/// The seed file with host, port, user, password and database pointed elsewhere.
pub fn seed_for(host: &str, port: u16, user: &str, password: &str, database: &str) -> String {
    SEED.replacen("host: \"localhost\"", &format!("host: \"{host}\""), 1)
        .replacen("port: 8123", &format!("port: {port}"), 1)
        .replacen("username: \"default\"", &format!("username: \"{user}\""), 1)
        .replacen("password: \"\"", &format!("password: \"{password}\""), 1)
        .replacen(
            "database: \"maxaira\"",
            &format!("database: \"{database}\""),
            1,
        )
}
