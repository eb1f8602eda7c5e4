//! The command-mode wire protocol (PROTOCOL.md "Command mode", "CONN"):
//! line framing, `Command` and `ConnRequest` parsing, and the text of every
//! reply.
//!
//! In scope: bytes in, typed values out; typed values in, reply bytes out.
//! Out of scope: sockets, the clock, connection state. No I/O.

use std::fmt;
use std::net::IpAddr;
use std::time::Duration;

/// Longest command line accepted by default, CR and LF not counted.
pub const MAX_LINE: usize = 4096;
/// Default and default limit of the per-direction buffer (`BLKS`).
pub const DEFAULT_BLKS: usize = 2048;
pub const MAX_BLKS: usize = 1 << 20;
/// Largest BLKS with `PRTO=udp`: one client read is one datagram, and the
/// largest UDP payload is 65,535 - 8 (UDP header) - 20 (IPv4 header).
pub const MAX_UDP_BLKS: usize = 65_507;

/// The limits a user may change (`[host] max_line=`, `max_blks=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_line: usize,
    pub max_blks: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_line: MAX_LINE,
            max_blks: MAX_BLKS,
        }
    }
}
/// Longest PACE accepted: a day. Longer is surely a typo.
const MAX_PACE_SECS: f64 = 86_400.0;

pub const DEFAULT_SERVICE: &str = "urn:toggledbits-com:serviceId:SockProxy1";
pub const DEFAULT_ACTION: &str = "HandleReceiveData";

/// What `BILD` answers and `--version` shows: the commit date as two-digit year and
/// day of the year (`26331`), set by build.rs (which says where it comes from).
pub const BUILD: &str = env!("SOCKPROXYD_BUILD_NUMBER");

// build.rs's date arithmetic and its unit tests, run with this crate's.
#[cfg(test)]
#[allow(dead_code)]
#[path = "../build.rs"]
mod build_script;

pub fn greeting(id: &str) -> String {
    format!("OK TOGGLEDBITS-SOCKPROXY 1 {id}\n")
}

pub const OK_NTFY: &str = "OK NTFY\n";
pub const OK_BLKS: &str = "OK BLKS\n";
pub const OK_RTIM: &str = "OK RTIM\n";
pub const OK_PACE: &str = "OK PACE\n";
pub const OK_QUIT: &str = "OK QUIT\n";
pub const OK_STOP: &str = "OK STOP\n";
pub const ERR_STOP: &str = "ERR STOP Not allowed\n";
/// Written where the greeting would go when `max_conns` is reached.
pub const ERR_BUSY: &str = "ERR BUSY Too many connections\n";

/// `BILD`'s answer.
pub fn ok_build() -> String {
    format!("OK {BUILD}\n")
}

/// `OK CONN <pid>`: the NTFY pid when one was given, else the connection id.
pub fn ok_conn(pid: &str) -> String {
    // The pid is the client's own text: one printable line.
    format!("OK CONN {}\n", OneLine(pid))
}

/// `ERR CONN <reason>` for a connect that failed or was refused.
pub fn err_conn(reason: &str) -> String {
    format!("ERR CONN {}\n", OneLine(reason))
}

pub const CAPA_REPLY: &str = "OK CAPA BLKS RTIM NTFY CONN UDP PACE PRTO IPV6\n";

pub const HELP_REPLY: &str = "\
Commands (one per line):
  CONN host:port [RTIM=ms] [BLKS=n] [NTFY=dev/sid/act[/pid]] [PACE=s] [PRTO=tcp|udp]
                 connect to host:port and pass bytes through (echo mode)
  NTFY dev [sid [act [pid]]]   notify this Luup device when data arrives
  BLKS n         buffer size per direction, 1..1048576 bytes (default 2048)
  RTIM ms        close when the remote is silent this long (0 = never)
  PACE s         at most one notification per s seconds (0 = no pacing)
  STAT           list connections
  CAPA           list capabilities
  BILD           show the build number
  QUIT           close this connection
  STOP           stop the daemon
