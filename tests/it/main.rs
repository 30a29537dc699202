//! The integration tests: the real `rbee` executable, started on free loopback
//! ports against the real SmolLM2 model (`make model` fetches it).
//!
//! Tests that run a model take turns (`support::serial`): on a 2-core machine
//! two models decoding at once would only make each other slow.

mod abuse;
mod bench;
mod cache;
mod chain;
mod cluster;
mod fronts;
mod hardening;
mod hf_server;
mod hive;
mod join;
mod keeper;
mod keys;
mod observe;
mod openai;
mod poison;
mod resilience;
mod shell;
mod split;
mod support;
mod worker;
