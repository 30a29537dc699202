//! Which worker last served a conversation: prompts are hashed a block at a
//! time, and each prefix's hash remembers the worker (URL) that last read it,
//! so the next turn goes back to the worker holding its cache.

use std::collections::{HashMap, VecDeque};

/// Conversation prefixes remembered for routing, most recent kept.
const AFFINITY_ENTRIES: usize = 65_536;
/// Bytes per prefix block: prompts are matched a block at a time.
pub const PREFIX_BLOCK: usize = 256;

/// The hashes of a prompt's leading blocks: the first covers one block, the
/// next two, and so on (whole blocks only). Two prompts share their first
/// k hashes exactly when they share their first k blocks.
pub fn prefix_hashes(text: &str) -> Vec<u64> {
    use std::hash::Hasher;
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    text.as_bytes()
        .chunks_exact(PREFIX_BLOCK)
        .map(|block| {
            hasher.write(block);
            hasher.finish()
        })
        .collect()
}

/// Prefix hash → the worker (URL) that last served it, bounded, oldest forgotten first.
#[derive(Default)]
pub struct Affinity {
    owner: HashMap<u64, String>,
    order: VecDeque<u64>,
}

impl Affinity {
    pub fn lookup(&self, prefix: &[u64]) -> Option<String> {
        prefix.iter().rev().find_map(|h| self.owner.get(h).cloned())
    }

    pub fn insert(&mut self, prefix: &[u64], url: &str) {
        for h in prefix {
            if self.owner.insert(*h, url.to_string()).is_none() {
                self.order.push_back(*h);
            }
        }
        while self.order.len() > AFFINITY_ENTRIES {
            if let Some(old) = self.order.pop_front() {
                self.owner.remove(&old);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompts_share_hashes_exactly_as_far_as_they_share_blocks() {
        let doc = "x".repeat(PREFIX_BLOCK * 3);
        let turn1 = format!("{doc}question one");
        let turn2 = format!("{doc}question one, answer, question two{}", "y".repeat(300));
        let (a, b) = (prefix_hashes(&turn1), prefix_hashes(&turn2));
        assert_eq!(a.len(), 3);
        assert_eq!(b.len(), 4);
        assert_eq!(a[..3], b[..3]);
        let other = prefix_hashes(&format!("z{}", &doc[1..]));
        assert_ne!(other[0], a[0]);
        assert!(prefix_hashes("short").is_empty());
    }

    #[test]
    fn the_longest_remembered_prefix_wins() {
        let mut affinity = Affinity::default();
        affinity.insert(&[1, 2], "http://w1");
        affinity.insert(&[1, 2, 3], "http://w2");
        assert_eq!(affinity.lookup(&[1, 2, 3, 4]).as_deref(), Some("http://w2"));
        affinity.insert(&[1, 5], "http://w1");
        assert_eq!(affinity.lookup(&[1, 5]).as_deref(), Some("http://w1"));
        assert_eq!(affinity.lookup(&[9]), None);
    }
}
