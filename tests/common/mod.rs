//! Test harness: a real ClickHouse server per test binary (private data dir, free ports) unless
//! `QS_TEST_CLICKHOUSE_URL` names one, a database per test (dropped afterwards), and a tiny
//! blocking HTTP client for verification queries. Never silently passes without ClickHouse.
//!
//! Two lanes (`QS_TEST_CLICKHOUSE_ENGINE`): unset (or `server`) starts `clickhouse-server`
//! (18.16 from Debian here); `chdb` starts `scripts/chdb-server` instead, ClickHouse 26.x as the
//! chDB library behind a small front speaking the ClickHouse HTTP interface. Tests see the same
//! thing either way: a URL, ports, the `PW_USER` user, kill and restart on the same data.
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

const CHDB_INSTALL_HINT: &str = "The chdb lane (QS_TEST_CLICKHOUSE_ENGINE=chdb) needs python3 \
    with the chdb-core package: run scripts/install-deps (pip install --no-deps chdb-core).";

/// Which engine private servers run (`QS_TEST_CLICKHOUSE_ENGINE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `clickhouse-server` from the `PATH` (Debian's 18.16 in CI).
    Server,
    /// `scripts/chdb-server`: ClickHouse 26.x through chDB.
    Chdb,
}

/// The lane this test process runs in.
pub fn engine() -> Engine {
    match std::env::var("QS_TEST_CLICKHOUSE_ENGINE").as_deref() {
        Err(_) | Ok("") | Ok("server") | Ok("clickhouse-server") => Engine::Server,
        Ok("chdb") => Engine::Chdb,
        Ok(other) => panic!("QS_TEST_CLICKHOUSE_ENGINE must be `server` or `chdb`, not {other:?}"),
    }
}

const INSTALL_HINT: &str = "ClickHouse is needed for the integration tests and none could be \
    started. Install it with `sudo apt-get install -y clickhouse-server clickhouse-client` (the \
    README's test command does this), or point QS_TEST_CLICKHOUSE_URL at a running server \
    (e.g. http://127.0.0.1:8123).";

/// A private `clickhouse-server` (or `scripts/chdb-server`, see `engine()`) process with its
/// own data dir and ports. A watchdog shell kills it when the test process exits, and removes
/// the data dir.
pub struct ChServer {
    pub engine: Engine,
    pub http_port: u16,
    /// The native-protocol port (`clickhouse-server` only; chdb-server has none).
    pub tcp_port: u16,
    interserver_port: u16,
    dir: PathBuf,
    /// Written into the server's macros, to be sure the server on our port is ours.
    instance: String,
    child: Mutex<Option<Child>>,
}

/// A loopback port nobody listens on (bound, then released).
pub fn dead_port() -> u16 {
    free_port()
}

/// Ports handed out by this test process: never handed out twice.
static ISSUED: Mutex<Vec<u16>> = Mutex::new(Vec::new());

