//! The `STAT` table (PROTOCOL.md "STAT") and its `MMmSS` durations.
//!
//! In scope: rows in, text out. Out of scope: live connection state; the
//! event loop gathers a `Row` per connection and hands them over.
//!
//! Every text field is written through `protocol::OneLine`: a NTFY target
//! is whatever its client sent, and another client's terminal reads it.

use std::fmt::Write;
use std::time::Duration;

use crate::protocol::OneLine;

pub struct Row {
    /// The connection that asked: marked `*`.
    pub me: bool,
    pub id: String,
    /// 1 command mode, 2 echo mode.
    pub state: u8,
    pub idle: Duration,
    pub uptime: Duration,
    pub client: String,
    pub remote: String,
    pub recv: u64,
    pub xmit: u64,
    pub notify: String,
}

/// `MMmSS`, or `HHhMM` from 100 minutes on, as the original printed them.
pub fn duration(d: Duration) -> String {
    let secs = d.as_secs();
    let mins = secs / 60;
    if mins < 100 {
        format!("{:02}m{:02}", mins, secs % 60)
    } else {
        format!("{:02}h{:02}", mins / 60, mins % 60)
    }
}

pub fn table(rows: &[Row]) -> String {
    let mut out = format!(
        " {:<12} {:<2} {:>5} {:>5} {:<15} {:<21} {:>8} {:>8} {}\n",
        "ID", "St", "Idle", "Up", "Client", "Remote", "#recv", "#xmit", "Notify"
    );
    for r in rows {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "{}{:<12} {:<2} {:>5} {:>5} {:<15} {:<21} {:>8} {:>8} {}",
            if r.me { '*' } else { ' ' },
            OneLine(&r.id),
            r.state,
            duration(r.idle),
            duration(r.uptime),
            OneLine(&r.client),
            OneLine(&r.remote),
            r.recv,
            r.xmit,
            OneLine(&r.notify)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(duration(Duration::ZERO), "00m00");
        assert_eq!(duration(Duration::from_millis(65_900)), "01m05");
        assert_eq!(duration(Duration::from_secs(99 * 60 + 59)), "99m59");
        assert_eq!(duration(Duration::from_secs(100 * 60)), "01h40");
        assert_eq!(duration(Duration::from_secs(26 * 3600 + 7 * 60)), "26h07");
    }

    #[test]
    fn marks_the_asker() {
        let row = |me, id: &str| Row {
            me,
            id: id.into(),
            state: 2,
            idle: Duration::from_secs(3),
            uptime: Duration::from_secs(70),
            client: "127.0.0.1".into(),
            remote: "10.0.0.7:10006".into(),
            recv: 584,
            xmit: 174,
            notify: "659/urn:x:serviceId:H1/HandleReceive/0".into(),
        };
        let t = table(&[row(false, "1716057f6c0"), row(true, "1716058a203")]);
        let lines: Vec<&str> = t.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with(" ID"));
        assert!(lines[1].starts_with(" 1716057f6c0 "));
        assert!(lines[2].starts_with("*1716058a203 "));
        assert!(lines[2].contains(" 00m03 01m10 "));
        assert!(lines[2].ends_with(" 584      174 659/urn:x:serviceId:H1/HandleReceive/0"));
    }

    #[test]
    fn fields_are_escaped_to_one_line() {
        let row = Row {
            me: false,
            id: "i\rd".into(),
            state: 1,
            idle: Duration::ZERO,
            uptime: Duration::ZERO,
            client: "c\u{7f}".into(),
            remote: "r\n".into(),
            recv: 0,
            xmit: 0,
            notify: "5/s\u{1b}[2J/a\rb/p\u{9b}".into(),
        };
        let t = table(&[row]);
        assert_eq!(t.lines().count(), 2, "{t:?}");
        assert!(
            !t.lines().flat_map(str::chars).any(char::is_control),
            "{t:?}"
        );
        let line = t.lines().nth(1).unwrap_or_default();
        // Columns keep their widths, counted on the escaped text.
        assert!(line.starts_with(" i\\rd         1  00m00 "), "{line:?}");
        assert!(line.contains(" c\\u{7f}         r\\n    "), "{line:?}");
        assert!(line.ends_with(" 5/s\\u{1b}[2J/a\\rb/p\\u{9b}"), "{line:?}");
    }
}
