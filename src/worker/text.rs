//! Turning generated tokens into the text a stream may send: whole UTF-8
//! characters only, nothing that might turn out to be a stop sequence, and
//! always whole tokens — a token's text goes out complete or not at all, so
//! every event names exactly the tokens it carries (their `ids`), which is
//! what a failover resumes from (DESIGN.md §11).

/// What may be sent after a token arrives (or when generation ends).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Released {
    pub text: String,
    /// The tokens `text` is made of; with `stopped`, also those that made the
    /// stop sequence, which never become text.
    pub ids: Vec<i32>,
    /// A stop sequence was found: `text` is everything before it, and generation ends.
    pub stopped: bool,
}

/// The generated tokens not sent yet, and the stop sequences to look for.
///
/// Held back: tokens that end inside a UTF-8 character (an emoji split over
/// two tokens), and tokens whose text could be the start of a stop sequence.
/// Text already sent never ends with the start of a stop sequence, so a stop
/// always begins in the held text. Bytes that can never be UTF-8 become U+FFFD.
#[derive(Debug, Default)]
pub struct TokenText {
    stops: Vec<String>,
    held: Vec<(i32, Vec<u8>)>,
}

impl TokenText {
    pub fn new(stops: Vec<String>) -> TokenText {
        TokenText {
            stops: stops.into_iter().filter(|s| !s.is_empty()).collect(),
            held: Vec::new(),
        }
    }

    /// Takes token `id` with its bytes; what can go out now.
    pub fn push(&mut self, id: i32, bytes: &[u8]) -> Released {
        self.held.push((id, bytes.to_vec()));
        let all: Vec<u8> = self
            .held
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        if ends_inside_a_character(&all) {
            return Released::default();
        }
        let text = String::from_utf8_lossy(&all).into_owned();
        if let Some(at) = self
            .stops
            .iter()
            .filter_map(|s| text.find(s.as_str()))
            .min()
        {
            let ids = self.held.drain(..).map(|(id, _)| id).collect();
            return Released {
                text: text[..at].to_string(),
                ids,
                stopped: true,
            };
        }
        let hold = self
            .stops
            .iter()
            .map(|s| longest_suffix_that_prefixes(&text, s))
            .max()
            .unwrap_or(0);
        // The most whole tokens whose text ends before the part that may be a stop.
        let free_up_to = text.len() - hold;
        let mut cut = (0, 0);
        let mut bytes = 0;
        for (n, (_, b)) in self.held.iter().enumerate() {
            bytes += b.len();
            let prefix = &all[..bytes];
            if ends_inside_a_character(prefix) {
                continue;
            }
            if String::from_utf8_lossy(prefix).len() > free_up_to {
                break;
            }
            cut = (n + 1, bytes);
        }
        let released: Vec<(i32, Vec<u8>)> = self.held.drain(..cut.0).collect();
        Released {
            text: String::from_utf8_lossy(&all[..cut.1]).into_owned(),
            ids: released.into_iter().map(|(id, _)| id).collect(),
            stopped: false,
        }
    }

    /// Everything held when generation ends for another reason (`max_tokens`,
    /// the end of the context, a cancel), less the first bytes of a character
    /// the cut left unfinished: an answer ends in whole characters, never in a
    /// U+FFFD that the model did not write. Its tokens are named all the same.
    pub fn finish(&mut self) -> Released {
        let all: Vec<u8> = self
            .held
            .iter()
            .flat_map(|(_, b)| b.iter().copied())
            .collect();
        Released {
            text: String::from_utf8_lossy(&all[..whole_characters(&all)]).into_owned(),
            ids: self.held.drain(..).map(|(id, _)| id).collect(),
            stopped: false,
        }
    }
}

/// How many of `bytes` come before a character left unfinished at their end
/// (all of them when none is).
fn whole_characters(bytes: &[u8]) -> usize {
    let mut at = 0;
    loop {
        match std::str::from_utf8(&bytes[at..]) {
            Ok(_) => return bytes.len(),
            Err(e) => match e.error_len() {
                None => return at + e.valid_up_to(),
                Some(bad) => at += e.valid_up_to() + bad,
            },
        }
    }
}