/// A free loopback port for a server a test starts later, unique in this test process.
///
/// Taken from 20000..32768, below the kernel's ephemeral range (32768..61000 by default), so
/// neither an outgoing connection nor a `bind("127.0.0.1:0")` elsewhere in the tests can take
/// it between now and the moment its server binds it. (Asking the kernel for port 0 and
/// releasing it let two concurrent tests get the same port: one test then scraped the other's
/// in-process daemon.)
fn free_port() -> u16 {
    const LOW: u32 = 20_000;
    const SPAN: u32 = 32_768 - LOW;
    let mut issued = ISSUED.lock().unwrap_or_else(|e| e.into_inner());
    let start = rand::random::<u32>() % SPAN;
    for i in 0..SPAN {
        let port = (LOW + (start + i) % SPAN) as u16;
        if issued.contains(&port) {
            continue;
        }
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            issued.push(port);
            return port;
        }
    }
    panic!("no free loopback port in {LOW}..32768")
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .chain([PathBuf::from("/usr/bin"), PathBuf::from("/usr/sbin")])
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// The Python interpreter for `scripts/chdb-server`, checked to import chdb: `python3`'s real
/// executable (not a version manager's shim, which may fork, so the pid we kill would not be
/// the server's), or `QS_TEST_PYTHON`.
fn chdb_python() -> Result<PathBuf, String> {
    static PYTHON: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let python = std::env::var_os("QS_TEST_PYTHON").unwrap_or_else(|| "python3".into());
            let out = Command::new(&python)
                .args(["-c", "import sys, chdb; print(sys.executable)"])
                .stdin(Stdio::null())
                .output()
                .map_err(|e| format!("cannot run {python:?}: {e}"))?;
            let exe = String::from_utf8_lossy(&out.stdout).trim().to_string();
            if !out.status.success() || exe.is_empty() {
                return Err(format!(
                    "{python:?} cannot import chdb: {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(PathBuf::from(exe))
        })
        .clone()
}

/// The server command: `clickhouse-server` or `clickhouse server`.
fn server_command() -> Option<(PathBuf, Vec<String>)> {
    if let Some(p) = find_in_path("clickhouse-server") {
        return Some((p, vec![]));
    }
    find_in_path("clickhouse").map(|p| (p, vec!["server".to_string()]))
}

/// Why a launch failed: a port race (try other ports) or anything else (give up).
enum LaunchError {
    PortTaken(String),
    Failed(String),
}

impl ChServer {
    /// Starts a new private server; panics with an install hint if none can be started.
    /// Ports are picked free but can be taken by someone else before the server binds them;
    /// such a race is detected and retried with other ports.
    pub fn start() -> ChServer {
        let mut last = String::new();
        for _ in 0..5 {
            let instance = format!(
                "qs-ch-{}-{}",
                std::process::id(),
                NEXT.fetch_add(1, Ordering::Relaxed)
            );
            let dir = std::env::temp_dir().join(&instance);
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("tmp")).expect("create ClickHouse temp dir");
            let server = ChServer {
                engine: engine(),
                http_port: free_port(),
                tcp_port: free_port(),
                interserver_port: free_port(),
                dir,
                instance,
                child: Mutex::new(None),
            };
            server.write_configs();
            match server.launch() {
                Ok(()) => return server,
                Err(LaunchError::PortTaken(why)) => {
                    server.stop_child();
                    last = why;
                }
                Err(LaunchError::Failed(why)) => panic!("{why}"),
            }
        }
        panic!("could not start a private clickhouse-server: ports kept being taken ({last})");
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http_port)
    }

    fn write_configs(&self) {
        if self.engine == Engine::Chdb {
            // Users for chdb-server, in a file: no password on a command line.
            std::fs::write(
                self.dir.join("users.txt"),
                format!("{PW_USER}:{PW_PASSWORD}\n"),
            )
            .expect("write users.txt");
            return;
        }
        let d = self.dir.display().to_string();
        let config = include_str!("../../scripts/clickhouse/config.xml")
            .replace("@DIR@", &d)
            .replace("@HTTP_PORT@", &self.http_port.to_string())
            .replace("@TCP_PORT@", &self.tcp_port.to_string())
            .replace("@INTERSERVER_PORT@", &self.interserver_port.to_string())
            .replace("@INSTANCE@", &self.instance);
        let users = include_str!("../../scripts/clickhouse/users.xml")
            .replace("@PW_USER@", PW_USER)
            .replace("@PW_PASSWORD@", PW_PASSWORD);
        std::fs::write(self.dir.join("config.xml"), config).expect("write config.xml");
        std::fs::write(self.dir.join("users.xml"), users).expect("write users.xml");
    }

    fn pid_file(&self) -> PathBuf {
        self.dir.join("server.pid")
    }

    fn stop_child(&self) {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let pid = std::fs::read_to_string(self.pid_file()).unwrap_or_default();
            if !pid.trim().is_empty() {
                let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
            }
            let _ = child.wait();
        }
    }

    /// Starts the server process and waits until it answers `/ping` as this instance.
    fn launch(&self) -> Result<(), LaunchError> {
        let (bin, args, hint) = match self.engine {
            Engine::Server => {
                let Some((bin, mut args)) = server_command() else {
                    return Err(LaunchError::Failed(INSTALL_HINT.to_string()));
                };
                args.push(format!(
                    "--config-file={}",
                    self.dir.join("config.xml").display()
                ));
                (bin, args, INSTALL_HINT)
            }
            Engine::Chdb => (
                chdb_python()
                    .map_err(|e| LaunchError::Failed(format!("{CHDB_INSTALL_HINT} ({e})")))?,
                vec![
                    Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join("scripts/chdb-server")
                        .display()
                        .to_string(),
                    format!("--port={}", self.http_port),
                    format!("--path={}", self.dir.join("data").display()),
                    format!("--users-file={}", self.dir.join("users.txt").display()),
                    format!("--macro=qs_instance={}", self.instance),
                ],
                CHDB_INSTALL_HINT,
            ),
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
            .args(&args)
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
            .map_err(|e| LaunchError::Failed(format!("{hint} ({e})")))?;
        *self.child.lock().unwrap() = Some(child);
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if ping("127.0.0.1", self.http_port) {
                return if self.answers_as_us() {
                    Ok(())
                } else {
                    Err(LaunchError::PortTaken(format!(
                        "another server answers on port {}",
                        self.http_port
                    )))
                };
            }
            let exited = self
                .child
                .lock()
                .unwrap()
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            if let Some(status) = exited {
                let log = std::fs::read_to_string(self.dir.join("error.log")).unwrap_or_default();
                let stderr =
                    std::fs::read_to_string(self.dir.join("stderr.log")).unwrap_or_default();
                let text = format!("{} exited with {status}:\n{stderr}\n{log}", self.name());
                return Err(if text.contains("Address already in use") {
                    LaunchError::PortTaken(text)
                } else if self.engine == Engine::Chdb {
                    LaunchError::Failed(format!("{text}\n{hint}"))
                } else {
                    LaunchError::Failed(text)
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(LaunchError::Failed(format!(
            "{} did not answer /ping within 60 s (logs in {})",
            self.name(),
            self.dir.display()
        )))
    }

    fn name(&self) -> &'static str {
        match self.engine {
            Engine::Server => "clickhouse-server",
            Engine::Chdb => "scripts/chdb-server",
        }
    }

    fn answers_as_us(&self) -> bool {
        run_sql(
            "127.0.0.1",
            self.http_port,
            None,
            "SELECT substitution FROM system.macros WHERE macro = 'qs_instance'",
        )
        .is_ok_and(|v| v.trim() == self.instance)
    }

    /// Kills the server (SIGKILL, like a crash) and waits until it is gone.
    pub fn kill(&self) {
        let pid = std::fs::read_to_string(self.pid_file()).unwrap_or_default();
        assert!(
            !pid.trim().is_empty(),
            "no pid file for the ClickHouse server"
        );
        self.stop_child();
        let deadline = Instant::now() + Duration::from_secs(30);
        while ping("127.0.0.1", self.http_port) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        assert!(
            !ping("127.0.0.1", self.http_port),
            "ClickHouse still answers after kill"
        );
    }

    /// Starts the server again on the same data dir and ports.
    pub fn restart(&self) {
        if let Err(LaunchError::PortTaken(why) | LaunchError::Failed(why)) = self.launch() {
            panic!("cannot restart ClickHouse: {why}");
        }
    }
}

static NEXT: AtomicU32 = AtomicU32::new(0);

fn ping(host: &str, port: u16) -> bool {
    matches!(http(host, port, "GET", "/ping", "", None), Ok((200, body)) if body.starts_with("Ok"))
}

/// A minimal blocking HTTP/1.0 request. Returns (status, body).
pub fn http(
    host: &str,
    port: u16,
    method: &str,
    path_query: &str,
    body: &str,
    auth: Option<(&str, &str)>,
) -> std::io::Result<(u16, String)> {
    http_reply(host, port, method, path_query, body, auth).map(|r| (r.status, r.body))
}

/// An HTTP answer: status, headers (names lower-cased) and body.
#[derive(Debug)]
pub struct HttpReply {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpReply {
    /// The first header called `name` (any case).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Like `http`, with the headers.
pub fn http_reply(
    host: &str,
    port: u16,
    method: &str,
    path_query: &str,
    body: &str,
    auth: Option<(&str, &str)>,
) -> std::io::Result<HttpReply> {
    use std::net::ToSocketAddrs;
    let addr = (host, port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| std::io::Error::other(format!("cannot resolve {host}")))?;
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    let auth = auth
        .map(|(u, p)| format!("X-ClickHouse-User: {u}\r\nX-ClickHouse-Key: {p}\r\n"))
        .unwrap_or_default();
    write!(
        s,
        "{method} {path_query} HTTP/1.0\r\nHost: {host}\r\n{auth}Content-Length: {}\r\n\r\n{body}",
        body.len()
    )?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers = head
        .lines()
        .skip(1)
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Ok(HttpReply {
        status,
        headers,
        body: body.to_string(),
    })
}

/// Percent-encodes a URL query value.
pub fn percent_encode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A ClickHouse server tests can use, with the credentials of its admin user.
pub struct Server {
    pub host: String,
    pub port: u16,
    pub user: String,
    pub password: String,
    /// Set when the harness started it; such a server also has the `PW_USER` user.
    private: Option<ChServer>,
}

impl Server {
    /// The native-protocol port, for `clickhouse-client` (private `clickhouse-server`s only).
    pub fn tcp_port(&self) -> Option<u16> {
        self.private
            .as_ref()
            .filter(|s| s.engine == Engine::Server)
            .map(|s| s.tcp_port)
    }

    fn private() -> Server {
        let server = ChServer::start();
        Server {
            host: "127.0.0.1".to_string(),
            port: server.http_port,
            user: "default".to_string(),
            password: String::new(),
            private: Some(server),
        }
    }

    fn sql(&self, db: Option<&str>, sql: &str) -> Result<String, String> {
        let auth = (!self.password.is_empty() || self.user != "default")
            .then_some((self.user.as_str(), self.password.as_str()));
        let path = match db {
            Some(db) => format!("/?database={}", percent_encode(db)),
            None => "/".to_string(),
        };
        match http(&self.host, self.port, "POST", &path, sql, auth) {
            Ok((200, body)) => Ok(body),
            Ok((code, body)) => Err(format!("ClickHouse answered {code}: {body}")),
            Err(e) => Err(format!(
                "cannot reach ClickHouse at {}:{}: {e}",
                self.host, self.port
            )),
        }
    }
}

/// The ClickHouse every test in this binary shares: `QS_TEST_CLICKHOUSE_URL`
/// (`http://[user:password@]host:port`), or a private one.
pub fn shared() -> &'static Server {
    static SHARED: OnceLock<Server> = OnceLock::new();
    SHARED.get_or_init(|| match std::env::var("QS_TEST_CLICKHOUSE_URL") {
        Ok(url) if !url.is_empty() => {
            let u = url::Url::parse(&url).expect("QS_TEST_CLICKHOUSE_URL must be a URL");
            Server {
                host: u.host_str().unwrap_or("127.0.0.1").to_string(),
                port: u.port().unwrap_or(8123),
                user: match u.username() {
                    "" => "default".to_string(),
                    name => name.to_string(),
                },
                password: u.password().unwrap_or("").to_string(),
                private: None,
            }
        }
        _ => Server::private(),
    })
}

/// A server the harness started itself, with the `PW_USER` user: the shared one when it is
/// private, else one of its own (tests of credentials need a user we control).
pub fn private() -> &'static Server {
    static PRIVATE: OnceLock<Server> = OnceLock::new();
    let s = shared();
    if s.private.is_some() {
        return s;
    }
    PRIVATE.get_or_init(Server::private)
}

/// A database of its own for one test, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub host: String,
    pub port: u16,
    server: &'static Server,
}

impl TestDb {
    /// On the shared server.
    pub fn new(tag: &str) -> TestDb {
        TestDb::on(shared(), tag)
    }

    /// On a server the harness started (with `PW_USER`).
    pub fn new_private(tag: &str) -> TestDb {
        TestDb::on(private(), tag)
    }

    /// On a dedicated server (leaked: it lives until the test process ends).
    pub fn on_server(server: &ChServer, tag: &str) -> TestDb {
        let s: &'static Server = Box::leak(Box::new(Server {
            host: "127.0.0.1".to_string(),
            port: server.http_port,
            user: "default".to_string(),
            password: String::new(),
            private: None,
        }));
        TestDb::on(s, tag)
    }

    fn on(server: &'static Server, tag: &str) -> TestDb {
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "qs_test_{}_{}_{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed),
            tag
        );
        let db = TestDb {
            name,
            host: server.host.clone(),
            port: server.port,
            server,
        };
        server
            .sql(None, &format!("DROP DATABASE IF EXISTS `{}`", db.name))
            .unwrap_or_else(|e| panic!("{e}"));
        db
    }

    /// YAML for a config pointing at this database; `extra` is appended under `app:`. The ops
    /// endpoint is off (`http.listen: ""`: daemons of parallel tests would all want the default
    /// port) unless `extra` has an `http:` section of its own.
    pub fn yaml(&self, extra: &str) -> String {
        let http = if extra.starts_with("  http:") || extra.contains("\n  http:") {
            ""
        } else {
            "  http:\n    listen: \"\"\n"
        };
        format!(
            "app:\n  environment: test\n  clickhouse:\n    host: \"{}\"\n    port: {}\n    database: \"{}\"\n    username: \"{}\"\n    password: \"{}\"\n{http}{extra}",
            self.host, self.port, self.name, self.server.user, self.server.password
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
        self.server.sql(Some(&self.name), sql)
    }

    /// Creates this database (tests that set up tables before the code under test runs).
    pub fn create(&self) {
        self.server
            .sql(
                None,
                &format!("CREATE DATABASE IF NOT EXISTS `{}`", self.name),
            )
            .unwrap_or_else(|e| panic!("{e}"));
    }
}

