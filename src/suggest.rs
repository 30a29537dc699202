//! "Did you mean": the known name closest to a mistyped one. The one place
//! both the command line and the queen's unknown-model error ask.

/// The candidate closest to `word` by edits, if it is close enough to be a
/// typo (two edits, or a third of the word, whichever is more). A word that
/// is (nearly) the start of a longer name counts as one edit more than its
/// distance from that start: `smolm` finds `smollm2-135m-instruct.q4_1`.
pub fn nearest<'a>(word: &str, candidates: impl IntoIterator<Item = &'a str>) -> Option<&'a str> {
    let limit = (word.trim_start_matches('-').chars().count() / 3).max(2);
    let n = word.chars().count();
    let distance = |c: &str| {
        let start: String = c.chars().take(n).collect();
        let as_start = if c.chars().count() > n + 1 {
            edits(word, &start) + 1
        } else {
            usize::MAX
        };
        edits(word, c).min(as_start)
    };
    candidates
        .into_iter()
        .map(|c| (distance(c), c))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

/// Levenshtein distance, by characters.
pub fn edits(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_typo_finds_its_name_and_a_stranger_finds_none() {
        assert_eq!(edits("kepper", "keeper"), 1);
        assert_eq!(edits("", "ab"), 2);
        let models = ["smollm2-135m-instruct.q4_1", "llama-3.2-1b.q4_k_m"];
        assert_eq!(
            nearest("smollm2-135m-instruct.q4_2", models),
            Some("smollm2-135m-instruct.q4_1")
        );
        assert_eq!(nearest("mistral", models), None);
        assert_eq!(nearest("smolm", models), Some("smollm2-135m-instruct.q4_1"));
        assert_eq!(nearest("llama", models), Some("llama-3.2-1b.q4_k_m"));
    }
}
