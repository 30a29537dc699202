//! The prompt cache's decisions (DESIGN.md §9), as pure state with no
//! llama.cpp types, so every one is unit-tested.
//!
//! Each decoding slot is one llama.cpp sequence with a KV stream of its own. A
//! request that ends leaves its tokens there (*resident*). A new request goes to
//! the free slot whose resident tokens share the longest prefix with its prompt,
//! and only the rest of the prompt is decoded. A worker remembers more
//! conversations than it has slots: before a slot is given to another
//! conversation, its state is saved to host memory (*saved*, up to a byte
//! budget, least recently used dropped first), and restored into a slot when its
//! conversation comes back.
//!
//! Why not one KV cache shared by more sequences than slots: llama.cpp's
//! attention then reads a sequence's cells at offsets that depend on what other
//! sequences hold, and the summation order changes with them, so the same
//! greedy prompt can give a different answer depending on the traffic before it
//! (seen here: "Earth's" against "world's" at the 7th token). A stream per slot
//! keeps every sequence at cells 0.., exactly as a fresh decode would place it.
//!
//! The engine carries out a [`Placement`]'s [`Step`]s before the request's
//! first decode; `S` is its saved-state type.

/// A token id, as llama.cpp numbers them.
pub type Token = i32;

/// Dropping a resident tail longer than this saves the slot first: it is
/// another conversation, not the stale end of this one's last answer.
const SAVE_TAIL_OVER: usize = 32;

/// What a slot's KV stream holds.
#[derive(Debug, Clone, Default)]
struct Resident {
    tokens: Vec<Token>,
    in_use: bool,
    last_used: u64,
}

/// A conversation saved to host memory.
#[derive(Debug)]
struct Saved<S> {
    id: u64,
    tokens: Vec<Token>,
    /// `None` until the engine has copied the state out of llama.cpp.
    state: Option<S>,
    bytes: usize,
    last_used: u64,
}

/// One thing the engine does to a slot, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Step<S> {
    /// Copy the slot's state to host memory as entry `entry` ([`PromptCache::saved`]).
    Save { entry: u64 },
    /// Load a saved state into the slot (replacing what it held).
    Restore { state: S },
    /// Forget everything the slot holds.
    Clear,
    /// Forget the slot's tokens from position `from` on.
    Truncate { from: usize },
}

/// Where a request goes, and how much of its prompt is there already.
#[derive(Debug, PartialEq, Eq)]
pub struct Placement<S> {
    pub slot: usize,
    /// Prompt tokens in the slot's KV cache once `steps` are done.
    pub reused: usize,
    pub steps: Vec<Step<S>>,
}

/// Every slot's resident tokens and the conversations saved to host memory.
#[derive(Debug)]
pub struct PromptCache<S> {
    slots: Vec<Resident>,
    saved: Vec<Saved<S>>,
    /// Host memory the saved states may take, in bytes.
    budget: usize,
    /// A logical clock for least-recently-used order; also names saved entries.
    clock: u64,
}

impl<S> PromptCache<S> {
    pub fn new(slots: usize, budget: usize) -> PromptCache<S> {
        PromptCache {
            slots: vec![Resident::default(); slots],
            saved: Vec::new(),
            budget,
            clock: 0,
        }
    }

    fn tick(&mut self) -> u64 {
        self.clock += 1;
        self.clock
    }

