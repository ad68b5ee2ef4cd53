//! Stop strings: text is held back only while it could still become a stop string, released
//! as soon as it cannot, and cut just before the first stop string that completes.

use crate::error::{Error, Result};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StopOutcome {
    /// Text that can be shown now (possibly empty while a match is pending).
    Continue(String),
    /// A stop string completed: this is the text before it; generation ends.
    Stopped(String),
}

#[derive(Debug, Clone, Default)]
pub struct StopStrings {
    stops: Vec<String>,
    held: String,
}

impl StopStrings {
    pub fn new(stops: Vec<String>) -> Result<Self> {
        if stops.iter().any(String::is_empty) {
            return Err(Error::invalid_argument(
                "stop",
                "''",
                "Stop strings must not be empty",
            ));
        }
        Ok(Self {
            stops,
            held: String::new(),
        })
    }

    pub fn push(&mut self, text: String) -> StopOutcome {
        // Without stop strings the text passes through untouched: no copy per token.
        if self.stops.is_empty() {
            return StopOutcome::Continue(text);
        }
        self.held.push_str(&text);
        // Any stop string lies wholly inside `held`: text is released only once no suffix
        // of it can begin a stop string.
        let first_match = self
            .stops
            .iter()
            .filter_map(|stop| self.held.find(stop.as_str()))
            .min();
        if let Some(at) = first_match {
            let before = self.held[..at].to_string();
            self.held.clear();
            return StopOutcome::Stopped(before);
        }
        let keep = self.pending_suffix_len();
        let release = self.held.len() - keep;
        let out = self.held[..release].to_string();
        self.held.drain(..release);
        StopOutcome::Continue(out)
    }

    /// Generation ended without a match: whatever was held back is ordinary text.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.held)
    }

    /// Bytes at the end of `held` that are a proper prefix of some stop string.
    fn pending_suffix_len(&self) -> usize {
        self.held
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| {
                let tail = &self.held[i..];
                self.stops.iter().any(|stop| stop.starts_with(tail))
            })
            .map_or(0, |i| self.held.len() - i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(stops: &[&str], pieces: &[&str]) -> (Vec<String>, bool) {
        let mut s = StopStrings::new(stops.iter().map(|s| s.to_string()).collect()).unwrap();
        let mut out = Vec::new();
        for piece in pieces {
            match s.push(piece.to_string()) {
                StopOutcome::Continue(t) => out.push(t),
                StopOutcome::Stopped(t) => {
                    out.push(t);
                    return (out, true);
                }
            }
        }
        out.push(s.finish());
        (out, false)
    }

    #[test]
    fn stop_across_pieces_never_leaks() {
        let (out, stopped) = run(&["###"], &["Hello #", "#", "# tail"]);
        assert!(stopped);
        assert_eq!(out.concat(), "Hello ");
        assert_eq!(out, ["Hello ", "", ""]);
    }

    #[test]
    fn held_text_is_released_when_the_match_fails() {
        let (out, stopped) = run(&["\n\n"], &["a\n", "b", "\n"]);
        assert!(!stopped);
        assert_eq!(out, ["a", "\nb", "", "\n"]);
    }

    #[test]
    fn earliest_of_several_stops_wins_and_utf8_is_respected() {
        let (out, stopped) = run(&["Ω!", "βγ"], &["αβ", "γ Ω!"]);
        assert!(stopped);
        assert_eq!(out.concat(), "α");
    }

    #[test]
    fn stop_at_the_very_start_and_empty_stop_rejected() {
        let (out, stopped) = run(&["Hi"], &["Hi there"]);
        assert!(stopped && out.concat().is_empty());
        assert!(StopStrings::new(vec![String::new()]).is_err());
    }
}