OK HELP
";

/// One framed line, or why there is none yet.
#[derive(Debug, PartialEq, Eq)]
pub enum Line<'a> {
    /// A line without its LF (and CR), and how many bytes it used.
    Complete(&'a [u8], usize),
    Incomplete,
    TooLong,
}

/// Finds the first LF-terminated line in `buf`; a CR before the LF is
/// stripped (PROTOCOL.md: tolerated everywhere). Lines longer than
/// `max_line` are `TooLong`.
pub fn next_line(buf: &[u8], max_line: usize) -> Line<'_> {
    match buf.iter().position(|&b| b == b'\n') {
        Some(lf) => {
            let line = buf.get(..lf).unwrap_or_default();
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.len() > max_line {
                Line::TooLong
            } else {
                Line::Complete(line, lf + 1)
            }
        }
        // max_line bytes and a CR may still be waiting for their LF.
        None if buf.len() > max_line.saturating_add(1) => Line::TooLong,
        None => Line::Incomplete,
    }
}

/// Who a notification goes to (PROTOCOL.md "Notifications").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NotifyTarget {
    pub device: u32,
    pub service: String,
    pub action: String,
    /// `None`: the connection id.
    pub pid: Option<String>,
}

impl NotifyTarget {
    /// From the words of `NTFY dev sid act pid` or the parts of
    /// `NTFY=dev/sid/act/pid`. A device that does not parse or is negative
    /// means no notifications; missing or empty parts take the defaults.
    fn from_parts<'a>(mut parts: impl Iterator<Item = &'a str>) -> Option<NotifyTarget> {
        let device = parts.next()?.parse::<u32>().ok()?;
        let mut part = |default: &str| match parts.next() {
            Some(s) if !s.is_empty() => s.to_string(),
            _ => default.to_string(),
        };
        let service = part(DEFAULT_SERVICE);
        let action = part(DEFAULT_ACTION);
        let pid = Some(part("")).filter(|p| !p.is_empty());
        Some(NotifyTarget {
            device,
            service,
            action,
            pid,
        })
    }
}

impl fmt::Display for NotifyTarget {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}/{}", self.device, self.service, self.action)?;
        if let Some(pid) = &self.pid {
            write!(f, "/{pid}")?;
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    Ip(IpAddr),
    Name(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Udp,
}

/// Per-connection settings: the defaults, changed by `NTFY`/`BLKS`/`RTIM`/
/// `PACE` commands and then by the options of `CONN`.
#[derive(Debug, Clone, PartialEq)]
pub struct Settings {
    pub ntfy: Option<NotifyTarget>,
    pub blks: usize,
    /// Remote silence that closes the connection; `None`: never.
    pub rtim: Option<Duration>,
    /// Least time between notifications; zero: no pacing.
    pub pace: Duration,
    pub transport: Transport,
}

impl Default for Settings {
    fn default() -> Settings {
        Settings {
            ntfy: None,
            blks: DEFAULT_BLKS,
            rtim: None,
            pace: Duration::ZERO,
            transport: Transport::Tcp,
        }
    }
}

/// `CONN host:port [options]`: where to, and the settings to use.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnRequest {
    pub host: Host,
    pub port: u16,
    /// `host:port` as the client wrote it, for STAT and logs.
    pub target: String,
    pub options: Vec<ConnOption>,
}

/// One `KEY=value` of `CONN`, already validated.
#[derive(Debug, Clone, PartialEq)]
pub enum ConnOption {
    Rtim(Option<Duration>),
    Blks(usize),
    Ntfy(Option<NotifyTarget>),
    Pace(Duration),
    Prto(Transport),
}

