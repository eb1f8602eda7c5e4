//! Log output: simplelog's `WriteLogger` to stderr or to a file opened for
//! appending, which `reopen` replaces after SIGHUP (log rotation).
//!
//! In scope: where log lines go and how they look. Out of scope: what is
//! logged and at which level (each module decides).

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use log::LevelFilter;
use simplelog::{ConfigBuilder, WriteLogger};

/// The open log file; cloned into the logger and kept by the loop.
#[derive(Clone)]
pub struct LogFile {
    path: PathBuf,
    file: Arc<Mutex<File>>,
}

impl LogFile {
    fn open(path: &Path) -> io::Result<File> {
        OpenOptions::new().create(true).append(true).open(path)
    }

    /// Opens the path again: after rotation it names a new file.
    pub fn reopen(&self) -> io::Result<()> {
        let new = LogFile::open(&self.path)?;
        if let Ok(mut f) = self.file.lock() {
            *f = new;
        }
        Ok(())
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Write for LogFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self.file.lock() {
            Ok(mut f) => f.write(buf),
            Err(_) => Ok(buf.len()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self.file.lock() {
            Ok(mut f) => f.flush(),
            Err(_) => Ok(()),
        }
    }
}

/// Installs the logger; returns the file handle when logging to a file.
pub fn init(path: Option<&Path>, debug: bool) -> io::Result<Option<LogFile>> {
    let level = if debug {
        LevelFilter::Debug
    } else {
        LevelFilter::Info
    };
    let mut builder = ConfigBuilder::new();
    builder
        .set_target_level(LevelFilter::Off)
        .set_thread_level(LevelFilter::Off)
        .set_location_level(LevelFilter::Off)
        // ureq narrates every request at debug level; ours say enough.
        .add_filter_ignore_str("ureq");
    let _ = builder.set_time_format_rfc3339();
    let config = builder.build();
    let file = match path {
        Some(path) => {
            let log = LogFile {
                path: path.to_path_buf(),
                file: Arc::new(Mutex::new(LogFile::open(path)?)),
            };
            WriteLogger::init(level, config, log.clone())
                .map_err(|e| io::Error::other(e.to_string()))?;
            Some(log)
        }
        None => {
            WriteLogger::init(level, config, io::stderr())
                .map_err(|e| io::Error::other(e.to_string()))?;
            None
        }
    };
    Ok(file)
}
