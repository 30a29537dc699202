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
    check_tokens(gbnf)?;
    // What does not parse here, llama.cpp's parser refuses with its reason.
    if let Some(rules) = Parser::new(gbnf).rules() {
        repeats_of_nothing(&rules)?;
    }
    Ok(())
}

/// Repetitions and character classes, read token by token.
fn check_tokens(gbnf: &str) -> Result<(), String> {
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

/// One element of a sequence, as far as matching nothing goes.
#[derive(Debug, Clone)]
enum Item {
    /// A literal, a class, `.`, a token: matches at least one character,
    /// unless it is the empty literal.
    Atom {
        empty: bool,
    },
    Rule(String),
    Group(Vec<Vec<Item>>),
    /// An item repeated `min` to `max` times (`*` is 0 to unbounded).
    Repeat {
        item: Box<Item>,
        min: u64,
        max: Option<u64>,
        shown: String,
    },
}

/// A reader of GBNF's structure (rules, alternates, sequences, repetitions),
/// enough to see what may match nothing.
struct Parser<'a> {
    s: &'a [u8],
    at: usize,
}

impl<'a> Parser<'a> {
    fn new(text: &'a str) -> Parser<'a> {
        Parser {
            s: text.as_bytes(),
            at: 0,
        }
    }

    fn peek(&self) -> Option<u8> {
        self.s.get(self.at).copied()
    }

    /// Blanks and comments; newlines too when `newlines` (inside a group).
    fn space(&mut self, newlines: bool) {
        while let Some(c) = self.peek() {
            match c {
                b' ' | b'\t' => self.at += 1,
                b'\r' | b'\n' if newlines => self.at += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n' && c != b'\r') {
                        self.at += 1;
                    }
                }
                _ => break,
            }
        }
    }

    fn name(&mut self) -> Option<String> {
        let start = self.at;
        while self
            .peek()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            self.at += 1;
        }
        (self.at > start).then(|| String::from_utf8_lossy(&self.s[start..self.at]).into_owned())
    }

    /// Every rule, or `None` where the text is not GBNF as read here.
    fn rules(mut self) -> Option<std::collections::HashMap<String, Vec<Vec<Item>>>> {
        let mut rules = std::collections::HashMap::new();
        loop {
            self.space(true);
            if self.peek().is_none() {
                return Some(rules);
            }
            let name = self.name()?;
            self.space(false);
            if !self.s[self.at..].starts_with(b"::=") {
                return None;
            }
            self.at += 3;
            self.space(true);
            let alternates = self.alternates(false)?;
            rules.insert(name, alternates);
        }
    }

    fn alternates(&mut self, nested: bool) -> Option<Vec<Vec<Item>>> {
        let mut all = vec![self.sequence(nested)?];
        while self.peek() == Some(b'|') {
            self.at += 1;
            self.space(true);
            all.push(self.sequence(nested)?);
        }
        Some(all)
    }

    fn sequence(&mut self, nested: bool) -> Option<Vec<Item>> {
        let mut items = Vec::new();
        loop {
            let start = self.at;
            let item = match self.peek() {
                Some(b'"') => {
                    let end = skip_literal(self.s, self.at + 1);
                    self.at = end;
                    Item::Atom {
                        empty: end == start + 2,
                    }
                }
                Some(b'[') => {
                    self.at += 1;
                    while let Some(c) = self.peek() {
                        self.at += if c == b'\\' { 2 } else { 1 };
                        if c == b']' {
                            break;
                        }
                    }
                    Item::Atom { empty: false }
                }
                Some(b'.') => {
                    self.at += 1;
                    Item::Atom { empty: false }
                }
                Some(b'<') | Some(b'!') => {
                    while self.peek().is_some_and(|c| c != b'>') {
                        self.at += 1;
                    }
                    self.at += 1;
                    Item::Atom { empty: false }
                }
                Some(b'(') => {
                    self.at += 1;
                    self.space(true);
                    let group = self.alternates(true)?;
                    if self.peek() != Some(b')') {
                        return None;
                    }
                    self.at += 1;
                    Item::Group(group)
                }
                Some(c) if c.is_ascii_alphanumeric() || c == b'-' || c == b'_' => {
                    // A name followed by `::=` starts the next rule.
                    let save = self.at;
                    let name = self.name()?;
                    let mut ahead = Parser {
                        s: self.s,
                        at: self.at,
                    };
                    ahead.space(false);
                    if ahead.s[ahead.at..].starts_with(b"::=") {
                        self.at = save;
                        return Some(items);
                    }
                    Item::Rule(name)
                }
                _ => return Some(items),
            };
            self.space(nested);
            let mut item = item;
            while let Some((min, max)) = self.quantifier() {
                let shown = String::from_utf8_lossy(&self.s[start..self.at])
                    .trim()
                    .to_string();
                item = Item::Repeat {
                    item: Box::new(item),
                    min,
                    max,
                    shown,
                };
                self.space(nested);
            }
            items.push(item);
        }
    }

    /// `*`, `+`, `?` or `{m}`, `{m,}`, `{m,n}` at the cursor.
    fn quantifier(&mut self) -> Option<(u64, Option<u64>)> {
        let q = match self.peek()? {
            b'*' => (0, None),
            b'+' => (1, None),
            b'?' => (0, Some(1)),
            b'{' => {
                let close = self.s[self.at..].iter().position(|&c| c == b'}')?;
                let inner =
                    String::from_utf8_lossy(&self.s[self.at + 1..self.at + close]).into_owned();
                let counts: Vec<&str> = inner.split(',').map(str::trim).collect();
                let q = match counts[..] {
                    [m] => (m.parse().ok()?, Some(m.parse().ok()?)),
                    [m, ""] => (m.parse().ok()?, None),
                    [m, n] => (m.parse().ok()?, Some(n.parse().ok()?)),
                    _ => return None,
                };
                self.at += close;
                q
            }
            _ => return None,
        };
        self.at += 1;
        Some(q)
    }
}

