//! The INI dialect of the configuration file (PROTOCOL.md "Configuration"):
//! `[section]` lines, `key=value` lines, a bare `key` meaning true, `;`
//! comments, blank lines ignored, names case-insensitive, blanks trimmed.
//!
//! In scope: text in, entries and warnings (with line numbers) out.
//! Out of scope: opening files, and what any key means (`config.rs`).

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// 1-based line number, for messages.
    pub line: usize,
    /// Lower case; empty before the first `[section]`.
    pub section: String,
    /// Lower case.
    pub key: String,
    /// `None` for a bare `key`.
    pub value: Option<String>,
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Ini {
    pub entries: Vec<Entry>,
    pub warnings: Vec<String>,
}

pub fn parse(text: &str) -> Ini {
    let mut ini = Ini::default();
    let mut section = String::new();
    for (n, raw) in text.lines().enumerate() {
        let line = n + 1;
        let s = raw.trim();
        if s.is_empty() || s.starts_with(';') || s.starts_with('#') {
            continue;
        }
        if let Some(rest) = s.strip_prefix('[') {
            match rest.strip_suffix(']') {
                Some(name) if !name.trim().is_empty() => {
                    section = name.trim().to_ascii_lowercase();
                }
                _ => ini
                    .warnings
                    .push(format!("line {line}: malformed section header {s:?}")),
            }
            continue;
        }
        let (key, value) = match s.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim().to_string())),
            None => (s, None),
        };
        if key.is_empty() {
            ini.warnings
                .push(format!("line {line}: missing key in {s:?}"));
            continue;
        }
        ini.entries.push(Entry {
            line,
            section: section.clone(),
            key: key.to_ascii_lowercase(),
            value,
        });
    }
    ini
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sections_keys_comments() {
        let ini = parse(
            "; comment\n\n[Host]\n  IP = 10.0.0.1 \nport=2600\r\ndebug\n[direct]\n8125=CONN mail:25 NTFY=5\n",
        );
        assert!(ini.warnings.is_empty(), "{:?}", ini.warnings);
        let got: Vec<_> = ini
            .entries
            .iter()
            .map(|e| (e.line, &*e.section, &*e.key, e.value.as_deref()))
            .collect();
        assert_eq!(
            got,
            vec![
                (4, "host", "ip", Some("10.0.0.1")),
                (5, "host", "port", Some("2600")),
                (6, "host", "debug", None),
                (8, "direct", "8125", Some("CONN mail:25 NTFY=5")),
            ]
        );
    }

    #[test]
    fn garbage_gives_warnings_not_panics() {
        let ini = parse("[\n[]\n=x\n\u{0}\u{1}\n[host\n");
        assert_eq!(ini.warnings.len(), 4, "{:?}", ini.warnings);
        assert!(ini.warnings[0].starts_with("line 1:"));
        assert_eq!(ini.entries.len(), 1);
        assert_eq!(ini.entries[0].section, "");
    }
}
