//! sockproxyd as a library: the daemon's modules, so that the binary
//! (`main.rs`), the fuzz targets (`fuzz/`) and the benchmarks can reach the
//! parsers and the command-mode state machine without sockets.

pub mod acl;
pub mod buffer;
pub mod config;
pub mod conn;
pub mod event_loop;
pub mod ini;
pub mod limits;
pub mod listen;
pub mod logging;
pub mod notify;
pub mod pool;
pub mod protocol;
pub mod ratelog;
pub mod resolve;
pub mod selfcheck;
pub mod session;
pub mod side;
pub mod signals;
pub mod stat;
pub mod timer;
