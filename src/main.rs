mod buffer;
mod config;
mod ini;
mod logging;
mod notify;
mod protocol;
mod resolve;
mod stat;
mod timer;
fn main() {}