fn run_sql(host: &str, port: u16, db: Option<&str>, sql: &str) -> Result<String, String> {
    let path = match db {
        Some(db) => format!("/?database={}", percent_encode(db)),
        None => "/".to_string(),
    };
    match http(host, port, "POST", &path, sql, None) {
        Ok((200, body)) => Ok(body),
        Ok((code, body)) => Err(format!("ClickHouse answered {code}: {body}")),
        Err(e) => Err(format!("cannot reach ClickHouse on port {port}: {e}")),
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let _ = self
            .server
            .sql(None, &format!("DROP DATABASE IF EXISTS `{}`", self.name));
    }
}

/// Path of a file in the repository's real Binance klines (`tests/data/binance`, copied from
/// public archives; see its README).
pub fn binance_data(rel: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/binance")
        .join(rel);
    assert!(p.is_file(), "real kline data {} is missing", p.display());
    p
}

/// The candles of a real kline CSV under `tests/data/binance/` (header lines skipped), as
/// closed archive candles of `pair`.
pub fn binance_klines(
    rel: &str,
    pair: &quantservice::market::PairKey,
) -> Vec<quantservice::market::Kline> {
    let text = std::fs::read_to_string(binance_data(rel)).unwrap();
    text.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[0].parse::<i64>().is_ok())
        .map(|f| {
            quantservice::market::Kline::from_fields(
                pair.clone(),
                &f,
                true,
                quantservice::market::Source::Archive,
            )
            .unwrap()
        })
        .collect()
}

