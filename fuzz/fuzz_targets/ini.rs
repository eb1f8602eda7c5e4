//! `ini`: a configuration file's text (lossy UTF-8, as `-c` reads it)
//! through `ini::parse` and `config::apply_file`.
//!
//! Checks: no panic; every entry has a trimmed, lower-case, non-empty key
//! without '=' and a trimmed, lower-case section, line numbers rise and stay
//! within the text; warnings and errors are one line each; writing the
//! entries out as INI and parsing that again gives the same entries; an
//! accepted file gives a configuration with the invariants of
//! `check_config`, and applying the same file twice changes nothing more.

#![no_main]

use libfuzzer_sys::fuzz_target;
use sockproxyd::config::{Config, apply_file};
use sockproxyd::ini::{self, Entry};
use sockproxyd_fuzz::{assert_one_line, check_config, check_error};

fn triples(entries: &[Entry]) -> Vec<(&str, &str, Option<&str>)> {
    entries
        .iter()
        .map(|e| (&*e.section, &*e.key, e.value.as_deref()))
        .collect()
}

/// The entries as the plainest INI text that says the same.
fn write_out(entries: &[Entry]) -> String {
    let mut text = String::new();
    let mut section = "";
    for e in entries {
        if e.section != section {
            section = &e.section;
            text.push_str(&format!("[{section}]\n"));
        }
        match &e.value {
            Some(v) => text.push_str(&format!("{}={v}\n", e.key)),
            None => text.push_str(&format!("{}\n", e.key)),
        }
    }
    text
}

fn check_ini(text: &str) {
    let parsed = ini::parse(text);
    let lines = text.lines().count();
    let mut last = 0;
    for e in &parsed.entries {
        assert!(
            e.line > last && e.line <= lines,
            "line {} after {last}",
            e.line
        );
        last = e.line;
        assert!(!e.key.is_empty(), "empty key");
        assert!(!e.key.contains('='), "key {:?}", e.key);
        assert_eq!(e.key, e.key.trim(), "key not trimmed");
        assert_eq!(e.key, e.key.to_ascii_lowercase(), "key not lower case");
        assert_eq!(e.section, e.section.trim(), "section not trimmed");
        assert_eq!(e.section, e.section.to_ascii_lowercase());
        if let Some(v) = &e.value {
            assert_eq!(v, v.trim(), "value not trimmed");
        }
    }
    for w in &parsed.warnings {
        assert_one_line("warning", w);
        assert!(w.starts_with("line "), "{w:?}");
    }
    let again = ini::parse(&write_out(&parsed.entries));
    assert_eq!(
        triples(&again.entries),
        triples(&parsed.entries),
        "entries written out read back differently"
    );
    assert!(again.warnings.is_empty(), "{:?}", again.warnings);
}

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    check_ini(&text);

    let mut config = Config::default();
    match apply_file(&mut config, "f", &text) {
        Ok(()) => {
            check_config(&config);
            let once = config.clone();
            apply_file(&mut config, "f", &text).expect("the same file twice");
            assert_eq!(
                Config {
                    warnings: Vec::new(),
                    ..config
                },
                Config {
                    warnings: Vec::new(),
                    ..once
                },
                "applying the file again changed the configuration"
            );
        }
        Err(e) => {
            check_error(&e);
            assert!(e.to_string().starts_with("config f: line "), "{e}");
        }
    }
});
