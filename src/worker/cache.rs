//! The prompt cache's bookkeeping (DESIGN.md §9), as pure state with no
//! llama.cpp types, so every decision is unit-tested.
//!
//! The worker's context holds more llama.cpp sequences than it has decoding
//! slots, in one unified KV cache. A request that ends leaves its tokens in
//! its sequence. A new request takes the idle sequence whose tokens share the
//! longest prefix with its prompt, and only the rest of the prompt is decoded.
//! When the best match is only a shared beginning (a system prompt, a document)
//! of another conversation, that prefix is *copied* into a free sequence — in a
//! unified cache a copy shares the KV cells, it moves no data — so both
//! conversations stay cached. Sequences are dropped least recently used first,
//! when a sequence id is needed or when the KV cells run out.
//!
//! The engine applies the [`KvOp`]s of a [`Placement`] to llama.cpp before the
//! request's first decode, and reports back what the KV cache holds when the
//! request ends ([`PromptCache::release`]).

/// A token id, as llama.cpp numbers them.
pub type Token = i32;

/// What one llama.cpp sequence holds.
#[derive(Debug, Clone, Default)]
struct Seq {
    /// The tokens in the KV cache for this sequence, positions 0.., in order.
    tokens: Vec<Token>,
    /// A running request decodes into it; it is neither chosen nor evicted.
    in_use: bool,
    /// When it was last taken or released, for least-recently-used order.
    last_used: u64,
}

/// A change to llama.cpp's KV cache, to apply in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KvOp {
    /// Forget every token of the sequence.
    Clear { seq: usize },
    /// Forget the sequence's tokens from position `from` on.
    Truncate { seq: usize, from: usize },
    /// Make positions `0..len` of `from` part of `to` too (cells are shared).
    CopyPrefix { from: usize, to: usize, len: usize },
}

/// Where a new request decodes, and how much of its prompt is there already.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placement {
    pub seq: usize,
    /// Prompt tokens already in the KV cache of `seq` once `ops` are applied.
    pub reused: usize,
    pub ops: Vec<KvOp>,
}

/// Every sequence of the context and what it holds.
#[derive(Debug)]
pub struct PromptCache {
    seqs: Vec<Seq>,
    /// A logical clock for least-recently-used order.
    clock: u64,
}