impl Settings {
    /// Whether a connection can run with these settings, as a whole: each
    /// value was checked on its own when parsed, but `PRTO=udp` and a BLKS
    /// no datagram can carry may come from different places (a `BLKS`
    /// command, then `CONN ... PRTO=udp`). PROTOCOL.md "Echo mode", UDP.
    pub fn check(&self) -> Result<(), CmdError> {
        if self.transport == Transport::Udp && self.blks > MAX_UDP_BLKS {
            return Err(CmdError::Conn(format!("BLKS above {MAX_UDP_BLKS} for UDP")));
        }
        Ok(())
    }
}

impl ConnRequest {
    /// `settings` with this request's options applied, then `Settings::check`ed:
    /// what a `CONN` runs with, or its `ERR CONN`.
    pub fn checked_settings(&self, base: &Settings) -> Result<Settings, CmdError> {
        let s = self.settings(base);
        s.check()?;
        Ok(s)
    }

    /// `settings` with this request's options applied, in order.
    pub fn settings(&self, base: &Settings) -> Settings {
        let mut s = base.clone();
        for opt in &self.options {
            match opt {
                ConnOption::Rtim(v) => s.rtim = *v,
                ConnOption::Blks(v) => s.blks = *v,
                ConnOption::Ntfy(v) => s.ntfy = v.clone(),
                ConnOption::Pace(v) => s.pace = *v,
                ConnOption::Prto(v) => s.transport = *v,
            }
        }
        s
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    /// An empty line: ignored, no reply.
    Blank,
    Conn(ConnRequest),
    Ntfy(Option<NotifyTarget>),
    Blks(usize),
    Rtim(Option<Duration>),
    Pace(Duration),
    Stat,
    Capa,
    Help,
    Bild,
    Quit,
    Stop,
}

/// A command that failed; `Display` is the exact reply line (without LF).
/// Every one of them closes the connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdError {
    Invalid,
    TooLong,
    Conn(String),
    Blks,
    Rtim,
    Pace,
}

impl fmt::Display for CmdError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CmdError::Invalid => f.write_str("ERR INVALID COMMAND"),
            CmdError::TooLong => f.write_str("ERR LINE Too long"),
            // The reason may quote the client's words (a stray CR, an escape
            // sequence): the reply stays one printable line on a terminal.
            CmdError::Conn(reason) => write!(f, "ERR CONN {}", OneLine(reason)),
            CmdError::Blks => f.write_str("ERR BLKS Invalid block size"),
            CmdError::Rtim => f.write_str("ERR RTIM Invalid timeout"),
            CmdError::Pace => f.write_str("ERR PACE Invalid pace"),
        }
    }
}

/// Text shown on one printable line: control characters (a newline, a CR,
/// an escape sequence, DEL, the C1 controls) are written escaped, as `\n`,
/// `\r`, `\u{1b}`. The one escaping for everything that quotes what a
/// client, a peer or a file said: replies, `STAT` fields, config errors, log
/// lines (PROTOCOL.md "Limits and access control"). Width and alignment
/// (`{:<12}`) apply to the escaped text.
pub struct OneLine<'a>(pub &'a str);

impl fmt::Display for OneLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if !self.0.chars().any(char::is_control) {
            return f.pad(self.0);
        }
        let mut escaped = String::with_capacity(self.0.len().saturating_add(16));
        for c in self.0.chars() {
            if c.is_control() {
                escaped.extend(c.escape_default());
            } else {
                escaped.push(c);
            }
        }
        f.pad(&escaped)
    }
}

fn is_blank(c: char) -> bool {
    c == ' ' || c == '\t'
}

