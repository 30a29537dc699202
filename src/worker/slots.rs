//! Slot scheduling for continuous batching, as pure state with no llama.cpp
//! types, so it can be unit-tested.
//!
//! A worker has N slots; each holds one request and owns one llama.cpp
//! sequence id (its index). Requests that find no free slot wait in a FIFO
//! queue and take slots as they free up, between decode steps; which free slot
//! is the prompt cache's choice (`super::cache`). Every step the
//! engine asks [`plan_batch`] what goes into the next batch: first one token of
//! every slot that is generating (so running streams never stall behind a long
//! prompt), then chunks of the prompts being read, up to the batch size. This
//! is the order llama.cpp's own server uses.

use std::collections::VecDeque;

/// Where a slot's request stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Reading its prompt: `done` of `total` tokens are in the KV cache;
    /// from `stepwise_from` on, one token per step (a failover's resumed
    /// tokens, read as the lost worker generated them: one per decode, so the
    /// numbers, and a greedy answer, come out the same).
    Prefill {
        done: usize,
        total: usize,
        stepwise_from: usize,
    },
    /// Generating: its last sampled token goes into the next batch.
    Decode,
}

/// One slot's share of a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Piece {
    pub slot: usize,
    pub kind: PieceKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PieceKind {
    /// The slot's last sampled token; its logits are needed.
    Decode,
    /// Prompt tokens `start..start + len`; logits are needed only when `last`.
    Prompt {
        start: usize,
        len: usize,
        last: bool,
    },
}

/// What goes into the next batch of at most `n_batch` tokens.
pub fn plan_batch(phases: &[(usize, Phase)], n_batch: usize) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut budget = n_batch;
    for &(slot, phase) in phases {
        if phase == Phase::Decode && budget > 0 {
            pieces.push(Piece {
                slot,
                kind: PieceKind::Decode,
            });
            budget -= 1;
        }
    }
    for &(slot, phase) in phases {
        if let Phase::Prefill {
            done,
            total,
            stepwise_from,
        } = phase
        {
            let room = if done >= stepwise_from {
                1
            } else {
                stepwise_from - done
            };
            let len = (total - done).min(budget).min(room);
            if len == 0 {
                continue;
            }
            pieces.push(Piece {
                slot,
                kind: PieceKind::Prompt {
                    start: done,
                    len,
                    last: done + len == total,
                },
            });
            budget -= len;
        }
    }
    pieces
}

/// N slots and the queue in front of them.
#[derive(Debug)]
pub struct Slots<T> {
    slots: Vec<Option<T>>,
    queue: VecDeque<T>,
}

impl<T> Slots<T> {
    pub fn new(n: usize) -> Slots<T> {
        Slots {
            slots: (0..n).map(|_| None).collect(),
            queue: VecDeque::new(),
        }
    }

    pub fn enqueue(&mut self, request: T) {
        self.queue.push_back(request);
    }

    /// Moves queued requests into free slots, oldest first; `choose` picks
    /// each one's slot among the free ones (the prompt cache's choice).
    /// Returns the slots filled.
    pub fn admit(&mut self, mut choose: impl FnMut(&mut T, &[usize]) -> usize) -> Vec<usize> {
        let mut filled = Vec::new();
        loop {
            let free = self.idle_slots();
            let Some(request) = self.queue.front_mut().filter(|_| !free.is_empty()) else {
                return filled;
            };
            let slot = choose(request, &free);
            let slot = if free.contains(&slot) { slot } else { free[0] };
            self.slots[slot] = self.queue.pop_front();
            filled.push(slot);
        }
    }