    /// Chooses a slot among `free` for `prompt` and says how to prepare it.
    /// With `reuse`, the longest shared prefix resident or saved; without, a
    /// fresh start. The prompt's last token is always left to decode: its
    /// logits give the first sample. `None` if no slot is free.
    pub fn place(&mut self, prompt: &[Token], reuse: bool, free: &[usize]) -> Option<Placement<S>> {
        let victim = self.victim(free)?;
        let resident = free
            .iter()
            .map(|&s| (s, common_prefix(&self.slots[s].tokens, prompt)))
            .max_by_key(|&(s, shared)| (shared, self.slots[s].last_used))
            .filter(|_| reuse)
            .unwrap_or((victim, 0));
        let saved = self
            .saved
            .iter()
            .enumerate()
            .filter(|(_, e)| e.state.is_some())
            .map(|(i, e)| (i, common_prefix(&e.tokens, prompt)))
            .max_by_key(|&(_, shared)| shared)
            .filter(|&(_, shared)| reuse && shared > resident.1);
        let last = prompt.len().saturating_sub(1);
        let mut steps = Vec::new();
        let (slot, keep, held) = match saved {
            Some((index, shared)) => {
                self.save_if_held(victim, &mut steps);
                let entry = self.saved.remove(index);
                if let Some(state) = entry.state {
                    steps.push(Step::Restore { state });
                }
                (victim, shared.min(last), entry.tokens.len())
            }
            None if resident.1 > 0 => {
                let (slot, shared) = resident;
                let held = self.slots[slot].tokens.len();
                if held - shared.min(last) > SAVE_TAIL_OVER {
                    self.save_if_held(slot, &mut steps);
                }
                (slot, shared.min(last), held)
            }
            None => {
                self.save_if_held(victim, &mut steps);
                (victim, 0, self.slots[victim].tokens.len())
            }
        };
        if keep < held {
            steps.push(match keep {
                0 => Step::Clear,
                from => Step::Truncate { from },
            });
        }
        let now = self.tick();
        let r = &mut self.slots[slot];
        r.tokens = prompt[..keep].to_vec();
        r.in_use = true;
        r.last_used = now;
        Some(Placement {
            slot,
            reused: keep,
            steps,
        })
    }

    /// The free slot to give away: the one that keeps the slots in use
    /// closest together, then an empty one, then the least recently used.
    ///
    /// llama.cpp's attention over per-sequence streams spans every stream
    /// from the lowest one in the batch to the highest: four requests in
    /// slots {0, 5, 6, 7} of eight cost what eight would (measured here:
    /// 4 streams decoded at ~165 tokens/s there against ~215 in {1, 2, 3, 4}).
    fn victim(&self, free: &[usize]) -> Option<usize> {
        let busy = || (0..self.slots.len()).filter(|&s| self.slots[s].in_use);
        let (lo, hi) = (busy().min(), busy().max());
        let span = |s: usize| match lo.zip(hi) {
            Some((lo, hi)) => hi.max(s) - lo.min(s),
            None => 0,
        };
        free.iter()
            .copied()
            .filter(|&s| s < self.slots.len())
            .min_by_key(|&s| {
                (
                    span(s),
                    !self.slots[s].tokens.is_empty(),
                    self.slots[s].last_used,
                )
            })
    }

    /// Adds a `Save` of the slot's tokens, when it holds any worth keeping.
    fn save_if_held(&mut self, slot: usize, steps: &mut Vec<Step<S>>) {
        if self.budget == 0 || self.slots[slot].tokens.is_empty() {
            return;
        }
        let id = self.tick();
        let r = &self.slots[slot];
        self.saved.push(Saved {
            id,
            tokens: r.tokens.clone(),
            state: None,
            bytes: 0,
            last_used: r.last_used,
        });
        steps.push(Step::Save { entry: id });
    }

    /// The engine copied entry `entry`'s state out (`None`: it could not).
    /// Returns how many saved conversations were dropped to stay in budget.
    pub fn saved(&mut self, entry: u64, state: Option<(S, usize)>) -> usize {
        let Some(index) = self.saved.iter().position(|e| e.id == entry) else {
            return 0;
        };
        match state {
            Some((state, bytes)) if bytes <= self.budget => {
                let e = &mut self.saved[index];
                e.state = Some(state);
                e.bytes = bytes;
            }
            _ => {
                self.saved.remove(index);
                return 0;
            }
        }
        let mut dropped = 0;
        while self.saved.iter().map(|e| e.bytes).sum::<usize>() > self.budget {
            let Some(oldest) = (0..self.saved.len()).min_by_key(|&i| self.saved[i].last_used)
            else {
                break;
            };
            self.saved.remove(oldest);
            dropped += 1;
        }
        dropped
    }