impl PromptCache {
    /// `n_seqs` must exceed the number of requests that run at once, so an
    /// idle sequence is always there to take.
    pub fn new(n_seqs: usize) -> PromptCache {
        PromptCache {
            seqs: vec![Seq::default(); n_seqs],
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Takes a sequence for `prompt`. With `reuse`, the idle sequence sharing
    /// the longest prefix; without, a fresh start. At least the prompt's last
    /// token is always left to decode: its logits are the first sample.
    ///
    /// `None` only if every sequence is in use, which the engine prevents.
    pub fn place(&mut self, prompt: &[Token], reuse: bool) -> Option<Placement> {
        let idle: Vec<usize> = (0..self.seqs.len())
            .filter(|&i| !self.seqs[i].in_use)
            .collect();
        let lru = *idle.iter().min_by_key(|&&i| {
            // An empty sequence is the cheapest to take; then the oldest.
            (!self.seqs[i].tokens.is_empty(), self.seqs[i].last_used)
        })?;
        let (best, shared) = idle
            .iter()
            .map(|&i| (i, common_prefix(&self.seqs[i].tokens, prompt)))
            .max_by_key(|&(i, shared)| (shared, std::cmp::Reverse(self.seqs[i].last_used)))
            .filter(|_| reuse)
            .unwrap_or((lru, 0));
        let keep = shared.min(prompt.len().saturating_sub(1));
        let mut ops = Vec::new();
        let seq = if keep == 0 {
            if !self.seqs[lru].tokens.is_empty() {
                ops.push(KvOp::Clear { seq: lru });
            }
            lru
        } else if keep == self.seqs[best].tokens.len() {
            // The whole sequence is the prompt's beginning: extend it.
            best
        } else if lru == best {
            ops.push(KvOp::Truncate {
                seq: best,
                from: keep,
            });
            best
        } else {
            // Keep `best` whole for its own conversation; share its prefix.
            if !self.seqs[lru].tokens.is_empty() {
                ops.push(KvOp::Clear { seq: lru });
            }
            ops.push(KvOp::CopyPrefix {
                from: best,
                to: lru,
                len: keep,
            });
            lru
        };
        let now = self.tick();
        let s = &mut self.seqs[seq];
        s.tokens = prompt[..keep].to_vec();
        s.in_use = true;
        s.last_used = now;
        Some(Placement {
            seq,
            reused: keep,
            ops,
        })
    }

    /// A request has ended: `tokens` is what its sequence now holds in the
    /// KV cache (the prompt as far as it was read, and every generated token
    /// that was decoded).
    pub fn release(&mut self, seq: usize, tokens: Vec<Token>) {
        let now = self.tick();
        if let Some(s) = self.seqs.get_mut(seq) {
            s.tokens = tokens;
            s.in_use = false;
            s.last_used = now;
        }
    }

    /// The sequence's KV content is unknown (a decode failed): it is emptied.
    pub fn forget(&mut self, seq: usize) {
        if let Some(s) = self.seqs.get_mut(seq) {
            s.tokens.clear();
        }
    }

    /// Drops the least recently used idle sequence that holds tokens, to free
    /// KV cells; the engine clears it in llama.cpp. `None`: nothing to drop.
    pub fn evict_lru(&mut self) -> Option<usize> {
        let seq = (0..self.seqs.len())
            .filter(|&i| !self.seqs[i].in_use && !self.seqs[i].tokens.is_empty())
            .min_by_key(|&i| self.seqs[i].last_used)?;
        self.seqs[seq].tokens.clear();
        Some(seq)
    }

    /// Idle sequences holding tokens, and the tokens they hold.
    pub fn cached(&self) -> (usize, usize) {
        self.seqs
            .iter()
            .filter(|s| !s.in_use && !s.tokens.is_empty())
            .fold((0, 0), |(n, t), s| (n + 1, t + s.tokens.len()))
    }
}

/// How many tokens two sequences share from their start.
pub fn common_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cache whose sequences hold these token lists, released in this order.
    fn cache_with(seqs: &[&[Token]], n: usize) -> PromptCache {
        let mut c = PromptCache::new(n);
        for (i, tokens) in seqs.iter().enumerate() {
            c.release(i, tokens.to_vec());
        }
        c
    }

    #[test]
    fn the_next_turn_extends_its_own_conversation() {
        let mut c = cache_with(&[&[1, 2, 3], &[1, 7, 8, 9]], 4);
        let p = c.place(&[1, 7, 8, 9, 10, 11], true).unwrap();
        assert_eq!(
            p,
            Placement {
                seq: 1,
                reused: 4,
                ops: vec![]
            }
        );
    }

    #[test]
    fn the_longest_shared_prefix_wins() {
        let mut c = cache_with(&[&[1, 2], &[1, 2, 3, 4], &[1, 2, 3]], 4);
        let p = c.place(&[1, 2, 3, 4, 5], true).unwrap();
        assert_eq!((p.seq, p.reused), (1, 4));
    }

    #[test]
    fn a_prompt_already_cached_whole_still_decodes_its_last_token() {
        let mut c = cache_with(&[&[1, 2, 3, 4]], 2);
        let p = c.place(&[1, 2, 3, 4], true).unwrap();
        // Truncating seq 0 or sharing into the empty seq 1 both keep 3 tokens;
        // the empty sequence is taken so seq 0 stays whole.
        assert_eq!(p.reused, 3);
        assert_eq!(
            p.ops,
            vec![KvOp::CopyPrefix {
                from: 0,
                to: 1,
                len: 3
            }]
        );
    }

    #[test]
    fn a_prompt_shorter_than_a_cached_one_reuses_its_prefix() {
        let mut c = cache_with(&[&[1, 2, 3, 4, 5, 6]], 1);
        let p = c.place(&[1, 2, 3], true).unwrap();
        assert_eq!(
            p,
            Placement {
                seq: 0,
                reused: 2,
                ops: vec![KvOp::Truncate { seq: 0, from: 2 }]
            }
        );
    }

    #[test]
    fn a_shared_beginning_is_copied_so_both_conversations_stay() {
        // Two conversations on one long document (tokens 1..=5).
        let mut c = cache_with(&[&[1, 2, 3, 4, 5, 10, 11]], 3);
        let p = c.place(&[1, 2, 3, 4, 5, 20], true).unwrap();
        assert_eq!(p.seq, 1);
        assert_eq!(p.reused, 5);
        assert_eq!(
            p.ops,
            vec![KvOp::CopyPrefix {
                from: 0,
                to: 1,
                len: 5
            }]
        );
        // The first conversation is still whole for its next turn.
        c.release(1, vec![1, 2, 3, 4, 5, 20, 21]);
        let next = c.place(&[1, 2, 3, 4, 5, 10, 11, 12], true).unwrap();
        assert_eq!((next.seq, next.reused, next.ops), (0, 7, vec![]));
    }

    #[test]
    fn with_no_match_the_least_recently_used_sequence_is_taken_and_cleared() {
        let mut c = cache_with(&[&[5, 6], &[7, 8], &[9]], 3);
        let p = c.place(&[1, 2, 3], true).unwrap();
        assert_eq!(
            p,
            Placement {
                seq: 0,
                reused: 0,
                ops: vec![KvOp::Clear { seq: 0 }]
            }
        );
    }

    #[test]
    fn an_empty_sequence_is_taken_before_a_cached_one() {
        let mut c = cache_with(&[&[5, 6]], 3);
        let p = c.place(&[1, 2], true).unwrap();
        assert_eq!((p.seq, p.ops), (1, vec![]));
    }

    #[test]
    fn opting_out_starts_fresh_even_when_the_prompt_is_cached() {
        let mut c = cache_with(&[&[1, 2, 3, 4]], 1);
        let p = c.place(&[1, 2, 3, 4, 5], false).unwrap();
        assert_eq!(
            p,
            Placement {
                seq: 0,
                reused: 0,
                ops: vec![KvOp::Clear { seq: 0 }]
            }
        );
    }

    #[test]
    fn sequences_in_use_are_never_chosen_nor_evicted() {
        let mut c = cache_with(&[&[1, 2, 3], &[4]], 2);
        let first = c.place(&[1, 2, 3, 4], true).unwrap();
        assert_eq!(first.seq, 0);
        let second = c.place(&[1, 2, 3, 4], true).unwrap();
        assert_eq!((second.seq, second.reused), (1, 0));
        assert_eq!(c.evict_lru(), None);
        assert_eq!(c.place(&[1], true), None);
        c.release(0, vec![1, 2, 3, 4, 9]);
        assert_eq!(c.evict_lru(), Some(0));
        assert_eq!(c.cached(), (0, 0));
    }

    #[test]
    fn eviction_goes_least_recently_used_first() {
        let mut c = cache_with(&[&[1], &[2], &[3]], 3);
        c.release(0, vec![1, 1]); // used again: now the newest
        assert_eq!(c.evict_lru(), Some(1));
        assert_eq!(c.evict_lru(), Some(2));
        assert_eq!(c.evict_lru(), Some(0));
        assert_eq!(c.evict_lru(), None);
    }

    #[test]
    fn a_cancelled_prefill_leaves_only_what_was_read() {
        let mut c = PromptCache::new(2);
        let p = c.place(&[1, 2, 3, 4, 5, 6], true).unwrap();
        // Cancelled after three tokens were decoded.
        c.release(p.seq, vec![1, 2, 3]);
        assert_eq!(c.cached(), (1, 3));
        let again = c.place(&[1, 2, 3, 4, 5, 6], true).unwrap();
        assert_eq!((again.seq, again.reused, again.ops), (p.seq, 3, vec![]));
    }

    #[test]
    fn a_failed_decode_forgets_the_sequence() {
        let mut c = cache_with(&[&[1, 2, 3]], 1);
        c.forget(0);
        let p = c.place(&[1, 2, 3, 4], true).unwrap();
        assert_eq!((p.reused, p.ops), (0, vec![]));
    }

    #[test]
    fn eight_conversations_interleave_on_sixteen_sequences() {
        let mut c = PromptCache::new(16);
        let doc: Vec<Token> = (1..=50).collect();
        let mut convs: Vec<Vec<Token>> = (0..8)
            .map(|k| [doc.clone(), vec![100 + k]].concat())
            .collect();
        for round in 0..4 {
            for (k, conv) in convs.iter_mut().enumerate() {
                conv.push(1000 + round * 10 + k as Token);
                let p = c.place(conv, true).unwrap();
                if round > 0 {
                    // Everything up to the new message came from the cache.
                    assert_eq!(p.reused, conv.len() - 1, "round {round} conversation {k}");
                }
                // The answer is decoded into the sequence too.
                let mut held = conv.clone();
                held.push(2000);
                conv.push(2000);
                c.release(p.seq, held);
            }
        }
    }
}