    /// The slots holding no request.
    pub fn idle_slots(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].is_none())
            .collect()
    }

    pub fn get_mut(&mut self, slot: usize) -> Option<&mut T> {
        self.slots.get_mut(slot)?.as_mut()
    }

    /// Empties a slot, returning what it held.
    pub fn free(&mut self, slot: usize) -> Option<T> {
        self.slots.get_mut(slot)?.take()
    }

    /// The busy slots with their requests.
    pub fn busy_mut(&mut self) -> impl Iterator<Item = (usize, &mut T)> {
        self.slots
            .iter_mut()
            .enumerate()
            .filter_map(|(i, s)| s.as_mut().map(|r| (i, r)))
    }

    /// Drops queued requests for which `keep` is false.
    pub fn retain_queued(&mut self, keep: impl FnMut(&T) -> bool) {
        self.queue.retain(keep);
    }

    /// Takes every request, running then queued, leaving all slots free.
    pub fn drain(&mut self) -> Vec<T> {
        let mut all: Vec<T> = self.slots.iter_mut().filter_map(Option::take).collect();
        all.extend(self.queue.drain(..));
        all
    }

    pub fn busy(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn is_idle(&self) -> bool {
        self.busy() == 0 && self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generating_slots_go_first_then_prompts_fill_the_batch() {
        let phases = [
            (
                0,
                Phase::Prefill {
                    done: 0,
                    total: 10,
                    stepwise_from: 10,
                },
            ),
            (1, Phase::Decode),
            (
                2,
                Phase::Prefill {
                    done: 4,
                    total: 6,
                    stepwise_from: 6,
                },
            ),
            (3, Phase::Decode),
        ];
        let plan = plan_batch(&phases, 8);
        assert_eq!(
            plan,
            vec![
                Piece {
                    slot: 1,
                    kind: PieceKind::Decode
                },
                Piece {
                    slot: 3,
                    kind: PieceKind::Decode
                },
                Piece {
                    slot: 0,
                    kind: PieceKind::Prompt {
                        start: 0,
                        len: 6,
                        last: false
                    }
                },
            ]
        );
    }

    #[test]
    fn a_long_prompt_is_read_in_chunks_and_only_its_last_token_wants_logits() {
        let mut done = 0;
        let mut chunks = Vec::new();
        while done < 1000 {
            let plan = plan_batch(
                &[(
                    0,
                    Phase::Prefill {
                        done,
                        total: 1000,
                        stepwise_from: 1000,
                    },
                )],
                512,
            );
            let PieceKind::Prompt { start, len, last } = plan[0].kind else {
                panic!("expected a prompt chunk");
            };
            assert_eq!(start, done);
            chunks.push((len, last));
            done += len;
        }
        assert_eq!(chunks, vec![(512, false), (488, true)]);
    }

    #[test]
    fn resumed_tokens_are_read_one_per_step_after_the_prompt() {
        let mut done = 0;
        let mut chunks = Vec::new();
        while done < 13 {
            let phase = Phase::Prefill {
                done,
                total: 13,
                stepwise_from: 10,
            };
            let PieceKind::Prompt { len, last, .. } = plan_batch(&[(0, phase)], 512)[0].kind else {
                panic!("expected a prompt chunk");
            };
            chunks.push((len, last));
            done += len;
        }
        assert_eq!(chunks, vec![(10, false), (1, false), (1, false), (1, true)]);
    }

    #[test]
    fn a_batch_never_exceeds_its_size() {
        let phases: Vec<_> = (0..4)
            .map(|i| {
                (
                    i,
                    Phase::Prefill {
                        done: 0,
                        total: 300,
                        stepwise_from: 300,
                    },
                )
            })
            .chain((4..8).map(|i| (i, Phase::Decode)))
            .collect();
        let plan = plan_batch(&phases, 512);
        let tokens: usize = plan
            .iter()
            .map(|p| match p.kind {
                PieceKind::Decode => 1,
                PieceKind::Prompt { len, .. } => len,
            })
            .sum();
        assert_eq!(tokens, 512);
    }

    fn first<T>(_: &mut T, free: &[usize]) -> usize {
        free[0]
    }

    #[test]
    fn each_request_takes_the_free_slot_chosen_for_it() {
        let mut s = Slots::new(3);
        s.enqueue("a");
        s.enqueue("b");
        assert_eq!(s.admit(|_, free| *free.last().unwrap()), vec![2, 1]);
        assert_eq!(s.get_mut(2).copied(), Some("a"));
        // A choice that is not free falls back to a free slot.
        s.enqueue("c");
        assert_eq!(s.admit(|_, _| 2), vec![0]);
    }

    #[test]
    fn queued_requests_take_freed_slots_in_arrival_order() {
        let mut s = Slots::new(2);
        for r in ["a", "b", "c", "d"] {
            s.enqueue(r);
        }
        assert_eq!(s.admit(first), vec![0, 1]);
        assert_eq!((s.busy(), s.queued()), (2, 2));
        assert_eq!(s.free(1), Some("b"));
        assert_eq!(s.admit(first), vec![1]);
        assert_eq!(s.get_mut(1).copied(), Some("c"));
        assert_eq!(s.free(0), Some("a"));
        assert_eq!(s.admit(first), vec![0]);
        assert_eq!(s.get_mut(0).copied(), Some("d"));
        assert_eq!(s.queued(), 0);
    }

    #[test]
    fn cancelled_queued_requests_never_take_a_slot() {
        let mut s = Slots::new(1);
        for r in [1, 2, 3] {
            s.enqueue(r);
        }
        s.retain_queued(|&r| r != 1);
        assert_eq!(s.admit(first), vec![0]);
        assert_eq!(s.get_mut(0).copied(), Some(2));
    }

    #[test]
    fn drain_empties_slots_and_queue() {
        let mut s = Slots::new(1);
        s.enqueue(1);
        s.enqueue(2);
        s.admit(first);
        assert_eq!(s.drain(), vec![1, 2]);
        assert!(s.is_idle());
    }
}
