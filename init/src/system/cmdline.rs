//! The kernel command line: `cloudlet.*` keys set by boot.scr.

use std::collections::BTreeMap;

/// `key=value` and bare `key` words (bare keys map to "").
pub fn parse(text: &str) -> BTreeMap<String, String> {
    text.split_whitespace()
        .map(|w| match w.split_once('=') {
            Some((k, v)) => (k.to_owned(), v.to_owned()),
            None => (w.to_owned(), String::new()),
        })
        .collect()
}

pub fn read() -> BTreeMap<String, String> {
    std::fs::read_to_string("/proc/cmdline")
        .map(|t| parse(&t))
        .unwrap_or_default()
}

#[cfg(test)]
#[allow(clippy::indexing_slicing)]
mod tests {
    #[test]
    fn parses_keys_and_flags() {
        let m = super::parse("console=ttyAMA0 quiet cloudlet.slot=B cloudlet.tries=2\n");
        assert_eq!(m["cloudlet.slot"], "B");
        assert_eq!(m["quiet"], "");
        assert_eq!(m["console"], "ttyAMA0");
    }
}
