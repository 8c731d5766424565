//! Build metadata for `quantservice --version`: the git commit the binary was built from and
//! the build date, passed to the crate as `QS_GIT_COMMIT` and `QS_BUILD_DATE`.
//!
//! - `QS_GIT_COMMIT`: `git rev-parse --short HEAD`, with `-dirty` when a tracked file the binary
//!   is built from (see `SOURCES`) differs from that commit; `unknown` without git (a source
//!   tarball, no `git` on the PATH).
//! - `QS_BUILD_DATE`: UTC, `YYYY-MM-DDTHH:MM:SSZ`, from `$SOURCE_DATE_EPOCH` when it is set
//!   (reproducible builds), else the time this script ran.
//!
//! Every rerun of a build script recompiles the whole package (lib, bins and tests), so the
//! script reruns only when its answer can change: a new commit or branch (`HEAD`, the branch's
//! ref, `packed-refs`), a change to the sources in `SOURCES` (which recompiles the package
//! anyway), or `$SOURCE_DATE_EPOCH`. Editing a test or the README does not rerun it.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

/// What the binary is built from: watched for reruns and checked for `-dirty`.
pub const SOURCES: &[&str] = &[
    "src",
    "crates",
    "sql",
    "build.rs",
    "Cargo.toml",
    "Cargo.lock",
];

fn main() {
    let root = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_else(|| ".".into()));
    for s in SOURCES {
        println!("cargo:rerun-if-changed={s}");
    }
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let commit = git_commit(&root).unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=QS_GIT_COMMIT={commit}");
    println!("cargo:rustc-env=QS_BUILD_DATE={}", build_date());
}

/// Runs git in `root`; its trimmed stdout if it succeeded. Never writes the index
/// (`--no-optional-locks`): a write would make the next build see a change and rerun this.
fn git(root: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        // Set by git for hooks (a hook running cargo): they would point at another repository.
        .env_remove("GIT_DIR")
        .env_remove("GIT_WORK_TREE")
        .env_remove("GIT_INDEX_FILE")
        .arg("--no-optional-locks")
        .arg("-C")
        .arg(root)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    Some(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

pub fn git_commit(root: &Path) -> Option<String> {
    // Only a repository whose top is this package counts: a tarball unpacked inside some other
    // repository must not report that repository's commit.
    let top = git(root, &["rev-parse", "--show-toplevel"])?;
    let same = |a: &Path, b: &Path| match (a.canonicalize(), b.canonicalize()) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    };
    if !same(Path::new(&top), root) {
        return None;
    }
    let hash = git(root, &["rev-parse", "--short", "HEAD"])?;
    if hash.is_empty() {
        return None;
    }
    watch_git_files(root);
    let mut args = vec!["status", "--porcelain", "--untracked-files=no", "--"];
    args.extend_from_slice(SOURCES);
    let dirty = match git(root, &args) {
        Some(s) => !s.is_empty(),
        None => true,
    };
    Some(if dirty { format!("{hash}-dirty") } else { hash })
}

/// Reruns on a new commit, a checkout or a ref packed by `git gc`. Only files that exist are
/// named: cargo reruns a script on every build while a path it watches is missing.
fn watch_git_files(root: &Path) {
    let abs = |p: String| {
        let p = PathBuf::from(p);
        if p.is_absolute() {
            p
        } else {
            root.join(p)
        }
    };
    let (Some(git_dir), Some(common)) = (
        git(root, &["rev-parse", "--git-dir"]).map(abs),
        git(root, &["rev-parse", "--git-common-dir"]).map(abs),
    ) else {
        return;
    };
    let mut files = vec![git_dir.join("HEAD"), common.join("packed-refs")];
    if let Some(r) = git(root, &["symbolic-ref", "-q", "HEAD"]) {
        // A worktree's own refs (none for branches) live in its git dir, the branches in the
        // common dir.
        files.push(git_dir.join(&r));
        files.push(common.join(&r));
    }
    for f in files.iter().filter(|f| f.is_file()) {
        println!("cargo:rerun-if-changed={}", f.display());
    }
}

/// `$SOURCE_DATE_EPOCH` (seconds) if set, else now; as `YYYY-MM-DDTHH:MM:SSZ`.
fn build_date() -> String {
    let secs = match std::env::var("SOURCE_DATE_EPOCH") {
        Ok(v) => match v.trim().parse::<i64>() {
            Ok(s) => s,
            Err(_) => panic!("SOURCE_DATE_EPOCH must be a number of seconds, got {v:?}"),
        },
        Err(_) => SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0),
    };
    format_utc(secs)
}

/// Seconds since the Unix epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn format_utc(secs: i64) -> String {
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to (year, month, day) in the proleptic Gregorian calendar (Howard
/// Hinnant's `civil_from_days`).
fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}
