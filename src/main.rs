//! sockproxyd: a socket proxy for Vera and openLuup plugins, a drop-in
//! replacement for toggledbits' Lua sockproxyd (see PROTOCOL.md).
//!
//! `main` only orders the start: configuration, logging, binding, then the
//! event loop; every failure on the way becomes one line and an exit code.

use std::process::ExitCode;

use log::{error, warn};
use sockproxyd::config::{self, ConfigError, Parsed};
use sockproxyd::{event_loop, logging, protocol};

fn main() -> ExitCode {
    ExitCode::from(run())
}

fn run() -> u8 {
    let config = match config::parse_args(std::env::args_os().skip(1)) {
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
    // PROTOCOL.md "Listening": one clear line on stderr (and in the log
    // file, if there is one) before the daemon reports itself ready.
    let fail = |msg: &str| {
        if log.is_some() {
            eprintln!("sockproxyd: {msg}");
        }
        error!("{msg}");
        1
    };
    let listeners = match event_loop::bind(&config) {
        Ok(l) => l,
        Err(msg) => return fail(&msg),
    };
    if let Some(w) = config.open_relay_warning() {
        warn!("{w}");
    }
    match event_loop::run(config, listeners, log.clone()) {
        Ok(()) => 0,
        Err(e) => fail(&format!("event loop failed: {e}")),
    }
}
