//! Deployment as operators run it, as root: deploy/install.sh into a temporary prefix (layout,
//! owners, modes, the service user, a kept config, idempotence); deploy/upgrade.sh (a good
//! upgrade, one the config check refuses, one whose binary crashes at start and is rolled back,
//! one from a tarball made by scripts/package); deploy/rollback.sh; the Supervisor program and
//! deploy/supervisor/ctl.sh under a real supervisord; the systemd unit through systemd-analyze.
//!
//! The service is driven through QS_SERVICE_CTL=tests/deploy/fake-ctl.sh, which runs the
//! installed binary in the background as the service user with a pid file. Two builds are told
//! apart by their bytes: build B is build A with a marker appended (an ELF runs the same), and
//! the running build is read from /proc/PID/exe.
#![allow(clippy::unwrap_used)] // tests may unwrap

mod common;

use std::collections::BTreeMap;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::{TestDb, PW_PASSWORD, PW_USER};

/// The test-only service user; install.sh creates it.
const USER: &str = "qstest";
const SERVICE: &str = "quantservice";

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// True when these tests can run (as root); false to skip them (QS_TEST_SKIP_ROOT=1); else
/// fails with what to do.
fn as_root() -> bool {
    if std::fs::metadata("/proc/self").unwrap().uid() == 0 {
        return true;
    }
    if std::env::var("QS_TEST_SKIP_ROOT").as_deref() == Ok("1") {
        eprintln!("tests/deploy.rs skipped: not root and QS_TEST_SKIP_ROOT=1");
        return false;
    }
    panic!(
        "tests/deploy.rs must run as root: it creates the service user {USER}, sets owners and \
         runs the daemon as that user. Run the tests as root, or set QS_TEST_SKIP_ROOT=1 to skip \
         them."
    );
}

/// What one run of a command printed and returned.
struct Ran {
    code: Option<i32>,
    stdout: String,
    stderr: String,
}

impl Ran {
    fn all(&self) -> String {
        format!(
            "exit {:?}\n--- stdout\n{}--- stderr\n{}",
            self.code, self.stdout, self.stderr
        )
    }

    /// Asserts the exit code and that the ClickHouse password was never printed.
    fn expect(self, code: i32) -> Ran {
        assert_eq!(self.code, Some(code), "{}", self.all());
        assert!(
            !self.all().contains(PW_PASSWORD),
            "secret printed:\n{}",
            self.all()
        );
        self
    }

    fn says(&self, needle: &str) -> &Ran {
        assert!(
            self.all().contains(needle),
            "no {needle:?} in:\n{}",
            self.all()
        );
        self
    }
}

