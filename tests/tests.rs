//! Black-box tests of `sockproxyd`: each test starts the real binary on its own ports
//! and talks to it over loopback, as plugins, people and Luup do. See `util` for the
//! fakes and `docs/PROTOCOL.md` for the protocol checked here.

mod util;

mod access;
mod bounds;
mod build_number;
mod commands;
mod config;
mod echo;
mod faults;
mod init_script;
mod lifecycle;
mod lua;
mod memory;
mod notify;
mod openwrt_uci;
mod reload;
mod vera_plugin;