/// Refuses a repetition of something that can match nothing (`(x*)*`,
/// `x*{2000}`, `(a?)+`): llama.cpp's matcher follows every way of spreading
/// the text over the repeats, and stalls the engine for minutes on it.
fn repeats_of_nothing(
    rules: &std::collections::HashMap<String, Vec<Vec<Item>>>,
) -> Result<(), String> {
    // Which rules can match nothing: a fixed point from "none".
    let mut nullable = std::collections::HashSet::new();
    loop {
        let before = nullable.len();
        for (name, alternates) in rules {
            if alternates
                .iter()
                .any(|seq| seq.iter().all(|i| empty(i, &nullable)))
            {
                nullable.insert(name.clone());
            }
        }
        if nullable.len() == before {
            break;
        }
    }
    fn walk(item: &Item, nullable: &std::collections::HashSet<String>) -> Result<(), String> {
        match item {
            Item::Repeat {
                item: inner,
                max,
                shown,
                ..
            } => {
                if max.is_none_or(|m| m > 1) && empty(inner, nullable) {
                    return Err(format!(
                        "{shown} repeats something that can match nothing; llama.cpp's matcher \
                         would try every way of spreading the text over the repeats: make the \
                         repeated part match at least one character"
                    ));
                }
                walk(inner, nullable)
            }
            Item::Group(alternates) => alternates
                .iter()
                .flatten()
                .try_for_each(|i| walk(i, nullable)),
            _ => Ok(()),
        }
    }
    rules
        .values()
        .flatten()
        .flatten()
        .try_for_each(|i| walk(i, &nullable))
}

/// Whether an item can match the empty text, given the rules that can.
fn empty(item: &Item, nullable: &std::collections::HashSet<String>) -> bool {
    match item {
        Item::Atom { empty } => *empty,
        Item::Rule(name) => nullable.contains(name),
        Item::Group(alternates) => alternates
            .iter()
            .any(|seq| seq.iter().all(|i| empty(i, nullable))),
        Item::Repeat { item, min, .. } => *min == 0 || empty(item, nullable),
    }
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
    check_counts(&text[start + 1..start + len])?;
    Ok(start + len + 1)
}

/// Checks what is between the braces of `{m,n}` (in a grammar, or in a
/// schema's regex, which the converter copies into one): n at least m.
pub fn check_counts(inner: &str) -> Result<(), String> {
    let counts: Vec<&str> = inner.split(',').map(str::trim).collect();
    if let [min, max] = counts[..] {
        if let (Ok(lo), Ok(hi)) = (min.parse::<u64>(), max.parse::<u64>()) {
            if hi < lo {
                return Err(format!(
                    "the repetition {{{inner}}} asks for at least {lo} and at most {hi}"
                ));
            }
        }
    }
    Ok(())
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
            // What the converter writes for an object: `space` can be empty, but is never repeated.
            "root ::= \"{\" space (kv (\",\" space kv)*)? \"}\" space\nkv ::= [a-z]+ \":\" space value\nvalue ::= [0-9]+ | \"null\"\nspace ::= | \" \" | \"\\n\" [ \\t]{0,20}",
            "root ::= (\"a\"+)? (\"b\" | \"c\")*",
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
        for g in [
            "root ::= item+\nitem ::= \"(\" [^()]* {2000}\")\"",
            "root ::= (\"a\"*)*",
            "root ::= (\"a\"? | \"b\")+",
            "root ::= x{3,}\nx ::= y \"\"\ny ::= [a-z]*",
        ] {
            let e = check(g).unwrap_err();
            assert!(
                e.contains("repeats something that can match nothing"),
                "{g}: {e}"
            );
        }
        let big = format!("root ::= \"{}\"", "a".repeat(MAX_BYTES));
        assert!(check(&big).unwrap_err().contains("at most 128 KiB"));
    }
}
