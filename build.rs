//! Build script: the build number that `BILD` and `--version` show, from the build
//! itself, in the original's form: the commit date's two-digit year and day of the
//! year (2026-11-27 -> `26331`). The same commit always gives the same number.
//!
//! Taken from, in order: `SOCKPROXYD_BUILD` (used as it is: one word of letters,
//! digits, `.`, `-`, `_`), `SOURCE_DATE_EPOCH` (reproducible-builds convention; the
//! OpenWrt build system sets it to the source's date, and a feed build has no `.git`),
//! `git log -1 --format=%ct` of this source tree, else `FALLBACK` with a warning.
//! The result reaches the crate as the environment variable `SOCKPROXYD_BUILD_NUMBER`
//! (`protocol::BUILD`).
//!
//! `src/protocol.rs` includes this file in its unit tests, for `build_number`.

use std::path::{Path, PathBuf};
use std::process::Command;

/// When nothing tells the date: a tarball without `SOURCE_DATE_EPOCH`.
const FALLBACK: &str = "00000";

/// Unix time `secs` (UTC) as two-digit year and day of the year (001-366), or `None`
/// before 1970.
pub fn build_number(secs: i64) -> Option<String> {
    if secs < 0 {
        return None;
    }
    let mut days = secs / 86_400;
    let mut year: i64 = 1970;
    loop {
        let len = if is_leap(year) { 366 } else { 365 };
        if days < len {
            break;
        }
        days -= len;
        year += 1;
    }
    Some(format!("{:02}{:03}", year % 100, days + 1))
}

fn is_leap(year: i64) -> bool {
    (year % 4 == 0 && year % 100 != 0) || year % 400 == 0
}

/// A build number given as is must stay one word on the wire (`OK <build>`).
fn valid_word(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 32
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

fn git(dir: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new("git")
        .arg("-C")
        .arg(dir)
        .args(args)
        .output()
        .ok()?;
    if !out.status.success() {
        return None;
    }
    let s = String::from_utf8(out.stdout).ok()?;
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

/// The commit time of HEAD, if `dir` is the top of a git work tree (not a tarball
/// unpacked inside some other repository, such as an OpenWrt buildroot); also tells
/// Cargo which git files to watch so that a new commit reruns this script.
fn git_commit_time(dir: &Path) -> Option<i64> {
    let top = PathBuf::from(git(dir, &["rev-parse", "--show-toplevel"])?);
    if top.canonicalize().ok()? != dir.canonicalize().ok()? {
        return None;
    }
    // HEAD names the branch (or the commit, when detached); the branch's ref file
    // changes with each commit, or packed-refs once git has packed it.
    // `--git-path` answers relative to `dir`, or absolute (a worktree's shared refs).
    let path = |p: &str| {
        git(dir, &["rev-parse", "--git-path", p]).map(|r| dir.join(r).display().to_string())
    };
    if let Some(head) = path("HEAD") {
        println!("cargo:rerun-if-changed={head}");
    }
    if let Some(branch) = git(dir, &["symbolic-ref", "-q", "HEAD"]) {
        match path(&branch) {
            Some(r) if Path::new(&r).exists() => println!("cargo:rerun-if-changed={r}"),
            _ => {
                if let Some(packed) = path("packed-refs") {
                    println!("cargo:rerun-if-changed={packed}");
                }
            }
        }
    }
    git(dir, &["log", "-1", "--format=%ct"])?.parse().ok()
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=SOCKPROXYD_BUILD");
    println!("cargo:rerun-if-env-changed=SOURCE_DATE_EPOCH");
    let given = std::env::var("SOCKPROXYD_BUILD")
        .ok()
        .filter(|s| !s.is_empty());
    let number = if let Some(b) = given {
        if !valid_word(&b) {
            panic!("SOCKPROXYD_BUILD={b:?}: one word of letters, digits, '.', '-', '_'");
        }
        b
    } else if let Some(epoch) = std::env::var("SOURCE_DATE_EPOCH")
        .ok()
        .filter(|s| !s.is_empty())
    {
        epoch
            .trim()
            .parse()
            .ok()
            .and_then(build_number)
            .unwrap_or_else(|| panic!("SOURCE_DATE_EPOCH={epoch:?} is not a Unix time"))
    } else {
        let dir = PathBuf::from(std::env::var_os("CARGO_MANIFEST_DIR").unwrap_or_default());
        match git_commit_time(&dir).and_then(build_number) {
            Some(n) => n,
            None => {
                println!(
                    "cargo:warning=no SOCKPROXYD_BUILD, SOURCE_DATE_EPOCH or git commit: build number {FALLBACK}"
                );
                FALLBACK.to_string()
            }
        }
    };
    println!("cargo:rustc-env=SOCKPROXYD_BUILD_NUMBER={number}");
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Dates below are midnight UTC, as `date -u -d <date> +%s` gives them.
    const DAY: i64 = 86_400;

    #[test]
    fn build_number_is_year_and_day_of_year() {
        assert_eq!(build_number(0).as_deref(), Some("70001"));
        // 2026-11-27 (the original form's example): 1795737600 = 2026-11-27 00:00 UTC.
        assert_eq!(build_number(1_795_737_600).as_deref(), Some("26331"));
        assert_eq!(
            build_number(1_795_737_600 + DAY - 1).as_deref(),
            Some("26331")
        );
        assert_eq!(build_number(1_795_737_600 + DAY).as_deref(), Some("26332"));
        // 2000 is a leap year (divisible by 400): Dec 31 is day 366.
        // 978220800 = 2000-12-31 00:00 UTC; 978307200 = 2001-01-01.
        assert_eq!(build_number(978_220_800).as_deref(), Some("00366"));
        assert_eq!(build_number(978_307_200).as_deref(), Some("01001"));
        // 2023 is not: Dec 31 is day 365. 1703980800 = 2023-12-31 00:00 UTC.
        assert_eq!(build_number(1_703_980_800).as_deref(), Some("23365"));
        // 2024 is: Feb 29 is day 60, Mar 1 day 61, Dec 31 day 366.
        // 1709164800 = 2024-02-29; 1735603200 = 2024-12-31.
        assert_eq!(build_number(1_709_164_800).as_deref(), Some("24060"));
        assert_eq!(build_number(1_709_164_800 + DAY).as_deref(), Some("24061"));
        assert_eq!(
            build_number(1_735_603_200 + DAY - 1).as_deref(),
            Some("24366")
        );
        assert_eq!(build_number(1_735_603_200 + DAY).as_deref(), Some("25001"));
        // 2100 is not a leap year (divisible by 100, not 400): Dec 31 is day 365.
        // 4133894400 = 2100-12-31 00:00 UTC.
        assert_eq!(build_number(4_133_894_400).as_deref(), Some("00365"));
        assert_eq!(build_number(-1), None);
    }

    #[test]
    fn given_build_numbers_must_be_one_word() {
        for ok in ["26331", "26331-dirty", "1.2_a"] {
            assert!(valid_word(ok), "{ok}");
        }
        for bad in ["", "a b", "x\ny", "é", &"9".repeat(33)] {
            assert!(!valid_word(bad), "{bad:?}");
        }
    }
}
