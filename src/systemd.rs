//! The service manager's notify protocol (`sd_notify(3)`), spoken without libsystemd: one
//! datagram per message to the Unix socket named by `$NOTIFY_SOCKET` (a path, or `@name` for
//! an abstract socket). The daemon says `READY=1` once it serves, `STATUS=…` when its pair
//! counts change, `STOPPING=1` when shutdown begins and, when `$WATCHDOG_USEC` is set (for this
//! process: `$WATCHDOG_PID`), `WATCHDOG=1` from its reconcile loop. Without `$NOTIFY_SOCKET`
//! (a terminal, 宝塔's Supervisor) every call is a no-op. What to say and when is the
//! operator's business; this module only delivers it.

use std::os::unix::net::UnixDatagram;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use tracing::{debug, warn};

/// Where notifications go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotifyAddr {
    /// A socket file.
    Path(PathBuf),
    /// An abstract socket (`@name` in `$NOTIFY_SOCKET`), name without the `@`.
    Abstract(Vec<u8>),
}

impl NotifyAddr {
    /// `$NOTIFY_SOCKET` as systemd sets it: an absolute path or `@name`. Anything else (a
    /// relative path, `vsock:`) is `None`.
    pub fn parse(s: &str) -> Option<NotifyAddr> {
        match s.strip_prefix('@') {
            Some("") => None,
            Some(name) => Some(NotifyAddr::Abstract(name.as_bytes().to_vec())),
            None if s.starts_with('/') => Some(NotifyAddr::Path(PathBuf::from(s))),
            None => None,
        }
    }
}

/// The watchdog interval `$WATCHDOG_USEC` asks for, if it is meant for this process
/// (`$WATCHDOG_PID` unset or `own_pid`), like `sd_watchdog_enabled(3)`.
pub fn watchdog_interval(usec: Option<&str>, pid: Option<&str>, own_pid: u32) -> Option<Duration> {
    let usec: u64 = usec?.trim().parse().ok().filter(|u| *u > 0)?;
    if let Some(pid) = pid {
        if pid.trim().parse::<u32>().ok() != Some(own_pid) {
            return None;
        }
    }
    Some(Duration::from_micros(usec))
}

/// Sends notifications; cheap to clone. The default (and [`Notifier::from_env`] without
/// `$NOTIFY_SOCKET`) sends nothing.
#[derive(Clone, Default)]
pub struct Notifier(Option<Arc<Inner>>);

struct Inner {
    socket: UnixDatagram,
    addr: NotifyAddr,
    watchdog: Option<Duration>,
    sent: Mutex<Sent>,
}

#[derive(Default)]
struct Sent {
    ready: bool,
    stopping: bool,
    status: String,
    /// A delivery failed already (later failures are logged at debug level only).
    failed: bool,
}

impl Notifier {
    /// From `$NOTIFY_SOCKET`, `$WATCHDOG_USEC` and `$WATCHDOG_PID`.
    pub fn from_env() -> Notifier {
        let Some(raw) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier::default();
        };
        let raw = raw.to_string_lossy().into_owned();
        let Some(addr) = NotifyAddr::parse(&raw) else {
            warn!(notify_socket = %raw, "NOTIFY_SOCKET is neither a path nor @name; not notifying the service manager.");
            return Notifier::default();
        };
        let watchdog = watchdog_interval(
            std::env::var("WATCHDOG_USEC").ok().as_deref(),
            std::env::var("WATCHDOG_PID").ok().as_deref(),
            std::process::id(),
        );
        match Notifier::new(addr, watchdog) {
            Ok(n) => n,
            Err(e) => {
                warn!(error = %e, "Cannot open a socket to notify the service manager; not notifying it.");
                Notifier::default()
            }
        }
    }

    /// Notifies `addr`; `watchdog`: the interval the service manager expects pings within.
    pub fn new(addr: NotifyAddr, watchdog: Option<Duration>) -> std::io::Result<Notifier> {
        let socket = UnixDatagram::unbound()?;
        // A full receive queue must never stall the daemon: such a message is dropped.
        socket.set_nonblocking(true)?;
        Ok(Notifier(Some(Arc::new(Inner {
            socket,
            addr,
            watchdog,
            sent: Mutex::default(),
        }))))
    }

    /// The watchdog interval, when the service manager runs one for us.
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.0.as_ref()?.watchdog
    }

    /// `READY=1` (once).
    pub fn ready(&self) {
        self.once(|s| &mut s.ready, "READY=1");
    }

    /// `STOPPING=1` (once).
    pub fn stopping(&self) {
        self.once(|s| &mut s.stopping, "STOPPING=1\nSTATUS=stopping");
    }

    /// `STATUS=text`, when it differs from the last one sent.
    pub fn status(&self, text: &str) {
        let Some(inner) = &self.0 else { return };
        {
            let mut sent = inner.sent.lock().unwrap_or_else(PoisonError::into_inner);
            if sent.status == text {
                return;
            }
            sent.status = text.to_string();
        }
        self.send(&format!("STATUS={text}"));
    }

    /// `WATCHDOG=1`, when a watchdog runs.
    pub fn watchdog(&self) {
        if self.watchdog_interval().is_some() {
            self.send("WATCHDOG=1");
        }
    }

    fn once(&self, flag: impl FnOnce(&mut Sent) -> &mut bool, msg: &str) {
        let Some(inner) = &self.0 else { return };
        {
            let mut sent = inner.sent.lock().unwrap_or_else(PoisonError::into_inner);
            let f = flag(&mut sent);
            if *f {
                return;
            }
            *f = true;
        }
        self.send(msg);
    }

    fn send(&self, msg: &str) {
        let Some(inner) = &self.0 else { return };
        let result = match &inner.addr {
            NotifyAddr::Path(p) => inner.socket.send_to(msg.as_bytes(), p),
            NotifyAddr::Abstract(name) => send_abstract(&inner.socket, name, msg),
        };
        if let Err(e) = result {
            let first = !std::mem::replace(
                &mut inner
                    .sent
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .failed,
                true,
            );
            if first {
                warn!(error = %e, message = %msg, "Cannot notify the service manager.");
            } else {
                debug!(error = %e, message = %msg, "Cannot notify the service manager.");
            }
        }
    }
}

