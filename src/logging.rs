//! Log output: simplelog's `WriteLogger` writing to a `Log`, stderr or a
//! file opened for appending. SIGHUP reopens the file (log rotation); a
//! reload may move the log to another file or to stderr (`switch`) and turn
//! debug lines on or off (`set_debug`).
//!
//! In scope: where log lines go, how they look, and the level; the lines
//! that say the log moved. Out of scope: what else is logged and at which
//! level (each module decides), when to switch (the loop's reload).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::{LevelFilter, info, warn};
use simplelog::{ConfigBuilder, WriteLogger};

use crate::protocol::OneLine;

/// Where log lines go.
enum Sink {
    Stderr,
    File { path: PathBuf, file: File },
}

impl Sink {
    /// `None`: stderr. A file is created if need be and appended to.
    fn open(path: Option<&Path>) -> io::Result<Sink> {
        Ok(match path {
            None => Sink::Stderr,
            Some(path) => Sink::File {
                path: path.to_path_buf(),
                file: OpenOptions::new().create(true).append(true).open(path)?,
            },
        })
    }

    fn path(&self) -> Option<&Path> {
        match self {
            Sink::Stderr => None,
            Sink::File { path, .. } => Some(path),
        }
    }
}

/// A destination opened by `Log::prepare`, not yet written to: a reload
/// opens the new log file before it changes anything, and switches to it
/// only once nothing else can fail.
pub struct Prepared(Sink);

impl Prepared {
    pub fn path(&self) -> Option<&Path> {
        self.0.path()
    }
}

/// The log's destination; cloned into the logger and kept by the loop.
#[derive(Clone)]
pub struct Log {
    sink: Arc<Mutex<Sink>>,
}

impl Log {
    /// The file logged to, `None` for stderr.
    pub fn path(&self) -> Option<PathBuf> {
        let sink = self.sink.lock().ok()?;
        sink.path().map(Path::to_path_buf)
    }

    /// Opens the log file again: after rotation its path names a new file.
    /// `Ok(None)` when logging to stderr (nothing to reopen); on error the
    /// old file stays in use.
    pub fn reopen(&self) -> io::Result<Option<PathBuf>> {
        let Some(path) = self.path() else {
            return Ok(None);
        };
        self.switch(Log::prepare(Some(&path))?);
        Ok(Some(path))
    }

    /// Opens `path` (`None`: stderr) for a later `switch`.
    pub fn prepare(path: Option<&Path>) -> io::Result<Prepared> {
        Sink::open(path).map(Prepared)
    }

    /// Lines from now on go to `to`; the old file is closed.
    pub fn switch(&self, to: Prepared) {
        if let Ok(mut sink) = self.sink.lock() {
            *sink = to.0;
        }
    }

    /// For a reload: opens the log it asks for. `Ok(None)` when that is the
    /// file in use and it cannot be opened again (said in the log: lines
    /// keep going to the open file, as a failed rotation always did); `Err`
    /// (the reason) when another one cannot be opened.
    pub fn prepare_reload(&self, path: Option<&Path>) -> Result<Option<Prepared>, String> {
        match Log::prepare(path) {
            Ok(to) => Ok(Some(to)),
            Err(e) if path == self.path().as_deref() => {
                warn!("SIGHUP: cannot reopen {}: {e}", Shown(path));
                Ok(None)
            }
            Err(e) => Err(format!("cannot open log file {}: {e}", Shown(path))),
        }
    }

    /// `switch`, saying so: the old file's last line names the new
    /// destination, the new one's first the old; the same file says it was
    /// reopened (rotation).
    pub fn switch_logged(&self, to: Prepared) {
        let old = self.path();
        let new = to.path().map(Path::to_path_buf);
        if old == new {
            self.switch(to);
            if let Some(path) = new {
                info!("SIGHUP: log file {} reopened", Shown(Some(&path)));
            }
            return;
        }
        info!("SIGHUP: the log continues in {}", Shown(new.as_deref()));
        self.switch(to);
        info!("SIGHUP: the log continued from {}", Shown(old.as_deref()));
    }