/// Parses one line (without its LF/CR) of command mode.
pub fn parse_command(line: &[u8], limits: &Limits) -> Result<Command, CmdError> {
    // Commands are ASCII; anything else in a line is a bad command, except
    // inside NTFY/CONN values where lossy text is still usable for logs.
    let text = String::from_utf8_lossy(line);
    let mut words = text.split(is_blank).filter(|w| !w.is_empty());
    let Some(word) = words.next() else {
        return Ok(Command::Blank);
    };
    match word {
        "CONN" => {
            let rest: Vec<&str> = words.collect();
            parse_conn(&rest, limits).map(Command::Conn)
        }
        "NTFY" => Ok(Command::Ntfy(NotifyTarget::from_parts(words))),
        "BLKS" => single(words)
            .and_then(|w| parse_blks(w, limits.max_blks))
            .map(Command::Blks)
            .ok_or(CmdError::Blks),
        "RTIM" => single(words)
            .and_then(parse_rtim)
            .map(Command::Rtim)
            .ok_or(CmdError::Rtim),
        "PACE" => single(words)
            .and_then(parse_pace)
            .map(Command::Pace)
            .ok_or(CmdError::Pace),
        "STAT" => Ok(Command::Stat),
        "CAPA" => Ok(Command::Capa),
        "HELP" => Ok(Command::Help),
        "BILD" => Ok(Command::Bild),
        "QUIT" => Ok(Command::Quit),
        "STOP" => Ok(Command::Stop),
        _ => Err(CmdError::Invalid),
    }
}

/// The one argument of a command, if there is exactly one.
fn single<'a>(mut words: impl Iterator<Item = &'a str>) -> Option<&'a str> {
    let arg = words.next()?;
    words.next().is_none().then_some(arg)
}