#[cfg(target_os = "linux")]
fn send_abstract(socket: &UnixDatagram, name: &[u8], msg: &str) -> std::io::Result<usize> {
    use std::os::linux::net::SocketAddrExt;
    let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
    socket.send_to_addr(msg.as_bytes(), &addr)
}

#[cfg(not(target_os = "linux"))]
fn send_abstract(_: &UnixDatagram, _: &[u8], _: &str) -> std::io::Result<usize> {
    Err(std::io::Error::new(
        std::io::ErrorKind::Unsupported,
        "abstract sockets exist on Linux only",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_socket_addresses() {
        struct Case {
            env: &'static str,
            expected: Option<NotifyAddr>,
        }
        let cases = [
            Case {
                env: "/run/systemd/notify",
                expected: Some(NotifyAddr::Path("/run/systemd/notify".into())),
            },
            Case {
                env: "@/org/freedesktop/systemd1/notify/123",
                expected: Some(NotifyAddr::Abstract(
                    b"/org/freedesktop/systemd1/notify/123".to_vec(),
                )),
            },
            Case {
                env: "@",
                expected: None,
            },
            Case {
                env: "relative/notify",
                expected: None,
            },
            Case {
                env: "vsock:2:1234",
                expected: None,
            },
            Case {
                env: "",
                expected: None,
            },
        ];
        for c in cases {
            assert_eq!(NotifyAddr::parse(c.env), c.expected, "{:?}", c.env);
        }
    }

    #[test]
    fn watchdog_intervals() {
        struct Case {
            usec: Option<&'static str>,
            pid: Option<&'static str>,
            expected: Option<Duration>,
        }
        let cases = [
            Case {
                usec: Some("60000000"),
                pid: None,
                expected: Some(Duration::from_secs(60)),
            },
            Case {
                usec: Some("60000000"),
                pid: Some("42"),
                expected: Some(Duration::from_secs(60)),
            },
            Case {
                usec: Some("60000000"),
                pid: Some("43"),
                expected: None,
            },
            Case {
                usec: Some("0"),
                pid: None,
                expected: None,
            },
            Case {
                usec: Some("soon"),
                pid: None,
                expected: None,
            },
            Case {
                usec: None,
                pid: Some("42"),
                expected: None,
            },
        ];
        for c in cases {
            assert_eq!(
                watchdog_interval(c.usec, c.pid, 42),
                c.expected,
                "{:?} {:?}",
                c.usec,
                c.pid
            );
        }
    }

    fn recv(s: &UnixDatagram) -> String {
        let mut buf = [0u8; 512];
        let n = s.recv(&mut buf).unwrap();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    }

    #[test]
    fn messages_reach_a_path_socket_once_and_on_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify.sock");
        let server = UnixDatagram::bind(&path).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let n =
            Notifier::new(NotifyAddr::Path(path.clone()), Some(Duration::from_secs(2))).unwrap();
        n.status("0 pairs");
        n.status("0 pairs");
        n.ready();
        n.ready();
        n.watchdog();
        n.status("1 pair");
        n.stopping();
        n.stopping();
        let got: Vec<String> = (0..5).map(|_| recv(&server)).collect();
        assert_eq!(
            got,
            [
                "STATUS=0 pairs",
                "READY=1",
                "WATCHDOG=1",
                "STATUS=1 pair",
                "STOPPING=1\nSTATUS=stopping"
            ]
        );
        server.set_nonblocking(true).unwrap();
        let mut buf = [0u8; 64];
        assert!(server.recv(&mut buf).is_err(), "nothing repeated");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn messages_reach_an_abstract_socket() {
        use std::os::linux::net::SocketAddrExt;
        let name = format!("quantservice-test-{}", std::process::id());
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let server = UnixDatagram::bind_addr(&addr).unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let env = format!("@{name}");
        let n = Notifier::new(NotifyAddr::parse(&env).unwrap(), None).unwrap();
        n.ready();
        n.watchdog(); // no watchdog: nothing sent
        n.stopping();
        assert_eq!(recv(&server), "READY=1");
        assert_eq!(recv(&server), "STOPPING=1\nSTATUS=stopping");
    }

    #[test]
    fn without_a_socket_nothing_happens() {
        let n = Notifier::default();
        n.ready();
        n.status("x");
        n.watchdog();
        n.stopping();
        assert_eq!(n.watchdog_interval(), None);
    }
}
