//! Turning generated token bytes into the text a stream may send: whole UTF-8
//! characters only, and nothing that might turn out to be a stop sequence.

/// Collects token bytes and hands out only complete UTF-8 characters. A token
/// may end in the middle of a multi-byte character (emoji, CJK); its tail waits
/// for the next token. Bytes that can never become valid UTF-8 become U+FFFD.
#[derive(Debug, Default)]
pub struct Utf8Assembler {
    pending: Vec<u8>,
}

impl Utf8Assembler {
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        loop {
            match std::str::from_utf8(&self.pending) {
                Ok(s) => {
                    out.push_str(s);
                    self.pending.clear();
                    return out;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    // Checked just above by from_utf8.
                    out.push_str(std::str::from_utf8(&self.pending[..valid]).unwrap_or_default());
                    match e.error_len() {
                        // An incomplete character at the end: keep it for later.
                        None => {
                            self.pending.drain(..valid);
                            return out;
                        }
                        Some(bad) => {
                            out.push(char::REPLACEMENT_CHARACTER);
                            self.pending.drain(..valid + bad);
                        }
                    }
                }
            }
        }
    }

    /// Whatever is left when generation ends, however incomplete.
    pub fn finish(&mut self) -> String {
        let out = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        out
    }
}

/// Holds back text that could be the start of a stop sequence, and finds the
/// stop sequence when it completes (possibly across several tokens).
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

/// What may be sent after a piece of text arrives.
#[derive(Debug, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// A stop sequence was found: `text` is everything before it, and generation ends.
    pub stopped: bool,
}

impl StopMatcher {
    pub fn new(stops: Vec<String>) -> StopMatcher {
        StopMatcher {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            pending: String::new(),
        }
    }

    pub fn push(&mut self, text: &str) -> Released {
        self.pending.push_str(text);
        let first_stop = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(at) = first_stop {
            self.pending.truncate(at);
            return Released {
                text: std::mem::take(&mut self.pending),
                stopped: true,
            };
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_that_prefixes(&self.pending, s))
            .max()
            .unwrap_or(0);
        let keep_from = self.pending.len() - hold;
        let rest = self.pending.split_off(keep_from);
        Released {
            text: std::mem::replace(&mut self.pending, rest),
            stopped: false,
        }
    }

    /// Text held back when generation ends for another reason.
    pub fn finish(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// Length in bytes of the longest suffix of `text` that is a proper prefix of `stop`.
fn longest_suffix_that_prefixes(text: &str, stop: &str) -> usize {
    let max = text.len().min(stop.len().saturating_sub(1));
    (1..=max)
        .rev()
        .find(|&n| {
            let start = text.len() - n;
            text.is_char_boundary(start) && stop.starts_with(&text[start..])
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_character_split_across_tokens_waits_for_its_rest() {
        let crab = "🦀".as_bytes();
        let mut a = Utf8Assembler::default();
        assert_eq!(a.push(b"hi "), "hi ");
        assert_eq!(a.push(&crab[..1]), "");
        assert_eq!(a.push(&crab[1..3]), "");
        assert_eq!(a.push(&[crab[3], b'!']), "🦀!");
        assert_eq!(a.finish(), "");
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut a = Utf8Assembler::default();
        assert_eq!(a.push(b"a\xffb"), "a\u{fffd}b");
        assert_eq!(a.push(&"é".as_bytes()[..1]), "");
        assert_eq!(a.finish(), "\u{fffd}");
    }

    #[test]
    fn stop_sequence_across_pieces_is_cut_and_not_sent() {
        let mut m = StopMatcher::new(vec!["\n\nUser:".into()]);
        assert_eq!(m.push("Hello").text, "Hello");
        assert_eq!(m.push(" there\n").text, " there");
        assert_eq!(m.push("\nUs").text, "");
        let r = m.push("er: hi");
        assert_eq!(
            r,
            Released {
                text: String::new(),
                stopped: true
            }
        );
    }

    #[test]
    fn held_text_that_does_not_become_a_stop_is_released() {
        let mut m = StopMatcher::new(vec!["END".into()]);
        assert_eq!(m.push("the E").text, "the ");
        assert_eq!(m.push("Nd").text, "ENd");
        assert_eq!(m.push("EN").text, "");
        assert_eq!(m.finish(), "EN");
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let mut m = StopMatcher::new(vec!["c".into(), "ab".into()]);
        let r = m.push("xabc");
        assert_eq!(
            r,
            Released {
                text: "x".into(),
                stopped: true
            }
        );
    }

    #[test]
    fn no_stops_hold_nothing() {
        let mut m = StopMatcher::new(vec![String::new()]);
        assert_eq!(m.push("abc").text, "abc");
    }

    #[test]
    fn holding_respects_character_boundaries() {
        let mut m = StopMatcher::new(vec!["éx".into()]);
        assert_eq!(m.push("aé").text, "a");
        assert_eq!(m.push("y").text, "éy");
    }
}
