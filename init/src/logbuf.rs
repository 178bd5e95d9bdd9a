//! A bounded buffer of a service's output lines. It lives in init, so it
//! outlives the service: the lines before a crash are still there after it.

use std::collections::VecDeque;

/// Longest line kept; longer lines are cut (marked with `…`).
pub const MAX_LINE: usize = 1024;

#[derive(Debug)]
pub struct LogBuf {
    lines: VecDeque<String>,
    cap: usize,
    partial: Vec<u8>,
}

impl LogBuf {
    pub fn new(cap: usize) -> LogBuf {
        LogBuf {
            lines: VecDeque::with_capacity(cap.min(64)),
            cap: cap.max(1),
            partial: Vec::new(),
        }
    }

    /// Adds a line as is (init's own notes about the service).
    pub fn push_line(&mut self, line: String) {
        if self.lines.len() == self.cap {
            self.lines.pop_front();
        }
        self.lines.push_back(line);
    }

    /// Adds raw output; complete lines are stored, a trailing partial line waits for more.
    pub fn push_bytes(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if b == b'\n' {
                self.flush_partial();
            } else if self.partial.len() < MAX_LINE {
                self.partial.push(b);
            } else if self.partial.len() == MAX_LINE {
                self.partial.extend_from_slice("…".as_bytes());
            }
        }
    }

    /// Stores a pending partial line (the writer closed its end).
    pub fn flush_partial(&mut self) {
        let line = String::from_utf8_lossy(&self.partial).into_owned();
        self.partial.clear();
        self.push_line(line);
    }

    pub fn has_partial(&self) -> bool {
        !self.partial.is_empty()
    }

    /// The last `n` lines (all of them when `None`).
    pub fn tail(&self, n: Option<usize>) -> Vec<String> {
        let n = n.unwrap_or(self.lines.len()).min(self.lines.len());
        self.lines
            .iter()
            .skip(self.lines.len().saturating_sub(n))
            .cloned()
            .collect()
    }
}

#[cfg(test)]
#[allow(
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::arithmetic_side_effects
)]
mod tests {
    use super::*;

    #[test]
    fn keeps_the_last_lines_only() {
        let mut b = LogBuf::new(3);
        b.push_bytes(b"one\ntwo\nthr");
        b.push_bytes(b"ee\nfour\n");
        assert_eq!(b.tail(None), ["two", "three", "four"]);
        assert_eq!(b.tail(Some(1)), ["four"]);
        assert_eq!(b.tail(Some(10)).len(), 3);
    }

    #[test]
    fn cuts_long_lines_and_survives_bad_utf8() {
        let mut b = LogBuf::new(10);
        b.push_bytes(&vec![b'x'; 5000]);
        b.push_bytes(b"\n\xff\xfe ok\n");
        let t = b.tail(None);
        assert!(t[0].len() <= MAX_LINE + 3 && t[0].ends_with('…'));
        assert!(t[1].ends_with(" ok"));
    }

    #[test]
    fn partial_line_is_kept_on_flush() {
        let mut b = LogBuf::new(2);
        b.push_bytes(b"no newline");
        assert!(b.has_partial());
        b.flush_partial();
        assert_eq!(b.tail(None), ["no newline"]);
    }
}