/// Stores `rows` in `db` through the real writer (migrating first); returns the store.
pub async fn store_klines(
    db: &TestDb,
    rows: Vec<quantservice::market::Kline>,
) -> quantservice::store::Store {
    use quantservice::store::{migrate, writer::Writer, Store};
    let cfg = db.config("  writer:\n    batch_rows: 5000\n    flush_interval: 100ms\n");
    let store = Store::new(&cfg.clickhouse).unwrap();
    migrate::run(&store).await.unwrap();
    let (writer, handle) = Writer::new(store.clone(), cfg.writer);
    let task = tokio::spawn(writer.run(tokio_util::sync::CancellationToken::new()));
    handle.send_many(rows).await.unwrap();
    drop(handle);
    task.await.unwrap().unwrap();
    store
}

/// The `app.binance` section pointing every market and the archives at the simulator `sim`;
/// `um_extra` lines go into the `um` section.
pub fn sim_binance_yaml(sim: &qs_sim::SimHandle, um_extra: &str) -> String {
    use quantservice::market::Market;
    format!(
        "  binance:\n    spot:\n      rest_url: \"{}\"\n    um:\n      rest_url: \"{}\"\n{um_extra}    cm:\n      rest_url: \"{}\"\n    archive_url: \"{}\"\n",
        sim.rest_url(Market::Spot),
        sim.rest_url(Market::Um),
        sim.rest_url(Market::Cm),
        sim.archive_url()
    )
}