    /// Host memory the budget has left beyond the saved states, in bytes.
    pub fn room(&self) -> usize {
        let used: usize = self.saved.iter().map(|e| e.bytes).sum();
        self.budget.saturating_sub(used)
    }

    /// A request has ended: `tokens` is what its slot now holds in the KV
    /// cache (the prompt as far as it was read, and every generated token that
    /// was decoded).
    pub fn release(&mut self, slot: usize, tokens: Vec<Token>) {
        let now = self.tick();
        if let Some(r) = self.slots.get_mut(slot) {
            r.tokens = tokens;
            r.in_use = false;
            r.last_used = now;
        }
    }

    /// The slot's KV content is unknown (a decode failed); the engine clears it.
    pub fn forget(&mut self, slot: usize) {
        if let Some(r) = self.slots.get_mut(slot) {
            r.tokens.clear();
        }
    }

    /// Conversations remembered (idle resident ones and saved ones) and their tokens.
    /// Tokens idle slots still hold in their KV streams.
    pub fn resident(&self) -> usize {
        self.slots
            .iter()
            .filter(|r| !r.in_use)
            .map(|r| r.tokens.len())
            .sum()
    }

    /// How many slots it keeps.
    pub fn slots(&self) -> usize {
        self.slots.len()
    }

    pub fn cached(&self) -> (usize, usize) {
        let resident = self
            .slots
            .iter()
            .filter(|r| !r.in_use && !r.tokens.is_empty())
            .map(|r| r.tokens.len());
        let saved = self
            .saved
            .iter()
            .filter(|e| e.state.is_some())
            .map(|e| e.tokens.len());
        resident
            .chain(saved)
            .fold((0, 0), |(n, t), len| (n + 1, t + len))
    }
}