    /// `reopen`, saying so (SIGHUP when the configuration is not reloaded).
    pub fn reopen_logged(&self) {
        match self.reopen() {
            Ok(Some(path)) => info!("SIGHUP: log file {} reopened", Shown(Some(&path))),
            Ok(None) => {}
            Err(e) => warn!(
                "SIGHUP: cannot reopen {}: {e}",
                Shown(self.path().as_deref())
            ),
        }
    }
}

/// A log path on one line, or `stderr`.
struct Shown<'a>(Option<&'a Path>);

impl std::fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            Some(p) => write!(f, "{}", OneLine(&p.display().to_string())),
            None => write!(f, "stderr"),
        }
    }
}

impl Write for Log {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.sink.lock() {
            Ok(mut sink) => match &mut *sink {
                Sink::Stderr => io::stderr().write(buf),
                Sink::File { file, .. } => file.write(buf),
            },
            Err(_) => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.sink.lock() {
            Ok(mut sink) => match &mut *sink {
                Sink::Stderr => io::stderr().flush(),
                Sink::File { file, .. } => file.flush(),
            },
            Err(_) => Ok(()),
        }
    }
}

fn level(debug: bool) -> LevelFilter {
    if debug {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    }
}

/// Debug lines on or off from now on.
pub fn set_debug(debug: bool) {
    // The logger itself passes everything up to Debug (see `init`): the
    // `log` crate's global maximum is the one filter that can change.
    log::set_max_level(level(debug));
}

/// Installs the logger, writing to `path` (`None`: stderr); returns the
/// handle a reload switches.
pub fn init(path: Option<&Path>, debug: bool) -> io::Result<Log> {
    let mut builder = ConfigBuilder::new();
    builder
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        // ureq narrates every request at debug level; ours say enough.
        .add_filter_ignore_str("ureq");
    let _ = builder.set_time_format_rfc3339();
    let config = builder.build();
    let log = Log {
        sink: Arc::new(Mutex::new(Sink::open(path)?)),
    };
    // The most a reload may ask for; `set_debug` lowers it.
    WriteLogger::init(LevelFilter::Debug, config, log.clone())
        .map_err(|e| io::Error::other(e.to_string()))?;
    set_debug(debug);
    Ok(log)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("sockproxyd-logging-{}", std::process::id()));
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(name);
        let _ = std::fs::remove_file(&path);
        path
    }

    fn text(path: &Path) -> String {
        std::fs::read_to_string(path).unwrap_or_default()
    }

    #[test]
    fn switch_reopen_and_stderr() {
        let (a, b) = (temp("a.log"), temp("b.log"));
        let mut log = Log {
            sink: Arc::new(Mutex::new(Sink::open(Some(&a)).expect("open a"))),
        };
        log.write_all(b"one\n").expect("write");
        assert_eq!(log.path().as_deref(), Some(a.as_path()));
        // A path that cannot be opened: nothing to switch to.
        assert!(Log::prepare(Some(Path::new("/nonexistent/dir/x.log"))).is_err());
        let to = Log::prepare(Some(&b)).expect("open b");
        assert_eq!(to.path(), Some(b.as_path()));
        log.write_all(b"two\n").expect("write");
        log.switch(to);
        log.write_all(b"three\n").expect("write");
        assert_eq!(
            (text(&a), text(&b)),
            ("one\ntwo\n".into(), "three\n".into())
        );
        // Rotation: the path names a new file after reopening.
        let rotated = temp("b.log.1");
        std::fs::rename(&b, &rotated).expect("rotate");
        assert_eq!(log.reopen().expect("reopen"), Some(b.clone()));
        log.write_all(b"four\n").expect("write");
        assert_eq!(
            (text(&rotated), text(&b)),
            ("three\n".into(), "four\n".into())
        );
        log.switch(Log::prepare(None).expect("stderr"));
        assert_eq!(log.path(), None);
        assert_eq!(log.reopen().expect("nothing to reopen"), None);
        let _ = std::fs::remove_file(&a);
        let _ = std::fs::remove_file(&b);
        let _ = std::fs::remove_file(&rotated);
    }
}
