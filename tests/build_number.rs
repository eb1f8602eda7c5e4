//! Where the build number comes from (build.rs): `--version` and `BILD` show the same
//! one, and it is the commit date of the tree the binary was built from, as two-digit
//! year and day of the year (UTC), which git itself formats here.

use crate::util::*;
use std::process::Command;

/// The build number `--version` prints: "sockproxyd <version> (build <n>)".
fn version_build() -> String {
    let out = run_to_exit(&["--version"], dur(10_000));
    assert!(out.status.success(), "--version: {:?}", out.status);
    let line = String::from_utf8(out.stdout).expect("utf-8");
    let line = line.trim_end();
    let rest = line
        .strip_prefix(&format!("sockproxyd {} (build ", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("--version said {line:?}"));
    rest.strip_suffix(')')
        .unwrap_or_else(|| panic!("--version said {line:?}"))
        .to_string()
}

/// HEAD's commit date as `%y%j` in UTC, or why it cannot be known here.
fn git_build_number() -> Result<String, String> {
    if std::env::var_os("SOCKPROXYD_BIN").is_some_and(|v| !v.is_empty()) {
        return Err("SOCKPROXYD_BIN is set: that binary may come from another commit".into());
    }
    for var in ["SOCKPROXYD_BUILD", "SOURCE_DATE_EPOCH"] {
        if std::env::var_os(var).is_some_and(|v| !v.is_empty()) {
            return Err(format!("{var} is set: it, not git, gave the build number"));
        }
    }
    let out = Command::new("git")
        .arg("-C")
        .arg(top(""))
        .args(["log", "-1", "--date=format-local:%y%j", "--format=%cd"])
        .env("TZ", "UTC")
        .output()
        .map_err(|e| format!("cannot run git: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "git log failed (not a git checkout?): {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
}

#[test]
fn version_and_bild_show_the_commit_date() {
    let build = version_build();
    assert!(
        build.len() == 5 && build.bytes().all(|b| b.is_ascii_digit()),
        "build number {build:?} is not YYDDD"
    );
    let d = Daemon::start("http://127.0.0.1:9");
    let (mut c, _) = d.client();
    c.send(b"BILD\n");
    assert_eq!(c.line(), format!("OK {build}"), "BILD and --version differ");
    match git_build_number() {
        Ok(want) => assert_eq!(build, want, "not HEAD's commit date (git log -1)"),
        Err(why) => eprintln!("build number not checked against git: {why}"),
    }
}
