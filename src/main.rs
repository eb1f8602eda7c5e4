//! sockproxyd: a socket proxy for Vera and openLuup plugins, a drop-in
//! replacement for toggledbits' Lua sockproxyd (see PROTOCOL.md).
//!
//! `main` only orders the start: configuration, logging, the descriptor
//! limit (raised, and `max_conns` sized to it once the listeners are bound),
//! binding, then the event loop, which keeps the command line to read again
//! on SIGHUP; every failure on the way becomes one line and an exit code.

use std::ffi::OsString;
use std::process::ExitCode;

use log::{error, info, warn};
use sockproxyd::config::{self, ConfigError, Parsed};
use sockproxyd::event_loop::{self, Restart};
use sockproxyd::limits::{self, Budget};
use sockproxyd::{listen, logging, protocol};

fn main() -> ExitCode {
    ExitCode::from(run())
}

fn run() -> u8 {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    let mut config = match config::parse_args(args.iter().cloned()) {
        Ok(Parsed::Run(config)) => *config,
        Ok(Parsed::Help) => {
            println!("{}", config::USAGE);
            return 0;
        }
        Ok(Parsed::Version) => {
            println!(
                "sockproxyd {} (build {})",
                env!("CARGO_PKG_VERSION"),
                protocol::BUILD
            );
            return 0;
        }
        Err(e) => {
            eprintln!("sockproxyd: {e}");
            if let ConfigError::Usage(_) = e {
                eprintln!("{}", config::USAGE);
            }
            return e.exit_code();
        }
    };
    let log = match logging::init(config.log.as_deref(), config.debug) {
        Ok(log) => log,
        Err(e) => {
            let path = config.log.as_deref().map(|p| p.display().to_string());
            eprintln!(
                "sockproxyd: cannot open log file {}: {e}",
                path.unwrap_or_default()
            );
            return 1;
        }
    };
    for w in &config.warnings {
        warn!("{w}");
    }
    let nofile = raise_nofile();
    // PROTOCOL.md "Listening": one clear line on stderr (and in the log
    // file, if there is one) before the daemon reports itself ready.
    let fail = |msg: &str| {
        if log.path().is_some() {
            eprintln!("sockproxyd: {msg}");
        }
        error!("{msg}");
        1
    };
    let listeners = match listen::bind(&config) {
        Ok(l) => l,
        Err(msg) => return fail(&msg),
    };
    let budget = nofile.map(|soft| Budget::measure(soft, listeners.len()));
    if let Some(budget) = &budget {
        let (fit, warning) = budget.max_conns(config.max_conns, listeners.len());
        if let Some(w) = warning {
            warn!("{w}");
        }
        config.max_conns = fit;
    }
    if let Some(w) = config.open_relay_warning() {
        warn!("{w}");
    }
    let restart = Restart { args, budget };
    match event_loop::run(config, listeners, log.clone(), restart) {
        Ok(()) => 0,
        Err(e) => fail(&format!("event loop failed: {e}")),
    }
}

/// Raises the descriptor limit to the hard one and says so; the soft limit
/// in force, `None` if it cannot be read.
fn raise_nofile() -> Option<u64> {
    match limits::raise_nofile() {
        Ok((n, None)) if n.soft > n.was => {
            info!(
                "descriptors: soft limit raised from {} to {} (hard limit {})",
                n.was, n.soft, n.hard
            );
            Some(n.soft)
        }
        Ok((n, None)) => {
            info!("descriptors: limit {} (hard limit {})", n.soft, n.hard);
            Some(n.soft)
        }
        Ok((n, Some(e))) => {
            warn!(
                "descriptors: cannot raise the soft limit {} to the hard limit {}: {e}",
                n.was, n.hard
            );
            Some(n.soft)
        }
        Err(e) => {
            warn!("descriptors: cannot read the limit: {e}");
            None
        }
    }
}