/// Runs `cmd` with its output in files (a daemon it leaves behind cannot hold a pipe open),
/// failing the test if it is still running after `secs`.
fn run(cmd: &mut Command, secs: u64) -> Ran {
    let dir = tempfile::tempdir().unwrap();
    let (out, err) = (dir.path().join("stdout"), dir.path().join("stderr"));
    let mut child = common::KillOnDrop(
        cmd.stdin(Stdio::null())
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "{cmd:?} still running after {secs} s:\n{}{}",
            std::fs::read_to_string(&out).unwrap_or_default(),
            std::fs::read_to_string(&err).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    Ran {
        code: status.code(),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

fn id_of(flag: &str) -> u32 {
    let out = Command::new("id").args([flag, USER]).output().unwrap();
    assert!(out.status.success(), "no user {USER}: {out:?}");
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}

/// (permission bits, uid, gid) of `path`.
fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

fn assert_mode_owner(path: &Path, mode: u32) {
    assert_eq!(
        mode_owner(path),
        (mode, id_of("-u"), id_of("-g")),
        "{} should be {mode:o} {USER}:{USER}",
        path.display()
    );
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .map(|s| {
            !s.lines()
                .any(|l| l.starts_with("State:") && l.contains('Z'))
        })
        .unwrap_or(false)
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn names_in(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn write_exec(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755)).unwrap();
}

/// One installation in a temporary prefix with its own database (on the harness's server with
/// a password user; the password comes from an environment file, as /etc/quantservice/env),
/// its own ops port, and builds A and B of the binary.
struct Site {
    dir: tempfile::TempDir,
    prefix: PathBuf,
    state: PathBuf,
    env_file: PathBuf,
    port: u16,
    db: TestDb,
    a: PathBuf,
    b: PathBuf,
}

impl Site {
    fn new(tag: &str) -> Site {
        let dir = tempfile::tempdir().unwrap();
        // tempfile makes 0700 directories: the service user must reach the prefix inside.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let real = read(Path::new(env!("CARGO_BIN_EXE_quantservice")));
        let a = dir.path().join("builds/a/quantservice");
        write_exec(&a, &real);
        let b = dir.path().join("builds/b/quantservice");
        let mut marked = real;
        marked.extend_from_slice(b"\nQS-TEST-BUILD-B\n");
        write_exec(&b, &marked);
        let state = dir.path().join("state");
        std::fs::create_dir(&state).unwrap();
        let env_file = dir.path().join("env");
        std::fs::write(
            &env_file,
            format!("# secrets\nQS_CLICKHOUSE_PASSWORD=\"{PW_PASSWORD}\"\n"),
        )
        .unwrap();
        std::fs::set_permissions(&env_file, std::fs::Permissions::from_mode(0o600)).unwrap();
        Site {
            prefix: dir.path().join("opt/quantservice"),
            dir,
            state,
            env_file,
            port: common::dead_port(),
            db: TestDb::new_private(tag),
            a,
            b,
        }
    }

    /// Installed from build A, configured and running (ready).
    fn running(tag: &str) -> Site {
        let site = Site::new(tag);
        site.install(&site.a).expect(0);
        site.configure();
        site.ctl("start").expect(0);
        site.ready().expect(0);
        site
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.prefix.join(rel)
    }

    fn config_yaml(&self) -> String {
        // The password is not in the file: the service gets it from the environment file.
        common::seed_for(&self.db.host, self.db.port, PW_USER, "", &self.db.name)
            + &format!("\n  http:\n    listen: \"127.0.0.1:{}\"\n", self.port)
    }

    /// Writes the test's config over the installed one (owner and mode stay).
    fn configure(&self) {
        std::fs::write(self.path("config/app.yaml"), self.config_yaml()).unwrap();
    }

    /// The environment every script and the fake service manager get.
    fn env(&self, cmd: &mut Command) {
        cmd.env("QS_SERVICE_CTL", repo().join("tests/deploy/fake-ctl.sh"))
            .env("QS_FAKE_PREFIX", &self.prefix)
            .env("QS_FAKE_STATE", &self.state)
            .env("QS_ENV_FILE", &self.env_file)
            .env("QS_SETTLE_SECS", "5")
            .env("QS_SERVICE_LOG", self.state.join("console.log"))
            .env_remove("QS_CONFIG_PATH")
            .env_remove("QS_CLICKHOUSE_PASSWORD")
            .env_remove("QS_SUPERVISORCTL");
    }

    /// Runs deploy/`script` (through its own shebang) with `args`.
    fn script(&self, script: &str, args: &[&str]) -> Ran {
        let mut cmd = Command::new(repo().join("deploy").join(script));
        cmd.args(args);
        self.env(&mut cmd);
        run(&mut cmd, 240)
    }

    fn install(&self, binary: &Path) -> Ran {
        self.script(
            "install.sh",
            &[
                "--prefix",
                self.prefix.to_str().unwrap(),
                "--user",
                USER,
                "--binary",
                binary.to_str().unwrap(),
                "--no-systemd",
            ],
        )
    }

    fn upgrade(&self, new: &Path, timeout: u64) -> Ran {
        self.script(
            "upgrade.sh",
            &[
                "--prefix",
                self.prefix.to_str().unwrap(),
                "--timeout",
                &timeout.to_string(),
                new.to_str().unwrap(),
            ],
        )
    }

    fn ctl(&self, action: &str) -> Ran {
        let mut cmd = Command::new(repo().join("tests/deploy/fake-ctl.sh"));
        cmd.args([action, SERVICE]);
        self.env(&mut cmd);
        run(&mut cmd, 120)
    }

    /// `quantservice ready` (of this build, not the installed one) against the site's config.
    fn ready(&self) -> Ran {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_quantservice"));
        cmd.args(["ready", "--timeout", "60s", "--config"])
            .arg(self.path("config/app.yaml"));
        run(&mut cmd, 120)
    }

    /// The pid the fake service manager started, if it is running.
    fn pid(&self) -> Option<u32> {
        let pid = std::fs::read_to_string(self.state.join("quantservice.pid")).ok()?;
        let pid: u32 = pid.trim().parse().ok()?;
        alive(pid).then_some(pid)
    }

    /// The bytes of the binary the running service was started from.
    fn running_build(&self) -> Vec<u8> {
        let pid = self.pid().expect("the service is running");
        read(Path::new(&format!("/proc/{pid}/exe")))
    }

    fn starts(&self) -> usize {
        std::fs::read_to_string(self.state.join("starts.log"))
            .unwrap_or_default()
            .lines()
            .count()
    }

    fn console(&self) -> String {
        std::fs::read_to_string(self.state.join("console.log")).unwrap_or_default()
    }
}

impl Drop for Site {
    fn drop(&mut self) {
        if self.pid().is_some() {
            let _ = self.ctl("stop");
        }
    }
}

#[test]
fn install_creates_the_layout_and_the_user_and_keeps_a_modified_config() {
    if !as_root() {
        return;
    }
    let site = Site::new("install");
    let ran = site.install(&site.a).expect(0);

    let passwd = Command::new("getent")
        .args(["passwd", USER])
        .output()
        .unwrap();
    let passwd = String::from_utf8_lossy(&passwd.stdout).trim().to_string();
    let fields: Vec<&str> = passwd.split(':').collect();
    assert_eq!(fields.len(), 7, "{passwd:?}");
    assert_eq!(fields[6], "/bin/false", "{passwd}");
    if ran.stdout.contains(&format!("created system user {USER}")) {
        assert_eq!(fields[5], site.prefix.to_str().unwrap(), "home: {passwd}");
    }
    assert!(id_of("-u") < 1000, "a system user: {passwd}");
    let group = Command::new("getent")
        .args(["group", USER])
        .output()
        .unwrap();
    assert!(group.status.success(), "group {USER}");
    assert_eq!(
        String::from_utf8_lossy(&group.stdout).split(':').nth(2),
        Some(id_of("-g").to_string().as_str())
    );

    for d in ["", "bin", "config", "logs", "logs/archived", "data"] {
        assert!(site.path(d).is_dir(), "{d}");
        assert_mode_owner(&site.path(d), 0o750);
    }
    assert_mode_owner(&site.path("bin/quantservice"), 0o750);
    assert_eq!(read(&site.path("bin/quantservice")), read(&site.a));
    assert_mode_owner(&site.path("config/app.yaml"), 0o640);
    assert_eq!(
        read(&site.path("config/app.yaml")),
        read(&repo().join("config/app.yaml"))
    );
    assert_eq!(names_in(&site.path("bin")), ["quantservice"]);

    // The user edits the config; modes drift. Installing again (build B) keeps the config,
    // replaces the binary and puts the modes back.
    site.configure();
    std::fs::set_permissions(site.path("logs"), std::fs::Permissions::from_mode(0o777)).unwrap();
    std::fs::set_permissions(
        site.path("config/app.yaml"),
        std::fs::Permissions::from_mode(0o644),
    )
    .unwrap();
    site.install(&site.b)
        .expect(0)
        .says("kept the existing")
        .says("--no-systemd");
    assert_eq!(
        std::fs::read_to_string(site.path("config/app.yaml")).unwrap(),
        site.config_yaml()
    );
    assert_eq!(read(&site.path("bin/quantservice")), read(&site.b));
    assert_mode_owner(&site.path("logs"), 0o750);
    assert_mode_owner(&site.path("config/app.yaml"), 0o640);

    // Idempotent: a third run changes nothing.
    let snapshot = || {
        let mut s = BTreeMap::new();
        for rel in [
            "",
            "bin",
            "bin/quantservice",
            "config",
            "config/app.yaml",
            "logs",
            "logs/archived",
            "data",
        ] {
            let p = site.path(rel);
            s.insert(rel, (mode_owner(&p), p.is_file().then(|| read(&p))));
        }
        (s, names_in(&site.prefix), names_in(&site.path("bin")))
    };
    let before = snapshot();
    site.install(&site.b).expect(0);
    assert!(before == snapshot(), "a repeated install changed the tree");

    // The unit as install.sh installs it: prefix and user filled in.
    let unit = site
        .script(
            "install.sh",
            &[
                "--prefix",
                site.prefix.to_str().unwrap(),
                "--user",
                USER,
                "--print-unit",
            ],
        )
        .expect(0)
        .stdout;
    let p = site.prefix.display();
    for want in [
        format!("User={USER}\n"),
        format!("Group={USER}\n"),
        format!("ExecStart={p}/bin/quantservice\n"),
        format!("WorkingDirectory={p}\n"),
        format!("Environment=QS_CONFIG_PATH={p}/config/app.yaml\n"),
        format!("ReadWritePaths={p}/logs {p}/data\n"),
    ] {
        assert!(unit.contains(&want), "no {want:?} in:\n{unit}");
    }
    let rest = unit.replace(site.prefix.to_str().unwrap(), "PREFIX");
    assert!(
        !rest.contains("/opt/quantservice") && !rest.contains("quantsvc"),
        "a default left in:\n{unit}"
    );

    // A directory that holds something else is not taken over.
    let foreign = site.dir.path().join("foreign");
    std::fs::create_dir(&foreign).unwrap();
    std::fs::write(foreign.join("precious.txt"), "mine").unwrap();
    site.script(
        "install.sh",
        &[
            "--prefix",
            foreign.to_str().unwrap(),
            "--user",
            USER,
            "--binary",
            site.a.to_str().unwrap(),
            "--no-systemd",
        ],
    )
    .expect(1)
    .says("refusing to take it over");
    assert_eq!(names_in(&foreign), ["precious.txt"]);
    assert_eq!(mode_owner(&foreign.join("precious.txt")).1, 0);

    // A prefix the service user could not reach (tempfile's 0700 directories, say).
    let hidden = site.dir.path().join("hidden");
    std::fs::create_dir(&hidden).unwrap();
    std::fs::set_permissions(&hidden, std::fs::Permissions::from_mode(0o700)).unwrap();
    site.script(
        "install.sh",
        &[
            "--prefix",
            hidden.join("opt/qs").to_str().unwrap(),
            "--user",
            USER,
            "--binary",
            site.a.to_str().unwrap(),
            "--no-systemd",
        ],
    )
    .expect(1)
    .says(&format!("{USER} cannot reach"))
    .says(&format!(
        "{} is not searchable by it (mode 700",
        hidden.display()
    ));
    assert_eq!(names_in(&hidden), Vec::<String>::new());

    site.script("install.sh", &["--prefix", "relative/dir", "--no-systemd"])
        .expect(1)
        .says("--prefix must be an absolute path");
}

/// upgrade.sh: check, back up, stop, swap, start, ready; then rollback.sh puts build A back.
#[test]
fn upgrade_swaps_the_binary_and_keeps_backups_and_rollback_restores_them() {
    if !as_root() {
        return;
    }
    let site = Site::running("upgrade");
    let old_pid = site.pid().unwrap();
    assert_eq!(site.running_build(), read(&site.a));

    let ran = site.upgrade(&site.b, 60).expect(0);
    eprintln!("{}", ran.all());
    for step in [
        "config check passed",
        "1/5",
        "2/5",
        "3/5",
        "4/5",
        "5/5",
        "ready",
        "Upgraded",
    ] {
        ran.says(step);
    }
    assert!(!alive(old_pid), "the old process is gone");
    assert_ne!(site.pid(), Some(old_pid));
    assert_eq!(site.running_build(), read(&site.b), "build B is running");
    assert_eq!(read(&site.path("bin/quantservice")), read(&site.b));
    assert_mode_owner(&site.path("bin/quantservice"), 0o750);
    assert_eq!(read(&site.path("bin/quantservice.bak")), read(&site.a));
    assert_mode_owner(&site.path("bin/quantservice.bak"), 0o750);
    assert_eq!(
        read(&site.path("config/app.yaml.bak")),
        read(&site.path("config/app.yaml"))
    );
    assert_mode_owner(&site.path("config/app.yaml.bak"), 0o640);
    assert_eq!(
        names_in(&site.path("bin")),
        ["quantservice", "quantservice.bak"]
    );
    assert_eq!(site.starts(), 2);
    site.ready().expect(0);

    // The manual rollback: build A again, the backups stay.
    let b_pid = site.pid().unwrap();
    let ran = site
        .script("rollback.sh", &["--prefix", site.prefix.to_str().unwrap()])
        .expect(0);
    for step in ["1/4", "2/4", "3/4", "4/4", "Rolled back"] {
        ran.says(step);
    }
    assert!(!alive(b_pid));
    assert_eq!(site.running_build(), read(&site.a), "build A is running");
    assert_eq!(read(&site.path("bin/quantservice")), read(&site.a));
    assert_mode_owner(&site.path("bin/quantservice"), 0o750);
    assert_mode_owner(&site.path("config/app.yaml"), 0o640);
    assert_eq!(read(&site.path("bin/quantservice.bak")), read(&site.a));
    site.ready().expect(0);
}

/// A new binary that cannot run, or a config the new binary refuses: the running service is
/// never stopped and nothing in the prefix changes.
#[test]
fn an_upgrade_the_config_check_refuses_changes_nothing() {
    if !as_root() {
        return;
    }
    let site = Site::running("refused");
    let pid = site.pid().unwrap();

    let garbage = site.dir.path().join("builds/garbage/quantservice");
    write_exec(&garbage, b"this is not a program\n");
    site.upgrade(&garbage, 60)
        .expect(1)
        .says("config check failed")
        .says("nothing was changed, the service was not stopped");

    // An edit the running daemon refuses (it goes on with the config it has), and so does the
    // new binary's check.
    let yaml = site
        .config_yaml()
        .replacen(&format!("port: {}", site.db.port), "port: 0", 1);
    std::fs::write(site.path("config/app.yaml"), &yaml).unwrap();
    site.upgrade(&site.b, 60)
        .expect(1)
        .says("app.clickhouse.port: must be 1..65535, got 0")
        .says("nothing was changed, the service was not stopped");

    assert_eq!(site.pid(), Some(pid), "the same process runs on");
    assert_eq!(site.starts(), 1, "never restarted");
    assert_eq!(site.running_build(), read(&site.a));
    assert_eq!(read(&site.path("bin/quantservice")), read(&site.a));
    assert_eq!(
        names_in(&site.path("bin")),
        ["quantservice"],
        "no backup, nothing staged"
    );
    assert_eq!(names_in(&site.path("config")), ["app.yaml"]);
    assert_eq!(
        std::fs::read_to_string(site.path("config/app.yaml")).unwrap(),
        yaml
    );
}

/// A build that passes the config check but dies at start is rolled back automatically: build A
/// runs again and is ready, and upgrade.sh says why and exits 2.
#[test]
fn a_binary_that_crashes_at_start_is_rolled_back() {
    if !as_root() {
        return;
    }
    let site = Site::running("crash");
    let crash = site.dir.path().join("builds/crash/quantservice");
    let wrapper = format!(
        "#!/bin/sh\n# Passes --check-config (and answers ready, --version) but dies at start.\n\
         for a in \"$@\"; do case \"$a\" in --check-config|ready|--version) exec {} \"$@\";; esac; done\n\
         echo 'crash-build: panicked at start' >&2\nexit 101\n",
        site.a.display()
    );
    write_exec(&crash, wrapper.as_bytes());

    // The dead service is noticed at once (is-active false twice), not after the 60 s timeout.
    let started = std::time::Instant::now();
    let ran = site.upgrade(&crash, 60).expect(2);
    let took = started.elapsed();
    eprintln!("{}", ran.all());
    assert!(
        took < std::time::Duration::from_secs(40),
        "the crash took {took:?} to notice"
    );
    ran.says("config check passed")
        .says("UPGRADE FAILED")
        .says("not ready: the service is not running")
        .says("Connection refused")
        .says("its last output")
        .says("    crash-build: panicked at start")
        .says("Rolled back")
        .says("is running again (ready)");
    assert!(site.console().contains("crash-build: panicked at start"));
    assert_eq!(site.starts(), 3, "A, the crashing build, A again");
    assert_eq!(site.running_build(), read(&site.a), "build A is running");
    assert_eq!(read(&site.path("bin/quantservice")), read(&site.a));
    assert_mode_owner(&site.path("bin/quantservice"), 0o750);
    assert_eq!(read(&site.path("bin/quantservice.bak")), read(&site.a));
    site.ready().expect(0);
}

/// A build that starts and keeps running but never becomes ready (here: it never opens its ops
/// endpoint) is rolled back when the timeout is over, and the reason says so.
#[test]
fn a_binary_that_never_becomes_ready_is_rolled_back_after_the_timeout() {
    if !as_root() {
        return;
    }
    let site = Site::running("hang");
    let hang = site.dir.path().join("builds/hang/quantservice");
    let wrapper = format!(
        "#!/bin/sh\n# Passes --check-config (and answers ready, --version), then hangs without serving.\n\
         for a in \"$@\"; do case \"$a\" in --check-config|ready|--version) exec {} \"$@\";; esac; done\n\
         exec sleep 600\n",
        site.a.display()
    );
    write_exec(&hang, wrapper.as_bytes());

    let ran = site.upgrade(&hang, 6).expect(2);
    eprintln!("{}", ran.all());
    ran.says("config check passed")
        .says("UPGRADE FAILED")
        .says("not ready within 6s")
        .says("Connection refused")
        .says("Rolled back")
        .says("is running again (ready)");
    assert_eq!(site.starts(), 3, "A, the hanging build, A again");
    assert_eq!(site.running_build(), read(&site.a), "build A is running");
    assert_eq!(read(&site.path("bin/quantservice")), read(&site.a));
    site.ready().expect(0);
}

/// The parts of the checkout scripts/package reads, copied to `dest`; the deployment guides
/// (written separately) are stand-ins where the checkout has none yet, unless `docs` is false.
fn package_tree(dest: &Path, docs: bool) -> PathBuf {
    std::fs::create_dir_all(dest.join("scripts")).unwrap();
    for rel in ["Cargo.toml", "README.md", "scripts/package"] {
        std::fs::copy(repo().join(rel), dest.join(rel)).unwrap();
    }
    for rel in ["config", "deploy"] {
        let ok = Command::new("cp")
            .arg("-R")
            .arg(repo().join(rel))
            .arg(dest.join(rel))
            .status()
            .unwrap();
        assert!(ok.success());
    }
    if docs {
        std::fs::create_dir_all(dest.join("docs")).unwrap();
        if repo().join("docs").is_dir() {
            let ok = Command::new("cp")
                .arg("-R")
                .arg(repo().join("docs/."))
                .arg(dest.join("docs"))
                .status()
                .unwrap();
            assert!(ok.success());
        }
        for guide in ["docs/deploy.md", "docs/deploy.zh-CN.md"] {
            if !dest.join(guide).exists() {
                std::fs::write(dest.join(guide), "# stand-in\n").unwrap();
            }
        }
    }
    dest.to_path_buf()
}

/// scripts/package --binary: the tarball's layout and checksum; a fresh install from the
/// unpacked tarball; an upgrade from the tarball; a tarball that fails its checksum is refused.
#[test]
fn a_packaged_tarball_installs_and_upgrades() {
    if !as_root() {
        return;
    }
    let site = Site::new("package");
    let version = env!("CARGO_PKG_VERSION");
    let name = format!("quantservice-{version}");
    let tarball = format!("{name}-linux-{}.tar.gz", std::env::consts::ARCH);
    let dist = site.dir.path().join("dist");

    // Without the guides: a clear error, no tarball.
    let bare = package_tree(&site.dir.path().join("bare"), false);
    let ran = run(
        Command::new(bare.join("scripts/package"))
            .arg("--binary")
            .arg(&site.b)
            .arg("--out")
            .arg(&dist),
        60,
    );
    let ran = ran.expect(1);
    ran.says("missing")
        .says("docs/deploy.zh-CN.md docs/deploy.md");
    assert!(!dist.join(&tarball).exists());

    let tree = package_tree(&site.dir.path().join("src"), true);
    let ran = run(
        Command::new(tree.join("scripts/package"))
            .arg("--binary")
            .arg(&site.b)
            .arg("--out")
            .arg(&dist),
        120,
    )
    .expect(0);
    ran.says(&tarball);
    assert_eq!(
        names_in(&dist),
        [tarball.clone(), format!("{tarball}.sha256")]
    );
    let sha = std::fs::read_to_string(dist.join(format!("{tarball}.sha256"))).unwrap();
    let (hash, file) = sha.trim_end().split_once("  ").unwrap();
    assert_eq!(file, tarball);
    assert!(
        hash.len() == 64 && hash.bytes().all(|c| c.is_ascii_hexdigit()),
        "{sha}"
    );
    let check = run(
        Command::new("sha256sum")
            .args(["-c", &format!("{tarball}.sha256")])
            .current_dir(&dist),
        30,
    );
    check.expect(0).says(&format!("{tarball}: OK"));

    // The layout: every entry under quantservice-<version>/, the files the deployment needs,
    // the guides and every other file of docs/, executables executable.
    let listing = run(
        Command::new("tar").arg("-tzvf").arg(dist.join(&tarball)),
        30,
    )
    .expect(0)
    .stdout;
    let mut files = BTreeMap::new();
    for line in listing.lines() {
        let cols: Vec<&str> = line.split_whitespace().collect();
        let (perms, owner, path) = (cols[0], cols[1], cols[cols.len() - 1]);
        assert_eq!(owner, "0/0", "{line}");
        let rel = path
            .strip_prefix(&format!("{name}/"))
            .unwrap_or_else(|| panic!("outside {name}/: {line}"));
        if !perms.starts_with('d') {
            files.insert(rel.to_string(), perms.to_string());
        }
    }
    let mut want: Vec<String> = [
        "bin/quantservice",
        "config/app.yaml",
        "README.md",
        "docs/deploy.md",
        "docs/deploy.zh-CN.md",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for dir in ["deploy", "deploy/supervisor"] {
        for f in names_in(&repo().join(dir)) {
            if repo().join(dir).join(&f).is_file() {
                want.push(format!("{dir}/{f}"));
            }
        }
    }
    for f in names_in(&tree.join("docs")) {
        want.push(format!("docs/{f}"));
    }
    want.sort();
    want.dedup();
    assert_eq!(files.keys().cloned().collect::<Vec<_>>(), want);
    for exe in [
        "bin/quantservice",
        "deploy/install.sh",
        "deploy/upgrade.sh",
        "deploy/rollback.sh",
        "deploy/supervisor/ctl.sh",
    ] {
        assert_eq!(files[exe], "-rwxr-xr-x", "{exe}");
    }
    assert_eq!(files["config/app.yaml"], "-rw-r--r--");

    // A fresh install from the unpacked tarball, without --binary.
    let unpacked = site.dir.path().join("unpacked");
    std::fs::create_dir(&unpacked).unwrap();
    run(
        Command::new("tar")
            .arg("-xzf")
            .arg(dist.join(&tarball))
            .arg("-C")
            .arg(&unpacked),
        60,
    )
    .expect(0);
    let top = unpacked.join(&name);
    assert_eq!(read(&top.join("bin/quantservice")), read(&site.b));
    let other = site.dir.path().join("opt/other");
    let mut cmd = Command::new(top.join("deploy/install.sh"));
    cmd.args([
        "--prefix",
        other.to_str().unwrap(),
        "--user",
        USER,
        "--no-systemd",
    ]);
    site.env(&mut cmd);
    run(&mut cmd, 120).expect(0);
    assert_eq!(read(&other.join("bin/quantservice")), read(&site.b));
    assert_eq!(
        read(&other.join("config/app.yaml")),
        read(&repo().join("config/app.yaml"))
    );
    assert_mode_owner(&other.join("config/app.yaml"), 0o640);

    // Build A installed and running, upgraded from the tarball to build B.
    site.install(&site.a).expect(0);
    site.configure();
    site.ctl("start").expect(0);
    site.ready().expect(0);
    let pid = site.pid().unwrap();

    // A tarball that does not match its checksum file is refused before anything happens.
    let bad = site.dir.path().join("bad");
    std::fs::create_dir(&bad).unwrap();
    std::fs::copy(dist.join(&tarball), bad.join(&tarball)).unwrap();
    std::fs::write(
        bad.join(format!("{tarball}.sha256")),
        format!("{}  {tarball}\n", "0".repeat(64)),
    )
    .unwrap();
    site.upgrade(&bad.join(&tarball), 60)
        .expect(1)
        .says("does not match its checksum");
    assert_eq!(site.pid(), Some(pid));

    site.upgrade(&dist.join(&tarball), 60)
        .expect(0)
        .says("checksum OK")
        .says("Upgraded");
    assert_eq!(site.running_build(), read(&site.b), "build B is running");
    assert_eq!(read(&site.path("bin/quantservice.bak")), read(&site.a));
    site.ready().expect(0);
}

/// The shutdown deadline of the defaults, which the service managers must wait out before they
/// kill: up to four supervisor stop phases of `operator.stop_timeout` (pair tasks, proxy health
/// checks, the live sink, the status services), the sockets' second each, and the writer's
/// `writer.shutdown_timeout`.
fn shutdown_deadline() -> Duration {
    let op = quantservice::config::OperatorConfig::default();
    let wr = quantservice::config::WriterConfig::default();
    op.stop_timeout * 4 + wr.shutdown_timeout + Duration::from_secs(10)
}

/// The value of `key=` in a unit or ini text (the last one, as both formats do).
fn setting<'a>(text: &'a str, key: &str) -> Option<&'a str> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix(key)?.trim_start().strip_prefix('='))
        .map(str::trim)
        .next_back()
}

/// The unit as install.sh writes it passes `systemd-analyze verify` without a word, its
/// exposure is at most 2.0, and it has the settings the seed asks for.
#[test]
fn the_systemd_unit_is_clean_and_hardened() {
    if !as_root() {
        return;
    }
    let analyze = ["/usr/bin/systemd-analyze", "/bin/systemd-analyze"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("systemd-analyze is needed (Debian package `systemd`; scripts/install-deps installs it)");
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let prefix = dir.path().join("opt/quantservice");
    // verify checks that ExecStart's binary exists and is executable.
    write_exec(
        &prefix.join("bin/quantservice"),
        &read(Path::new(env!("CARGO_BIN_EXE_quantservice"))),
    );
    let mut cmd = Command::new(repo().join("deploy/install.sh"));
    cmd.args([
        "--prefix",
        prefix.to_str().unwrap(),
        "--user",
        USER,
        "--print-unit",
    ]);
    let unit = run(&mut cmd, 30).expect(0).stdout;
    let file = dir.path().join("quantservice.service");
    std::fs::write(&file, &unit).unwrap();

    let verify = run(Command::new(analyze).arg("verify").arg(&file), 60);
    assert_eq!(verify.code, Some(0), "{}", verify.all());
    assert_eq!(
        (verify.stdout.trim(), verify.stderr.trim()),
        ("", ""),
        "verify is not clean"
    );

    let security = run(
        Command::new(analyze)
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&file),
        60,
    );
    let score: f64 = security
        .stdout
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for quantservice.service:")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .unwrap_or_else(|| panic!("no exposure level:\n{}", security.all()))
        .parse()
        .unwrap();
    eprintln!("systemd-analyze security: overall exposure {score}");
    assert!(score <= 2.0, "exposure {score} > 2.0:\n{}", security.stdout);

    let (unit_part, service) = unit.split_once("[Service]").unwrap();
    for (text, key, want) in [
        (unit_part, "StartLimitIntervalSec", "60"),
        (unit_part, "StartLimitBurst", "3"),
        (service, "Type", "notify"),
        (service, "NotifyAccess", "main"),
        (service, "WatchdogSec", "60"),
        (service, "User", USER),
        (service, "Group", USER),
        (service, "Restart", "always"),
        (service, "RestartSec", "10"),
        (service, "LimitNOFILE", "65536"),
        (service, "LimitNPROC", "4096"),
        (service, "StandardOutput", "journal"),
        (service, "StandardError", "journal"),
        (service, "SyslogIdentifier", "quantservice"),
        (service, "EnvironmentFile", "-/etc/quantservice/env"),
        (service, "KillSignal", "SIGTERM"),
        (service, "UMask", "0027"),
    ] {
        assert_eq!(setting(text, key), Some(want), "{key}");
    }
    let stop: u64 = setting(service, "TimeoutStopSec").unwrap().parse().unwrap();
    assert!(
        Duration::from_secs(stop) > shutdown_deadline(),
        "TimeoutStopSec={stop} is not above the shutdown deadline {:?}",
        shutdown_deadline()
    );
}

/// Stops supervisord (and with it the program) when the test ends, however it ends.
struct Supervisord {
    child: common::KillOnDrop,
    ctl: Vec<String>,
}

impl Supervisord {
    fn supervisorctl(&self, args: &[&str]) -> Ran {
        run(
            Command::new(&self.ctl[0]).args(&self.ctl[1..]).args(args),
            120,
        )
    }
}

impl Drop for Supervisord {
    fn drop(&mut self) {
        let _ = self.supervisorctl(&["shutdown"]);
        let deadline = Instant::now() + Duration::from_secs(120);
        while Instant::now() < deadline && matches!(self.child.try_wait(), Ok(None)) {
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// deploy/supervisor/quantservice.ini under Debian's supervisord (prefix and user substituted
/// as for the unit) and deploy/supervisor/ctl.sh as QS_SERVICE_CTL: it starts the program as the
/// service user, upgrade.sh goes through it, and stop/is-active work.
#[test]
fn supervisor_runs_the_program_and_upgrade_drives_it_through_ctl_sh() {
    if !as_root() {
        return;
    }
    let supervisord = ["/usr/bin/supervisord", "/usr/local/bin/supervisord"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect(
            "supervisord is needed (Debian package `supervisor`; scripts/install-deps installs it)",
        );
    let site = Site::new("supervisor");
    site.install(&site.a).expect(0);
    site.configure();

    let ini_text =
        std::fs::read_to_string(repo().join("deploy/supervisor/quantservice.ini")).unwrap();
    let stopwait: u64 = setting(&ini_text, "stopwaitsecs").unwrap().parse().unwrap();
    assert!(Duration::from_secs(stopwait) > shutdown_deadline());
    assert_eq!(setting(&ini_text, "stopsignal"), Some("TERM"));
    assert_eq!(setting(&ini_text, "user"), Some("quantsvc"));
    let p = site.prefix.display().to_string();
    let ini = ini_text
        .replace("/opt/quantservice", &p)
        .replace("user=quantsvc", &format!("user={USER}"))
        .replace(
            "environment=QS_CONFIG_PATH=\"",
            &format!("environment=QS_CLICKHOUSE_PASSWORD=\"{PW_PASSWORD}\",QS_CONFIG_PATH=\""),
        );
    assert!(ini.contains(&format!("command={p}/bin/quantservice\n")));
    let sup = site.dir.path().join("supervisor");
    std::fs::create_dir(&sup).unwrap();
    std::fs::write(sup.join("quantservice.ini"), ini).unwrap();
    let s = sup.display();
    let conf = sup.join("supervisord.conf");
    std::fs::write(
        &conf,
        format!(
            "[unix_http_server]\nfile={s}/supervisor.sock\nchmod=0700\n\n\
             [supervisord]\nlogfile={s}/supervisord.log\npidfile={s}/supervisord.pid\n\
             childlogdir={s}\nuser=root\n\n\
             [rpcinterface:supervisor]\n\
             supervisor.rpcinterface_factory = supervisor.rpcinterface:make_main_rpcinterface\n\n\
             [supervisorctl]\nserverurl=unix://{s}/supervisor.sock\n\n\
             [include]\nfiles = {s}/quantservice.ini\n"
        ),
    )
    .unwrap();
    let sctl = format!("supervisorctl -c {}", conf.display());
    let daemon = Supervisord {
        child: common::KillOnDrop(
            Command::new(supervisord)
                .arg("-n")
                .arg("-c")
                .arg(&conf)
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(sup.join("supervisord.stderr")).unwrap())
                .spawn()
                .unwrap(),
        ),
        ctl: sctl.split(' ').map(String::from).collect(),
    };
    let ctl_sh = |action: &str| {
        let mut cmd = Command::new(repo().join("deploy/supervisor/ctl.sh"));
        cmd.args([action, SERVICE]).env("QS_SUPERVISORCTL", &sctl);
        run(&mut cmd, 120)
    };
    // autostart: the program comes up on its own (RUNNING after startsecs).
    site.ready().expect(0);
    let deadline = Instant::now() + Duration::from_secs(60);
    while ctl_sh("is-active").code != Some(0) {
        assert!(Instant::now() < deadline, "not RUNNING within 60 s");
        std::thread::sleep(Duration::from_millis(200));
    }
    ctl_sh("is-active").expect(0).says("active");
    let pid_of = || -> u32 {
        daemon
            .supervisorctl(&["pid", SERVICE])
            .stdout
            .trim()
            .parse()
            .unwrap()
    };
    let pid = pid_of();
    assert_eq!(read(Path::new(&format!("/proc/{pid}/exe"))), read(&site.a));
    assert_eq!(
        std::fs::metadata(format!("/proc/{pid}")).unwrap().uid(),
        id_of("-u"),
        "runs as {USER}"
    );

    let mut cmd = Command::new(repo().join("deploy/upgrade.sh"));
    cmd.args(["--prefix", &p, "--timeout", "60"]).arg(&site.b);
    site.env(&mut cmd);
    cmd.env("QS_SERVICE_CTL", repo().join("deploy/supervisor/ctl.sh"))
        .env("QS_SUPERVISORCTL", &sctl);
    run(&mut cmd, 240).expect(0).says("Upgraded");
    let new_pid = pid_of();
    assert_ne!(new_pid, pid);
    assert_eq!(
        read(Path::new(&format!("/proc/{new_pid}/exe"))),
        read(&site.b)
    );
    site.ready().expect(0);

    ctl_sh("stop").expect(0);
    ctl_sh("is-active").expect(3).says("stopped");
    ctl_sh("stop").expect(0); // stopping a stopped program is fine, as with systemctl
    assert!(site.path("logs/supervisor-stderr.log").is_file());
    drop(daemon);
}

/// With the ops endpoint disabled (`app.http.listen: ""`, `ready` exits 3) upgrade.sh falls back
/// to the service staying active for a settle period: a good build passes, a build that dies
/// at start is caught by it and rolled back.
#[test]
fn without_the_ops_endpoint_the_service_must_stay_active() {
    if !as_root() {
        return;
    }
    let site = Site::new("settle");
    site.install(&site.a).expect(0);
    let yaml = site.config_yaml().replace(
        &format!("listen: \"127.0.0.1:{}\"", site.port),
        "listen: \"\"",
    );
    std::fs::write(site.path("config/app.yaml"), &yaml).unwrap();
    let readies = |n: usize| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while site.console().matches("Ready; reconciling").count() < n {
            assert!(
                Instant::now() < deadline,
                "no Ready #{n}:\n{}",
                site.console()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    };
    site.ctl("start").expect(0);
    readies(1);

    site.upgrade(&site.b, 60)
        .expect(0)
        .says("the ops endpoint is disabled")
        .says("active for 5s")
        .says("Upgraded");
    assert_eq!(site.running_build(), read(&site.b));
    readies(2);

    let crash = site.dir.path().join("builds/crash/quantservice");
    write_exec(
        &crash,
        format!(
            "#!/bin/sh\nfor a in \"$@\"; do case \"$a\" in --check-config|ready|--version) exec {} \"$@\";; esac; done\nexit 101\n",
            site.b.display()
        )
        .as_bytes(),
    );
    site.upgrade(&crash, 60)
        .expect(2)
        .says("the service stopped running within")
        .says("is running again");
    assert_eq!(site.running_build(), read(&site.b), "build B is back");
    readies(3);
}
