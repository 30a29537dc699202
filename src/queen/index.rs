//! The hives as the view last had them, indexed for what a job looks up:
//! a hive by name, the hives whose catalogs have a model (under any name it
//! goes by), the hives down. Built once per change of any hive's view
//! ([`super::view::View::state`]) and shared by every job until the next.

use super::view::HiveView;
use std::collections::HashMap;
use std::sync::Arc;

/// The hives as the view last had them, with what a job looks them up by:
/// built once per change of any hive's view and shared by every job until
/// the next, so that routing looks at the hives that have its model (a
/// name, a model, are found without a walk over a thousand hives).
#[derive(Debug, Default)]
pub struct Hives {
    list: Vec<Arc<HiveView>>,
    /// Positions in `list`, by hive name.
    by_name: HashMap<String, usize>,
    /// (position in `list`, catalog entry) of each hive whose catalog has a
    /// model, under each name a request may give it: its catalog name, its
    /// reference, its file (as [`super::placement::names`] compares them).
    by_model: [HashMap<String, Vec<(usize, usize)>>; 3],
    /// Positions in `list` of the unreachable hives.
    down: Vec<usize>,
    /// Every hive has sent a snapshot or failed.
    all_heard: bool,
    /// Whether this machine's hive should be started ([`super::hives::local_hive_wanted`]),
    /// worked out once per build.
    local_wanted: std::sync::OnceLock<bool>,
}

impl Hives {
    pub fn new(list: Vec<Arc<HiveView>>) -> Hives {
        let mut hives = Hives {
            all_heard: list
                .iter()
                .all(|h| h.snapshot.is_some() || h.error.is_some()),
            ..Hives::default()
        };
        for (i, h) in list.iter().enumerate() {
            hives.by_name.insert(h.conn.name.clone(), i);
            if !h.reachable {
                hives.down.push(i);
            }
            let models = h.snapshot.as_ref().map(|s| s.models.as_slice());
            for (m, entry) in models.unwrap_or_default().iter().enumerate() {
                let e = &entry.entry;
                for (by, key) in hives
                    .by_model
                    .iter_mut()
                    .zip([&e.name, &e.model_ref, &e.path])
                {
                    by.entry(key.clone()).or_default().push((i, m));
                }
            }
        }
        hives.list = list;
        hives
    }

    pub fn named(&self, name: &str) -> Option<&Arc<HiveView>> {
        self.by_name.get(name).map(|&i| &self.list[i])
    }

    /// The hives whose catalog has `model` (under a name
    /// [`super::placement::names`] accepts), each with its first entry that
    /// does, in the view's order.
    pub fn with_model(&self, model: &str) -> Vec<(&Arc<HiveView>, usize)> {
        let lower = model.to_lowercase();
        let path = model.strip_prefix("file:").unwrap_or(model);
        let mut hits = self
            .by_model
            .iter()
            .zip([lower.as_str(), model, path])
            .filter_map(|(by, key)| by.get(key).filter(|_| !key.is_empty()));
        let mut found: Vec<(usize, usize)> = hits.next().cloned().unwrap_or_default();
        let mut more = hits.peekable();
        if more.peek().is_some() {
            found.extend(more.flatten());
            found.sort_unstable();
        }
        found.dedup_by_key(|(hive, _)| *hive);
        found.into_iter().map(|(i, m)| (&self.list[i], m)).collect()
    }

    /// The unreachable hives.
    pub fn down(&self) -> impl Iterator<Item = &Arc<HiveView>> {
        self.down.iter().map(|&i| &self.list[i])
    }

    pub fn all_heard(&self) -> bool {
        self.all_heard
    }

    pub fn local_wanted(&self, work_out: impl FnOnce(&[Arc<HiveView>]) -> bool) -> bool {
        *self.local_wanted.get_or_init(|| work_out(&self.list))
    }
}

impl std::ops::Deref for Hives {
    type Target = [Arc<HiveView>];

    fn deref(&self) -> &[Arc<HiveView>] {
        &self.list
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_index_finds_a_models_hives_by_any_name_it_goes_by() {
        use crate::queen::placement::fixtures::{hive, model};
        let mut c = hive("c", 4000, vec![model("other", 1), model("m", 500)], vec![]);
        c.reachable = false;
        let mut renamed = model("mine", 500);
        renamed.entry.model_ref = "hf:org/m".into();
        let hives = Hives::new(
            [
                hive("a", 4000, vec![model("m", 500)], vec![]),
                hive("b", 4000, vec![renamed], vec![]),
                c,
                hive("d", 4000, vec![], vec![]),
            ]
            .into_iter()
            .map(Arc::new)
            .collect(),
        );
        let found = |model: &str| -> Vec<(String, usize)> {
            let found = hives.with_model(model).into_iter();
            found.map(|(h, m)| (h.conn.name.clone(), m)).collect()
        };
        let pair = |h: &str, m: usize| (h.to_string(), m);
        assert_eq!(found("M"), [pair("a", 0), pair("c", 1)]);
        assert_eq!(
            found("hf:org/m"),
            [pair("a", 0), pair("b", 0), pair("c", 1)]
        );
        assert_eq!(found("file:/models/mine.gguf"), [pair("b", 0)]);
        assert_eq!(found("/models/m.gguf"), [pair("a", 0), pair("c", 1)]);
        assert!(found("nothing").is_empty());
        assert_eq!(hives.named("d").map(|h| h.conn.name.as_str()), Some("d"));
        let down: Vec<&str> = hives.down().map(|h| h.conn.name.as_str()).collect();
        assert_eq!(down, ["c"]);
        assert!(hives.all_heard() && hives.len() == 4);
    }
}