/// A decimal integer as plugins send it: digits only.
fn parse_uint(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn parse_blks(s: &str, max: usize) -> Option<usize> {
    let n = usize::try_from(parse_uint(s)?).ok()?;
    (1..=max).contains(&n).then_some(n)
}

fn parse_rtim(s: &str) -> Option<Option<Duration>> {
    let ms = parse_uint(s)?;
    Some((ms > 0).then(|| Duration::from_millis(ms)))
}

/// Seconds, integer or decimal fraction (`1`, `0.5`, `.25`, `2.`).
fn parse_pace(s: &str) -> Option<Duration> {
    let (int, frac) = s.split_once('.').unwrap_or((s, ""));
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() && frac.is_empty() || !digits(int) || !digits(frac) {
        return None;
    }
    let secs: f64 = s.parse().ok()?;
    if secs > MAX_PACE_SECS {
        return None;
    }
    Duration::try_from_secs_f64(secs).ok()
}

/// `host:port` then options: `words` are what follows `CONN`. Also used for
/// the values of `[direct]` entries.
pub fn parse_conn(words: &[&str], limits: &Limits) -> Result<ConnRequest, CmdError> {
    let (target, opts) = words
        .split_first()
        .ok_or_else(|| CmdError::Conn("Missing host:port".into()))?;
    let (host, port) = parse_host_port(target)
        .ok_or_else(|| CmdError::Conn(format!("Invalid host:port {target}")))?;
    let options = opts
        .iter()
        .map(|o| {
            parse_conn_option(o, limits)
                .ok_or_else(|| CmdError::Conn(format!("Invalid option {o}")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ConnRequest {
        host,
        port,
        target: target.to_string(),
        options,
    })
}

fn parse_conn_option(opt: &str, limits: &Limits) -> Option<ConnOption> {
    let (key, value) = opt.split_once('=')?;
    match key.to_ascii_uppercase().as_str() {
        "RTIM" => parse_rtim(value).map(ConnOption::Rtim),
        "BLKS" => parse_blks(value, limits.max_blks).map(ConnOption::Blks),
        "PACE" => parse_pace(value).map(ConnOption::Pace),
        "NTFY" => Some(ConnOption::Ntfy(NotifyTarget::from_parts(
            value.splitn(4, '/'),
        ))),
        "PRTO" => match value.to_ascii_lowercase().as_str() {
            "tcp" => Some(ConnOption::Prto(Transport::Tcp)),
            "udp" => Some(ConnOption::Prto(Transport::Udp)),
            _ => None,
        },
        _ => None,
    }
}

/// `a.b.c.d:port`, `name:port` or `[v6]:port`; port 1-65535.
pub fn parse_host_port(s: &str) -> Option<(Host, u16)> {
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (v6, port) = rest.split_once("]:")?;
        (Host::Ip(IpAddr::V6(v6.parse().ok()?)), port)
    } else {
        let (name, port) = s.rsplit_once(':')?;
        let host = match name.parse::<IpAddr>() {
            Ok(ip @ IpAddr::V4(_)) => Host::Ip(ip),
            Ok(IpAddr::V6(_)) => return None, // needs brackets
            Err(_) if is_host_name(name) => Host::Name(name.to_string()),
            Err(_) => return None,
        };
        (host, port)
    };
    let port = u16::try_from(parse_uint(port)?).ok().filter(|&p| p != 0)?;
    Some((host, port))
}

fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    #[test]
    fn framing() {
        assert_eq!(
            next_line(b"STAT\nQUIT\n", MAX_LINE),
            Line::Complete(b"STAT", 5)
        );
        assert_eq!(next_line(b"STAT\r\n", MAX_LINE), Line::Complete(b"STAT", 6));
        assert_eq!(next_line(b"STA", MAX_LINE), Line::Incomplete);
        let mut long = vec![b'x'; MAX_LINE];
        assert_eq!(next_line(&long, MAX_LINE), Line::Incomplete);
        long.push(b'\r');
        assert_eq!(next_line(&long, MAX_LINE), Line::Incomplete);
        long.push(b'\n');
        assert_eq!(
            next_line(&long, MAX_LINE),
            Line::Complete(&long[..MAX_LINE], MAX_LINE + 2)
        );
        let too = vec![b'x'; MAX_LINE + 2];
        assert_eq!(next_line(&too, MAX_LINE), Line::TooLong);
        let mut too = vec![b'x'; MAX_LINE + 1];
        too.push(b'\n');
        assert_eq!(next_line(&too, MAX_LINE), Line::TooLong);
    }

    #[test]
    fn simple_commands() {
        assert_eq!(parse_command(b"", &Limits::default()), Ok(Command::Blank));
        assert_eq!(
            parse_command(b"   \t ", &Limits::default()),
            Ok(Command::Blank)
        );
        assert_eq!(
            parse_command(b"STAT", &Limits::default()),
            Ok(Command::Stat)
        );
        assert_eq!(
            parse_command(b"  QUIT", &Limits::default()),
            Ok(Command::Quit)
        );
        assert_eq!(
            parse_command(b"stat", &Limits::default()),
            Err(CmdError::Invalid)
        );
        assert_eq!(
            parse_command(b"FOO", &Limits::default()),
            Err(CmdError::Invalid)
        );
        assert_eq!(
            parse_command(b"BLKS 512", &Limits::default()),
            Ok(Command::Blks(512))
        );
        assert_eq!(
            parse_command(b"BLKS 0", &Limits::default()),
            Err(CmdError::Blks)
        );
        assert_eq!(
            parse_command(b"BLKS 1048577", &Limits::default()),
            Err(CmdError::Blks)
        );
        assert_eq!(
            parse_command(b"BLKS", &Limits::default()),
            Err(CmdError::Blks)
        );
        assert_eq!(
            parse_command(b"BLKS -1", &Limits::default()),
            Err(CmdError::Blks)
        );
        assert_eq!(
            parse_command(b"RTIM 0", &Limits::default()),
            Ok(Command::Rtim(None))
        );
        assert_eq!(
            parse_command(b"RTIM 250", &Limits::default()),
            Ok(Command::Rtim(Some(Duration::from_millis(250))))
        );
        assert_eq!(
            parse_command(b"RTIM 1.5", &Limits::default()),
            Err(CmdError::Rtim)
        );
        assert_eq!(
            parse_command(b"PACE 0.5", &Limits::default()),
            Ok(Command::Pace(Duration::from_millis(500)))
        );
        assert_eq!(
            parse_command(b"PACE 2", &Limits::default()),
            Ok(Command::Pace(Duration::from_secs(2)))
        );
        assert_eq!(
            parse_command(b"PACE -1", &Limits::default()),
            Err(CmdError::Pace)
        );
        assert_eq!(
            parse_command(b"PACE .", &Limits::default()),
            Err(CmdError::Pace)
        );
        assert_eq!(
            parse_command(b"PACE 1e3", &Limits::default()),
            Err(CmdError::Pace)
        );
        assert_eq!(CmdError::Blks.to_string(), "ERR BLKS Invalid block size");
    }

    #[test]
    fn ntfy_command_and_defaults() {
        let Ok(Command::Ntfy(Some(t))) = parse_command(b"NTFY 12", &Limits::default()) else {
            panic!("NTFY 12 did not parse");
        };
        assert_eq!(t.device, 12);
        assert_eq!(t.service, DEFAULT_SERVICE);
        assert_eq!(t.action, DEFAULT_ACTION);
        assert_eq!(t.pid, None);
        let Ok(Command::Ntfy(Some(t))) =
            parse_command(b"NTFY 0 urn:x:serviceId:Y1 Act p1", &Limits::default())
        else {
            panic!("full NTFY did not parse");
        };
        assert_eq!(
            (t.device, &*t.service, &*t.action),
            (0, "urn:x:serviceId:Y1", "Act")
        );
        assert_eq!(t.pid.as_deref(), Some("p1"));
        assert_eq!(
            parse_command(b"NTFY -1", &Limits::default()),
            Ok(Command::Ntfy(None))
        );
        assert_eq!(
            parse_command(b"NTFY abc", &Limits::default()),
            Ok(Command::Ntfy(None))
        );
        assert_eq!(
            parse_command(b"NTFY", &Limits::default()),
            Ok(Command::Ntfy(None))
        );
    }

    #[test]
    fn conn_request() {
        let line = b"CONN 192.168.0.5:3232  NTFY=123/urn:x:serviceId:E1/HandleReceive RTIM=600000 PACE=1\r";
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Ok(Command::Conn(req)) = parse_command(line, &Limits::default()) else {
            panic!("CONN did not parse");
        };
        assert_eq!(
            req.host,
            Host::Ip(IpAddr::V4(Ipv4Addr::new(192, 168, 0, 5)))
        );
        assert_eq!(req.port, 3232);
        assert_eq!(req.target, "192.168.0.5:3232");
        let s = req.settings(&Settings::default());
        let t = s.ntfy.expect("target");
        assert_eq!(t.device, 123);
        assert_eq!(t.action, "HandleReceive");
        assert_eq!(s.rtim, Some(Duration::from_secs(600)));
        assert_eq!(s.pace, Duration::from_secs(1));
        assert_eq!(s.blks, DEFAULT_BLKS);
        assert_eq!(s.transport, Transport::Tcp);
    }

    #[test]
    fn conn_options_override_commands() {
        let base = Settings {
            blks: 100,
            ntfy: NotifyTarget::from_parts("5".split('/')),
            ..Settings::default()
        };
        let req = parse_conn(
            &["h:1", "BLKS=7", "NTFY=-1", "PRTO=udp"],
            &Limits::default(),
        )
        .expect("parses");
        let s = req.settings(&base);
        assert_eq!((s.blks, s.ntfy, s.transport), (7, None, Transport::Udp));
        let s = parse_conn(&["h:1"], &Limits::default())
            .expect("parses")
            .settings(&base);
        assert_eq!(s.blks, 100);
        assert_eq!(s.ntfy.map(|t| t.device), Some(5));
    }

    #[test]
    fn udp_caps_blks_at_the_largest_datagram() {
        let limits = Limits::default();
        let checked = |words: &[&str], base: &Settings| {
            parse_conn(words, &limits)
                .expect("parses")
                .checked_settings(base)
                .map(|s| s.blks)
                .map_err(|e| e.to_string())
        };
        let base = Settings::default();
        let refused = Err("ERR CONN BLKS above 65507 for UDP".to_string());
        assert_eq!(checked(&["h:1", "PRTO=udp", "BLKS=100000"], &base), refused);
        assert_eq!(checked(&["h:1", "BLKS=65508", "PRTO=udp"], &base), refused);
        assert_eq!(
            checked(&["h:1", "PRTO=udp", "BLKS=65507"], &base),
            Ok(65_507)
        );
        assert_eq!(checked(&["h:1", "BLKS=100000"], &base), Ok(100_000));
        // The last BLKS counts; so does one set before CONN.
        assert_eq!(
            checked(&["h:1", "BLKS=100000", "PRTO=udp", "BLKS=9"], &base),
            Ok(9)
        );
        let big = Settings {
            blks: 100_000,
            ..Settings::default()
        };
        assert_eq!(checked(&["h:1", "PRTO=udp"], &big), refused);
        assert_eq!(checked(&["h:1", "PRTO=udp", "BLKS=512"], &big), Ok(512));
        assert_eq!(checked(&["h:1"], &big), Ok(100_000));
    }

    #[test]
    fn ntfy_option_with_pid_keeps_slashes() {
        let req = parse_conn(&["h:1", "NTFY=9/sid/act/a/b"], &Limits::default()).expect("parses");
        let t = req.settings(&Settings::default()).ntfy.expect("target");
        assert_eq!(t.pid.as_deref(), Some("a/b"));
        assert_eq!(t.to_string(), "9/sid/act/a/b");
        let req = parse_conn(&["h:1", "NTFY=9//"], &Limits::default()).expect("parses");
        let t = req.settings(&Settings::default()).ntfy.expect("target");
        assert_eq!((&*t.service, &*t.action), (DEFAULT_SERVICE, DEFAULT_ACTION));
    }

    #[test]
    fn conn_errors() {
        let err = |words: &[&str]| {
            parse_conn(words, &Limits::default())
                .err()
                .map(|e| e.to_string())
        };
        assert_eq!(err(&[]), Some("ERR CONN Missing host:port".into()));
        assert_eq!(
            err(&["host"]),
            Some("ERR CONN Invalid host:port host".into())
        );
        assert!(err(&["host:0"]).is_some());
        assert!(err(&["host:65536"]).is_some());
        assert!(err(&["host:+5"]).is_some());
        assert!(err(&["::1:80"]).is_some());
        assert!(err(&["bad/host:80"]).is_some());
        assert_eq!(
            err(&["h:1", "FOO=1"]),
            Some("ERR CONN Invalid option FOO=1".into())
        );
        // Control characters quoted back are escaped: one printable line.
        assert_eq!(
            err(&["h:1", "A\rB\u{1b}[2J"]),
            Some("ERR CONN Invalid option A\\rB\\u{1b}[2J".into())
        );
        assert!(err(&["h:1", "RTIM=x"]).is_some());
        assert_eq!(
            format!("[{:<8}]", OneLine("a\u{7f}\u{9b}")),
            "[a\\u{7f}\\u{9b}]"
        );
        assert_eq!(
            format!("[{:<4}|{:>3}]", OneLine("a\n"), OneLine("b")),
            "[a\\n |  b]"
        );
        assert!(err(&["h:1", "BLKS=0"]).is_some());
        assert!(err(&["h:1", "BLKS=2000000"]).is_some());
        assert!(err(&["h:1", "PRTO=sctp"]).is_some());
        assert!(err(&["h:1", "RTIM"]).is_some());
    }

    #[test]
    fn hosts() {
        assert_eq!(
            parse_host_port("[::1]:80"),
            Some((Host::Ip("::1".parse().expect("v6")), 80))
        );
        assert_eq!(
            parse_host_port("gw.local:10006"),
            Some((Host::Name("gw.local".into()), 10006))
        );
        assert_eq!(parse_host_port("[::1]80"), None);
        assert_eq!(parse_host_port(":80"), None);
    }
}
