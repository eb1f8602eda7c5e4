//! Plugins written in Lua against the real LuaSocket (`tests/lua/*.lua`, run with
//! `lua5.1`): the notify-then-read pattern of a Luup plugin, the seed README's
//! `connect()` sample falling back to a direct connection, and the client printed in
//! docs/PROTOCOL.md (read from the file), through the proxy and without it. Skipped,
//! with the reason printed, when `lua5.1` or LuaSocket is missing (`LUA` overrides the
//! interpreter).

use crate::util::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::Shutdown;
use std::process::{Command, Output};
use std::sync::mpsc::channel;
use std::thread;
use std::time::Duration;

fn script(name: &str) -> String {
    format!("{}/tests/lua/{name}", env!("CARGO_MANIFEST_DIR"))
}

/// Runs a script to completion; kills it after `timeout` and says so, leaving the
/// verdict to the test's checks of what it printed.
fn run_lua(lua: &str, args: &[String], timeout: Duration) -> Output {
    let (output, timed_out) =
        output_within(Command::new(lua).args(args), timeout).expect("spawn lua");
    if timed_out {
        eprintln!("lua script killed after {timeout:?}");
    }
    output
}

#[test]
fn lua_plugin_reads_every_byte_on_notification() {
    let Some(lua) = lua() else { return };
    let luup_port = free_port();
    let d = Daemon::start(&format!("http://127.0.0.1:{luup_port}"));
    let dev = Device::listen();
    let out_file =
        std::env::temp_dir().join(format!("sockproxyd-test-{}-lua.out", std::process::id()));
    let _ = std::fs::remove_file(&out_file);
    let args: Vec<String> = vec![
        script("plugin.lua"),
        d.port().to_string(),
        luup_port.to_string(),
        dev.addr.port().to_string(),
        "42".to_string(),
        out_file.to_string_lossy().to_string(),
    ];
    let plugin = thread::spawn(move || run_lua(&lua, &args, dur(45_000)));

    // The device: a multi-chunk answer with pauses, then EOF.
    let mut s = dev.accept_within(dur(15_000));
    let data = payload(9 * 1024, 21);
    for c in data.chunks(1500) {
        s.write_all(c).expect("device write");
        thread::sleep(Duration::from_millis(150)); // the device's own pace
    }
    s.shutdown(Shutdown::Write).expect("device shutdown");

    let o = plugin.join().expect("lua thread");
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        o.status.success(),
        "plugin.lua failed ({}):\n{stderr}\n{stdout}",
        o.status
    );
    let got = std::fs::read(&out_file).expect("plugin.lua output file");
    let _ = std::fs::remove_file(&out_file);
    assert_eq!(
        (got.len(), fnv1a(&got)),
        (data.len(), fnv1a(&data)),
        "bytes the Lua plugin read (len, fnv); its output:\n{stdout}"
    );
    eprintln!("plugin.lua said:\n{stdout}");
    // PROTOCOL.md "Notifications": the end was announced (the plugin read "closed" on
    // it and closed its socket), so no second, "final" notification runs its action
    // again (issue 13 item 9: LuWS got one 1-2 ms after it had closed).
    assert!(
        stdout.lines().any(|l| l == "NOFINAL"),
        "a notification after the plugin had read the end and closed:\n{stdout}"
    );
    let n: usize = stdout
        .lines()
        .find_map(|l| l.strip_prefix("NOTIFICATIONS "))
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    // PACE=1 over ~1 s of chunks: a few notifications, not one per chunk.
    assert!(
        (2..=6).contains(&n),
        "{n} notifications before 'closed':\n{stdout}"
    );
    // The device sees the proxy close its side once the plugin closed.
    let mut sink = Vec::new();
    s.set_read_timeout(Some(dur(5_000))).expect("timeout");
    let r = s.read_to_end(&mut sink);
    assert!(
        r.is_ok() && sink.is_empty(),
        "device: expected a clean EOF, got {r:?} and {} bytes",
        sink.len()
    );
    d.wait_no_other_connections(dur(5_000), "after the plugin closed");
}