/// How many tokens two sequences share from their start.
pub fn common_prefix(a: &[Token], b: &[Token]) -> usize {
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

#[cfg(test)]
mod tests {
    use super::*;

    const MB: usize = 1 << 20;

    /// A cache whose slots hold these token lists, released in this order.
    fn cache_with(slots: &[&[Token]], n: usize) -> PromptCache<&'static str> {
        let mut c = PromptCache::new(n, 100 * MB);
        for (i, tokens) in slots.iter().enumerate() {
            c.release(i, tokens.to_vec());
        }
        c
    }

    /// Carries out a placement's saves the way the engine does.
    fn run_saves(c: &mut PromptCache<&'static str>, p: &Placement<&'static str>, bytes: usize) {
        for step in &p.steps {
            if let Step::Save { entry } = step {
                c.saved(*entry, Some(("state", bytes)));
            }
        }
    }

    #[test]
    fn the_next_turn_extends_its_own_conversation() {
        let mut c = cache_with(&[&[1, 2, 3], &[1, 7, 8, 9]], 2);
        let p = c.place(&[1, 7, 8, 9, 10, 11], true, &[0, 1]).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 1,
                reused: 4,
                steps: vec![]
            }
        );
    }

    #[test]
    fn new_requests_keep_the_busy_slots_together() {
        // Eight slots used in the order 0, 5, 6, 7, 1, 2, 3, 4: the first
        // request goes to slot 0, the least recently used, and the next ones
        // beside it rather than to the next-oldest slots at the far end.
        let mut c = cache_with(&[&[1], &[2], &[3], &[4], &[5], &[6], &[7], &[8]], 8);
        for s in [0, 5, 6, 7, 1, 2, 3, 4] {
            c.release(s, vec![s as Token + 1]);
        }
        let mut free: Vec<usize> = (0..8).collect();
        let mut taken = Vec::new();
        for prompt in [[20], [21], [22], [23]] {
            let p = c.place(&prompt, false, &free).unwrap();
            free.retain(|&s| s != p.slot);
            taken.push(p.slot);
        }
        assert_eq!(taken, [0, 1, 2, 3]);
        // Slot 5 busy: the next request sits next to it, not in empty slot 0.
        let mut c: PromptCache<&str> = PromptCache::new(8, 0);
        let first = c.place(&[1], false, &[5]).unwrap();
        assert_eq!(first.slot, 5);
        let p = c.place(&[2], false, &[0, 1, 2, 3, 4, 6, 7]).unwrap();
        assert!(p.slot == 4 || p.slot == 6, "{}", p.slot);
    }

    #[test]
    fn the_longest_shared_prefix_among_free_slots_wins() {
        let mut c = cache_with(&[&[1, 2], &[1, 2, 3, 4], &[1, 2, 3]], 3);
        let p = c.place(&[1, 2, 3, 4, 5], true, &[0, 1, 2]).unwrap();
        assert_eq!((p.slot, p.reused), (1, 4));
        // A busy slot is not a candidate.
        let mut c = cache_with(&[&[1, 2], &[1, 2, 3, 4]], 2);
        let p = c.place(&[1, 2, 3, 4, 5], true, &[0]).unwrap();
        assert_eq!((p.slot, p.reused), (0, 2));
    }

    #[test]
    fn a_prompt_already_cached_whole_still_decodes_its_last_token() {
        let mut c = cache_with(&[&[1, 2, 3, 4]], 1);
        let p = c.place(&[1, 2, 3, 4], true, &[0]).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 0,
                reused: 3,
                steps: vec![Step::Truncate { from: 3 }]
            }
        );
    }

    #[test]
    fn a_prompt_shorter_than_a_cached_one_reuses_its_prefix() {
        let mut c = cache_with(&[&[1, 2, 3, 4, 5, 6]], 1);
        let p = c.place(&[1, 2, 3], true, &[0]).unwrap();
        assert_eq!(
            p,
            Placement {
                slot: 0,
                reused: 2,
                steps: vec![Step::Truncate { from: 2 }]
            }
        );
    }

    #[test]
    fn with_no_match_an_empty_slot_then_the_least_recently_used_is_taken() {
        let mut c = cache_with(&[&[5, 6]], 2);
        let p = c.place(&[1, 2], true, &[0, 1]).unwrap();
        assert_eq!((p.slot, p.steps), (1, vec![]));
        c.release(1, vec![1, 2, 3]);
        let p = c.place(&[9], true, &[0, 1]).unwrap();
        assert_eq!(p.slot, 0);
        assert!(
            matches!(p.steps[..], [Step::Save { .. }, Step::Clear]),
            "{:?}",
            p.steps
        );
    }

    #[test]
    fn a_conversation_given_away_is_saved_and_comes_back() {
        let mut c = cache_with(&[&[1, 2, 3, 4]], 1);
        let p = c.place(&[7, 8], true, &[0]).unwrap();
        run_saves(&mut c, &p, MB);
        c.release(0, vec![7, 8, 9]);
        assert_eq!(c.cached(), (2, 7));
        let back = c.place(&[1, 2, 3, 4, 5], true, &[0]).unwrap();
        assert_eq!(back.reused, 4);
        assert!(
            matches!(
                back.steps[..],
                [Step::Save { .. }, Step::Restore { state: "state" }]
            ),
            "{:?}",
            back.steps
        );
    }

    #[test]
    fn a_long_tail_of_another_conversation_is_saved_before_it_is_cut() {
        let doc: Vec<Token> = (1..=10).collect();
        let mine: Vec<Token> = doc.iter().copied().chain(100..200).collect();
        let mut c = cache_with(&[&mine], 1);
        let other: Vec<Token> = doc.iter().copied().chain([5000]).collect();
        let p = c.place(&other, true, &[0]).unwrap();
        assert_eq!(p.reused, 10);
        assert!(
            matches!(
                p.steps[..],
                [Step::Save { .. }, Step::Truncate { from: 10 }]
            ),
            "{:?}",
            p.steps
        );
    }

    #[test]
    fn opting_out_starts_fresh_even_when_the_prompt_is_cached() {
        let mut c = cache_with(&[&[1, 2, 3, 4]], 1);
        let p = c.place(&[1, 2, 3, 4, 5], false, &[0]).unwrap();
        assert_eq!(p.reused, 0);
        assert!(
            matches!(p.steps[..], [Step::Save { .. }, Step::Clear]),
            "{:?}",
            p.steps
        );
    }

    #[test]
    fn saved_conversations_stay_within_the_budget_oldest_dropped_first() {
        let mut c: PromptCache<&'static str> = PromptCache::new(1, 3 * MB);
        for k in 0..5 {
            let p = c.place(&[k, k], true, &[0]).unwrap();
            run_saves(&mut c, &p, MB);
            c.release(0, vec![k, k, 100]);
        }
        // Four were given away; three fit in the budget, beside the resident one.
        assert_eq!(c.cached(), (4, 12));
        // The oldest (0) went; 1 comes back from host memory.
        assert_eq!(c.place(&[0, 0, 1], true, &[0]).unwrap().reused, 0);
        c.release(0, vec![]);
        let p = c.place(&[2, 2, 100, 7], true, &[0]).unwrap();
        assert_eq!(p.reused, 3);
    }

    #[test]
    fn room_is_the_budget_less_the_saved_states() {
        let mut c: PromptCache<&'static str> = PromptCache::new(1, 3 * MB);
        assert_eq!(c.room(), 3 * MB);
        c.release(0, vec![1, 2]);
        let p = c.place(&[9], true, &[0]).unwrap();
        run_saves(&mut c, &p, 2 * MB);
        assert_eq!(c.room(), MB);
        // Restored: its state leaves the cache, and with it its bytes.
        c.release(0, vec![9]);
        let p = c.place(&[1, 2, 3], true, &[0]).unwrap();
        assert!(
            matches!(p.steps[..], [Step::Save { .. }, Step::Restore { .. }, ..]),
            "{:?}",
            p.steps
        );
        run_saves(&mut c, &p, MB);
        assert_eq!(c.room(), 2 * MB);
    }

    #[test]
    fn a_state_that_could_not_be_copied_is_not_offered() {
        let mut c = cache_with(&[&[1, 2, 3]], 1);
        let p = c.place(&[9], true, &[0]).unwrap();
        let Step::Save { entry } = p.steps[0] else {
            panic!("{:?}", p.steps)
        };
        c.saved(entry, None);
        c.release(0, vec![9]);
        assert_eq!(c.place(&[1, 2, 3, 4], true, &[0]).unwrap().reused, 0);
    }

    #[test]
    fn a_cancelled_prefill_leaves_only_what_was_read() {
        let mut c: PromptCache<&'static str> = PromptCache::new(1, MB);
        let p = c.place(&[1, 2, 3, 4, 5, 6], true, &[0]).unwrap();
        // Cancelled after three tokens were decoded.
        c.release(p.slot, vec![1, 2, 3]);
        assert_eq!(c.cached(), (1, 3));
        let again = c.place(&[1, 2, 3, 4, 5, 6], true, &[0]).unwrap();
        assert_eq!(
            again,
            Placement {
                slot: 0,
                reused: 3,
                steps: vec![]
            }
        );
    }

    #[test]
    fn a_failed_decode_forgets_the_slot() {
        let mut c = cache_with(&[&[1, 2, 3]], 1);
        c.forget(0);
        let p = c.place(&[1, 2, 3, 4], true, &[0]).unwrap();
        assert_eq!((p.reused, p.steps), (0, vec![]));
    }

    #[test]
    fn eight_conversations_interleave_on_four_slots() {
        let mut c: PromptCache<&'static str> = PromptCache::new(4, 100 * MB);
        let mut convs: Vec<Vec<Token>> = (0..8).map(|k| vec![1000 + k]).collect();
        for round in 0..4 {
            for (k, conv) in convs.iter_mut().enumerate() {
                conv.push(round * 10 + k as Token);
                let p = c.place(conv, true, &[0, 1, 2, 3]).unwrap();
                if round > 0 {
                    // Everything up to the new message came from the cache.
                    assert_eq!(p.reused, conv.len() - 1, "round {round} conversation {k}");
                }
                run_saves(&mut c, &p, MB);
                conv.push(2000); // the answer, decoded into the slot too
                c.release(p.slot, conv.clone());
            }
        }
    }
}
