//! What a GBNF grammar may ask of llama.cpp's parser before it is given one.
//!
//! The parser expands `S{m,n}` into `n - m` rules counted in an unsigned
//! integer, so `{3,1}` (from a schema's `a{3,1}` pattern, or `minLength`
//! above `maxLength`) makes it allocate until the machine runs out of memory.
//! Every grammar rbee hands llama.cpp — from a client, or converted from a
//! JSON schema — passes [`check`] first: a bounded size, repetitions whose
//! bounds are in order, character ranges that are not empty. What else the
//! parser refuses it says itself, through the engine's exception boundary.

/// The most grammar text one request may bring: the grammar is parsed and
/// then matched against the vocabulary at every token, so its size is the
/// request's cost (a pydantic model's grammar is a few KiB; an enum of
/// 20,000 strings, ~400 KiB, took the engine 51 s).
pub const MAX_BYTES: usize = 128 * 1024;

/// Checks `gbnf`; the error says what is wrong and where.
pub fn check(gbnf: &str) -> Result<(), String> {
    if gbnf.len() > MAX_BYTES {
        return Err(format!(
            "the grammar is {} KiB; at most {} KiB is taken",
            gbnf.len().div_ceil(1024),
            MAX_BYTES / 1024
        ));
    }
    let s = gbnf.as_bytes();
    let mut i = 0;
    while i < s.len() {
        match s[i] {
            b'#' => {
                while i < s.len() && s[i] != b'\n' && s[i] != b'\r' {
                    i += 1;
                }
            }
            b'"' => i = skip_literal(s, i + 1),
            b'[' => i = check_class(gbnf, i)?,
            b'{' => i = check_repetition(gbnf, i)?,
            _ => i += 1,
        }
    }
    Ok(())
}

/// The index after a string literal's closing quote (its escapes skipped).
fn skip_literal(s: &[u8], mut i: usize) -> usize {
    while i < s.len() {
        match s[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    i
}

/// Checks `{m}`, `{m,}` or `{m,n}` at `start`: `n` at least `m`. Returns
/// the index after it (what is not a well-formed count is the parser's to refuse).
fn check_repetition(text: &str, start: usize) -> Result<usize, String> {
    let Some(len) = text[start..].find('}') else {
        return Ok(start + 1);
    };
    let inner = &text[start + 1..start + len];
    let counts: Vec<&str> = inner.split(',').map(str::trim).collect();
    let number = |c: &str| c.parse::<u64>().ok();
    if let [min, max] = counts[..] {
        if let (Some(lo), Some(hi)) = (number(min), number(max)) {
            if hi < lo {
                return Err(format!(
                    "the repetition {{{inner}}} asks for at least {lo} and at most {hi}"
                ));
            }
        }
    }
    Ok(start + len + 1)
}

/// Checks a character class at `start` (`[a-z]`, `[^"\\]`): no range whose
/// end comes before its start. Returns the index after its `]`.
fn check_class(text: &str, start: usize) -> Result<usize, String> {
    let mut chars = text[start + 1..].char_indices().peekable();
    let mut previous: Option<char> = None;
    while let Some((at, c)) = chars.next() {
        let c = match c {
            ']' => return Ok(start + 1 + at + 1),
            '\\' => match unescape(&mut chars) {
                Some(c) => c,
                None => return Ok(start + 1 + at + 1),
            },
            c => c,
        };
        if c == '-' && previous.is_some() && chars.peek().is_some_and(|&(_, n)| n != ']') {
            let (_, end) = chars.next().unwrap_or((0, ']'));
            let end = if end == '\\' {
                unescape(&mut chars).unwrap_or('\0')
            } else {
                end
            };
            let from = previous.unwrap_or('\0');
            if end < from {
                return Err(format!(
                    "the character range {}-{} is empty: it ends before it starts",
                    from.escape_debug(),
                    end.escape_debug()
                ));
            }
            previous = None;
            continue;
        }
        previous = Some(c);
    }
    Ok(text.len())
}

/// The character an escape after `\` stands for, as llama.cpp reads it.
fn unescape(chars: &mut std::iter::Peekable<std::str::CharIndices>) -> Option<char> {
    let (_, c) = chars.next()?;
    let hex = |chars: &mut std::iter::Peekable<std::str::CharIndices>, n: usize| {
        let digits: String = (0..n)
            .filter_map(|_| chars.next().map(|(_, c)| c))
            .collect();
        u32::from_str_radix(&digits, 16)
            .ok()
            .and_then(char::from_u32)
    };
    match c {
        'x' => hex(chars, 2),
        'u' => hex(chars, 4),
        'U' => hex(chars, 8),
        'n' => Some('\n'),
        'r' => Some('\r'),
        't' => Some('\t'),
        other => Some(other),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grammars_the_converter_writes_pass() {
        for g in [
            r#"root ::= "{" space "\"a\"" space ":" space [a-zA-Z0-9_-]{1,8} "}""#,
            "char ::= [^\"\\\\\\x7F\\x00-\\x1F] | [\\\\] ([\"\\\\bfnrt] | \"u\" [0-9a-fA-F]{4})\nroot ::= char*",
            "root ::= [\\U00000000-\\U0010FFFF]{0,} # any text\n",
            r#"root ::= "{3,1}" [{}] x{2,} x{0,2000}"#,
            r#"root ::= [-a] [a-] "\"" [\]-\]]"#,
        ] {
            assert_eq!(check(g), Ok(()), "{g}");
        }
    }

    #[test]
    fn what_makes_the_parser_allocate_without_bound_is_refused() {
        let e = check(r#"root ::= "a"{3,1}"#).unwrap_err();
        assert!(e.contains("{3,1} asks for at least 3 and at most 1"), "{e}");
        let e = check("root ::= x{ 12 , 4 }").unwrap_err();
        assert!(e.contains("at least 12 and at most 4"), "{e}");
        let e = check("root ::= [z-a]").unwrap_err();
        assert!(e.contains("range z-a is empty"), "{e}");
        let e = check("root ::= [\\x7F-\\x00]").unwrap_err();
        assert!(e.contains("range \\u{7f}-\\0 is empty"), "{e}");
        let big = format!("root ::= \"{}\"", "a".repeat(MAX_BYTES));
        assert!(check(&big).unwrap_err().contains("at most 128 KiB"));
    }
}