/// Whether `bytes` end with the first bytes of a character still to come.
fn ends_inside_a_character(bytes: &[u8]) -> bool {
    whole_characters(bytes) < bytes.len()
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

    /// Pushes pieces as tokens 0, 1, 2…: the text and ids of each release.
    fn run(stops: &[&str], pieces: &[&[u8]]) -> Vec<(String, Vec<i32>, bool)> {
        let mut t = TokenText::new(stops.iter().map(|s| s.to_string()).collect());
        pieces
            .iter()
            .enumerate()
            .map(|(i, p)| {
                let r = t.push(i as i32, p);
                (r.text, r.ids, r.stopped)
            })
            .collect()
    }

    fn out(text: &str, ids: &[i32]) -> (String, Vec<i32>, bool) {
        (text.to_string(), ids.to_vec(), false)
    }

    #[test]
    fn a_character_split_across_tokens_waits_for_its_rest() {
        let crab = "🦀".as_bytes();
        let released = run(&[], &[b"hi ", &crab[..1], &crab[1..3], &[crab[3], b'!']]);
        assert_eq!(
            released,
            [
                out("hi ", &[0]),
                out("", &[]),
                out("", &[]),
                out("🦀!", &[1, 2, 3])
            ]
        );
    }

    #[test]
    fn invalid_bytes_become_replacement_characters() {
        let mut t = TokenText::new(Vec::new());
        assert_eq!(t.push(0, b"a\xffb").text, "a\u{fffd}b");
        assert_eq!(t.push(1, b"\xfe").text, "\u{fffd}");
    }

    #[test]
    fn an_answer_cut_inside_a_character_ends_before_it() {
        // max_tokens after the first of a tree emoji's two tokens: no U+FFFD.
        let tree = "🌳".as_bytes();
        let mut t = TokenText::new(Vec::new());
        assert_eq!(t.push(0, tree).text, "🌳");
        assert_eq!(t.push(1, &tree[..2]).text, "");
        assert_eq!(
            t.finish(),
            Released {
                text: String::new(),
                ids: vec![1],
                stopped: false
            }
        );
        // Invalid bytes before the unfinished character still show.
        let mut t = TokenText::new(Vec::new());
        assert_eq!(t.push(0, b"ok").text, "ok");
        assert_eq!(t.push(1, &[b'!', 0xff, 0xe2, 0x82]).text, "");
        assert_eq!(t.finish().text, "!\u{fffd}");
    }

    #[test]
    fn stop_sequence_across_tokens_is_cut_and_not_sent() {
        let released = run(&["\n\nUser:"], &[b"Hello", b" there\n", b"\nUs", b"er: hi"]);
        assert_eq!(released[0], out("Hello", &[0]));
        // " there\n" may start the stop: the whole token waits.
        assert_eq!(released[1], out("", &[]));
        assert_eq!(released[2], out("", &[]));
        assert_eq!(released[3], (" there".to_string(), vec![1, 2, 3], true));
    }

    #[test]
    fn held_tokens_that_do_not_become_a_stop_go_out_whole() {
        let mut t = TokenText::new(vec!["END".into()]);
        assert_eq!(t.push(0, b"the E").text, "");
        let r = t.push(1, b"Nd");
        assert_eq!((r.text.as_str(), r.ids), ("the ENd", vec![0, 1]));
        assert_eq!(t.push(2, b"EN").text, "");
        assert_eq!(
            t.finish(),
            Released {
                text: "EN".into(),
                ids: vec![2],
                stopped: false
            }
        );
    }

    #[test]
    fn tokens_before_a_possible_stop_go_out_at_once() {
        let released = run(&["world"], &[b"hello", b" wor"]);
        assert_eq!(released, [out("hello", &[0]), out("", &[])]);
        // Held together, then the first can go alone.
        let mut t2 = TokenText::new(vec!["xy".into()]);
        assert_eq!(t2.push(0, b"ax").text, "");
        let r = t2.push(1, b"bx");
        assert_eq!((r.text.as_str(), r.ids), ("ax", vec![0]));
    }

    #[test]
    fn the_earliest_of_several_stops_wins() {
        let released = run(&["c", "ab"], &[b"xabc"]);
        assert_eq!(released, [("x".to_string(), vec![0], true)]);
    }

    #[test]
    fn no_stops_hold_nothing() {
        assert_eq!(run(&[""], &[b"abc"]), [out("abc", &[0])]);
    }

    #[test]
    fn holding_respects_character_boundaries() {
        let released = run(&["éx"], &["aé".as_bytes(), b"y"]);
        assert_eq!(released, [out("", &[]), out("aéy", &[0, 1])]);
    }
}