/// Like `sim_binance_yaml`, with the simulator's WebSocket bases too (spot and cm on their raw
/// `/ws/` bases, um on `um_ws`, so a test can give it a legacy URL).
pub fn sim_endpoints_yaml(sim: &qs_sim::SimHandle, um_ws: &str) -> String {
    use quantservice::market::Market;
    format!(
        "  binance:\n    spot:\n      ws_url: \"{}\"\n      rest_url: \"{}\"\n    um:\n      ws_url: \"{um_ws}\"\n      rest_url: \"{}\"\n    cm:\n      ws_url: \"{}\"\n      rest_url: \"{}\"\n    archive_url: \"{}\"\n",
        sim.ws_url(Market::Spot),
        sim.rest_url(Market::Spot),
        sim.rest_url(Market::Um),
        sim.ws_url(Market::Cm),
        sim.rest_url(Market::Cm),
        sim.archive_url()
    )
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

/// A child process killed (and reaped) when dropped, so a failing test leaves no daemon behind.
pub struct KillOnDrop(pub std::process::Child);

impl KillOnDrop {
    pub fn id(&self) -> u32 {
        self.0.id()
    }
}

impl std::ops::Deref for KillOnDrop {
    type Target = std::process::Child;
    fn deref(&self) -> &Self::Target {
        &self.0
    }
}

impl std::ops::DerefMut for KillOnDrop {
    fn deref_mut(&mut self) -> &mut Self::Target {
        &mut self.0
    }
}

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        if let Ok(None) = self.0.try_wait() {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
}

/// A real SOCKS5 server (Debian's `microsocks`) on a free loopback port with a user and
/// password, whose outgoing connections come from `bind` (e.g. 127.0.0.2), so the simulator
/// can tell proxied requests from direct ones. Stopped when dropped.
pub struct Socks {
    pub port: u16,
    child: std::process::Child,
}

pub const SOCKS_USER: &str = "qsproxy";
pub const SOCKS_PASSWORD: &str = "Pr0xy-s3cret-4242";

impl Socks {
    pub fn start(bind: &str) -> Socks {
        Socks::start_with(bind, SOCKS_USER, SOCKS_PASSWORD)
    }

    pub fn start_with(bind: &str, user: &str, password: &str) -> Socks {
        let bin = ["microsocks", "/usr/bin/microsocks"]
            .into_iter()
            .find(|b| {
                std::process::Command::new(b)
                    .arg("-h")
                    .stdout(std::process::Stdio::null())
                    .stderr(std::process::Stdio::null())
                    .status()
                    .is_ok()
            })
            .expect("microsocks is not installed: run scripts/install-deps (apt-get install microsocks)");
        for _ in 0..20 {
            let port = dead_port();
            let mut child = std::process::Command::new(bin)
                .args([
                    "-i",
                    "127.0.0.1",
                    "-p",
                    &port.to_string(),
                    "-u",
                    user,
                    "-P",
                    password,
                    "-b",
                    bind,
                ])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("cannot start microsocks");
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while std::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break; // port taken: try another
                }
                if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                    return Socks { port, child };
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        panic!("microsocks did not start");
    }

    /// Stops the server (its port then refuses connections).
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Socks {
    fn drop(&mut self) {
        self.stop();
    }
}

/// How Binance prints a decimal: spot with 8 fixed decimals, futures in the shortest form.
pub fn binance_decimal(
    market: quantservice::market::Market,
    d: quantservice::market::Decimal,
) -> String {
    match market {
        quantservice::market::Market::Spot => {
            let m = d.mantissa();
            format!("{}.{:08}", m / 100_000_000, m % 100_000_000)
        }
        _ => d.to_string(),
    }
}

/// Whether two fields of ClickHouse text output hold the same value: numbers compare as exact
/// decimals (ClickHouse prints `Decimal(38, 8)` as `106.00000000` before 21.9 and as `106`
/// since), anything else as text.
pub fn same_value(a: &str, b: &str) -> bool {
    use quantservice::market::Decimal;
    match (a.parse::<Decimal>(), b.parse::<Decimal>()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// Asserts that two tab-separated outputs have the same rows, fields compared by `same_value`.
#[track_caller]
pub fn assert_tsv_eq(actual: &str, expected: &str) {
    let rows = |s: &str| -> Vec<Vec<String>> {
        s.lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    };
    let (a, e) = (rows(actual), rows(expected));
    let same = a.len() == e.len()
        && a.iter()
            .zip(&e)
            .all(|(x, y)| x.len() == y.len() && x.iter().zip(y).all(|(f, g)| same_value(f, g)));
    assert!(
        same,
        "ClickHouse output differs\n  actual: {actual:?}\nexpected: {expected:?}"
    );
}

/// Polls `cond` every 50 ms until it holds; panics with `what` after `secs`.
pub async fn wait_for<F, Fut>(secs: u64, what: &str, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(secs);
    while !cond().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The number a `SELECT count() …` answers (0 while it fails, e.g. before the schema exists).
pub fn count(db: &TestDb, sql: &str) -> u64 {
    db.try_sql(sql)
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

/// Waits until every candle of `pair` with open time in `[from, to)` is stored (`FINAL`).
pub async fn wait_stored(
    db: &TestDb,
    pair: &quantservice::market::PairKey,
    from: i64,
    to: i64,
    secs: u64,
) {
    let len = pair.period.fixed_ms().expect("a fixed-length period");
    let want = u64::try_from((to - from) / len).expect("from <= to");
    let sql = format!(
        "SELECT count() FROM klines FINAL WHERE market = '{}' AND symbol = '{}' AND period = '{}' \
         AND open_time >= {from} AND open_time < {to}",
        pair.market, pair.symbol, pair.period
    );
    wait_for(
        secs,
        &format!("{want} candles of {pair} stored"),
        || async { count(db, &sql) == want },
    )
    .await;
}

/// `yaml` written as `app.yaml` in a new temporary directory (keep it alive while the daemon
/// runs), and the config loaded from it.
pub fn write_config(yaml: &str) -> (tempfile::TempDir, PathBuf, Config) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let path = dir.path().join("app.yaml");
    std::fs::write(&path, yaml).expect("app.yaml written");
    let cfg = Config::load(&path).expect("a valid app.yaml");
    (dir, path, cfg)
}

/// Edits the config at `path` the way editors do (a new file renamed over the old one) and
/// waits up to 30 s for the running daemon's verdict on it.
pub async fn edit_config(
    reloads: &quantservice::config_watch::Reloads,
    path: &Path,
    yaml: &str,
) -> quantservice::config_watch::ReloadResult {
    let seq = reloads.latest().seq;
    let tmp = path.with_extension("yaml.tmp");
    std::fs::write(&tmp, yaml).expect("config written");
    std::fs::rename(&tmp, path).expect("config renamed into place");
    tokio::time::timeout(Duration::from_secs(30), reloads.next_after(seq))
        .await
        .expect("a reload outcome within 30 s")
        .expect("the daemon publishes reload outcomes")
        .result
}

/// The daemon in-process on `cfg` (watching `path`), and the token that stops it.
pub fn spawn_daemon(
    cfg: Config,
    path: &Path,
) -> (
    tokio::task::JoinHandle<anyhow::Result<()>>,
    tokio_util::sync::CancellationToken,
) {
    let shutdown = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(quantservice::app::run_daemon(
        cfg,
        path.to_path_buf(),
        quantservice::config_watch::Reloads::new(),
        shutdown.clone(),
    ));
    (task, shutdown)
}

/// A benchmark setting from the environment (`1_000_000` and `1,000,000` accepted), else
/// `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .map(|v| v.replace(['_', ','], ""))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median of benchmark timings (the upper one of an even count); sorts `v`.
pub fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}