#[test]
fn readme_connect_sample_falls_back_to_a_direct_connection() {
    let Some(lua) = lua() else { return };
    let luup = FakeLuup::start();
    let d = Daemon::start(&luup.url());
    let dev = Device::listen();
    // The device answers HELLO-DIRECT with WELCOME and reports the peer's port; other
    // connections (the proxy's, if it got to connect) get nothing.
    let (tx, rx) = channel();
    let dev_addr = dev.addr;
    let dev = std::sync::Arc::new(dev);
    let dev2 = std::sync::Arc::clone(&dev);
    thread::spawn(move || {
        while let Some(s) = dev2.try_accept(Duration::from_secs(30)) {
            let tx = tx.clone();
            thread::spawn(move || {
                let peer = s.peer_addr().map(|a| a.port()).unwrap_or(0);
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let mut r = BufReader::new(s.try_clone().expect("clone"));
                let mut line = String::new();
                if r.read_line(&mut line).is_ok() && line == "HELLO-DIRECT\n" {
                    let _ = (&s).write_all(b"WELCOME\n");
                    let _ = tx.send(peer);
                }
            });
        }
    });
    let args = vec![
        script("readme_connect.lua"),
        d.port().to_string(),
        dev_addr.port().to_string(),
    ];
    let o = run_lua(&lua, &args, dur(30_000));
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        o.status.success(),
        "readme_connect.lua failed ({}):\n{stderr}\n{stdout}",
        o.status
    );
    assert!(
        stdout.lines().any(|l| l == "REPLY WELCOME"),
        "no answer over the returned socket:\n{stdout}"
    );
    let lport: u16 = stdout
        .lines()
        .find_map(|l| l.strip_prefix("LOCALPORT "))
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no LOCALPORT line:\n{stdout}"));
    let peer = rx
        .recv_timeout(dur(5_000))
        .expect("the device saw no HELLO-DIRECT");
    assert_eq!(
        peer, lport,
        "the socket connect() returned is not a direct connection to the device"
    );
    d.wait_no_other_connections(dur(5_000), "after the sample gave up on the proxy");
}

/// The Lua client printed in docs/PROTOCOL.md, with `PROXY_PORT` pointed at `proxy_port`
/// and tests/lua/protocol_doc_client.lua behind it, as one script file.
fn doc_client_script(proxy_port: u16) -> ScratchFile {
    let doc = std::fs::read_to_string(top("docs/PROTOCOL.md")).expect("docs/PROTOCOL.md");
    let client = doc
        .split("```lua\n")
        .filter_map(|b| b.split_once("\n```").map(|(code, _)| code))
        .find(|code| code.contains("function connect("))
        .expect("no ```lua block with function connect( in docs/PROTOCOL.md");
    let line = r#"local PROXY_HOST, PROXY_PORT = "127.0.0.1", 2504"#;
    assert_eq!(
        client.matches(line).count(),
        1,
        "the client's proxy address line is not {line:?}"
    );
    let client = client.replace(
        line,
        &format!(r#"local PROXY_HOST, PROXY_PORT = "127.0.0.1", {proxy_port}"#),
    );
    let driver = std::fs::read_to_string(script("protocol_doc_client.lua")).expect("driver");
    ScratchFile::new("doc_client.lua", &format!("{client}\n{driver}"))
}

/// Runs the documented client against the echo device through `proxy_port`; returns
/// whether it said it went through the proxy, after checking the echo and the close.
#[track_caller]
fn run_doc_client(lua: &str, proxy_port: u16, dev: &EchoDevice) -> bool {
    let f = doc_client_script(proxy_port);
    let args = vec![f.arg(), dev.addr.port().to_string()];
    let o = run_lua(lua, &args, dur(30_000));
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    let stderr = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(
        o.status.success(),
        "the client failed ({}):\n{stderr}\n{stdout}",
        o.status
    );
    for want in ["GOT PING", "STATE closed"] {
        assert!(
            stdout.lines().any(|l| l == want),
            "no {want:?} line:\n{stdout}\n{stderr}"
        );
    }
    match stdout.lines().find_map(|l| l.strip_prefix("PROXIED ")) {
        Some("true") => true,
        Some("false") => false,
        _ => panic!("no PROXIED line:\n{stdout}\n{stderr}"),
    }
}

#[test]
fn protocol_doc_client_goes_through_the_proxy_and_is_notified() {
    let Some(lua) = lua() else { return };
    let luup = FakeLuup::start();
    let d = Daemon::start(&luup.url());
    let dev = EchoDevice::start();
    assert!(
        run_doc_client(&lua, d.port(), &dev),
        "the client went direct"
    );
    // The NTFY= it built reached Luup: device, service and action as given.
    let mut seen = None;
    wait_until(dur(5_000), "a notification for device 42", || {
        seen = luup
            .requests()
            .into_iter()
            .find(|r| r.param("DeviceNum").as_deref() == Some("42"));
        seen.is_some()
    });
    let r = seen.expect("seen");
    assert_eq!(
        (
            r.param("serviceId").as_deref(),
            r.param("action").as_deref()
        ),
        (
            Some("urn:example-com:serviceId:Example1"),
            Some("HandleReceive")
        ),
        "{}",
        r.line
    );
}

#[test]
fn protocol_doc_client_falls_back_to_a_direct_connection() {
    let Some(lua) = lua() else { return };
    // Nothing listens on the proxy's port: the client connects to the device itself.
    let dev = EchoDevice::start();
    assert!(
        !run_doc_client(&lua, free_port(), &dev),
        "the client claims a proxy"
    );
    assert_eq!(dev.accepted.load(std::sync::atomic::Ordering::SeqCst), 1);
}
