//! Every download since the hive started, by id, with its live progress on a
//! `watch` channel: any number of subscribers see where it stands, a late one
//! included. Two requests for the same file share one download.

use crate::protocol::{new_id, DownloadEvent};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use tokio::sync::watch;

#[derive(Clone, Default)]
pub struct Downloads {
    table: Arc<Mutex<HashMap<String, Download>>>,
}

struct Download {
    local_path: PathBuf,
    /// Its last event stays once it has finished, for late subscribers.
    progress: watch::Receiver<DownloadEvent>,
}

impl Download {
    fn running(&self) -> bool {
        matches!(*self.progress.borrow(), DownloadEvent::Downloading { .. })
    }
}

/// A download of a file: one already running, or one to run now.
pub enum Joined {
    Running(String),
    /// A new download: its id, and where it reports its progress.
    New(String, watch::Sender<DownloadEvent>),
}

impl Downloads {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Download>> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Joins the running download of `local_path`, or registers a new one,
    /// under one lock so that two requests never start the same file twice.
    pub fn join_or_start(&self, local_path: &Path, bytes_total: u64) -> Joined {
        let mut table = self.lock();
        if let Some((id, _)) = table
            .iter()
            .find(|(_, d)| d.local_path == local_path && d.running())
        {
            return Joined::Running(id.clone());
        }
        let id = new_id("dl");
        let (tx, rx) = watch::channel(DownloadEvent::Downloading {
            bytes_downloaded: 0,
            bytes_total,
            speed_mbps: 0.0,
        });
        table.insert(
            id.clone(),
            Download {
                local_path: local_path.to_path_buf(),
                progress: rx,
            },
        );
        Joined::New(id, tx)
    }

    /// A download that had nothing to do: its stream says `complete` at once.
    pub fn complete(&self, local_path: &str) -> String {
        let id = new_id("dl");
        let (_, rx) = watch::channel(DownloadEvent::Complete {
            local_path: local_path.to_string(),
        });
        self.lock().insert(
            id.clone(),
            Download {
                local_path: PathBuf::from(local_path),
                progress: rx,
            },
        );
        id
    }

    /// Whether `local_path` is being downloaded right now.
    pub fn running(&self, local_path: &Path) -> bool {
        self.lock()
            .values()
            .any(|d| d.local_path == local_path && d.running())
    }

    pub fn progress(&self, id: &str) -> Option<watch::Receiver<DownloadEvent>> {
        self.lock().get(id).map(|d| d.progress.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_for_a_running_download_share_it_and_a_finished_one_starts_anew() {
        let d = Downloads::default();
        let path = Path::new("/models/a.gguf");
        let Joined::New(first, tx) = d.join_or_start(path, 10) else {
            panic!("the first request starts the download");
        };
        let Joined::Running(again) = d.join_or_start(path, 10) else {
            panic!("the second joins it");
        };
        assert_eq!(again, first);
        assert!(matches!(
            d.join_or_start(Path::new("/models/b.gguf"), 1),
            Joined::New(..)
        ));
        tx.send_replace(DownloadEvent::Error {
            message: "cut".into(),
        });
        assert!(matches!(d.join_or_start(path, 10), Joined::New(..)));
        assert!(matches!(
            *d.progress(&first).unwrap().borrow(),
            DownloadEvent::Error { .. }
        ));
    }

    #[test]
    fn a_complete_download_reports_complete_at_once() {
        let d = Downloads::default();
        let id = d.complete("/models/a.gguf");
        assert_eq!(
            *d.progress(&id).unwrap().borrow(),
            DownloadEvent::Complete {
                local_path: "/models/a.gguf".into()
            }
        );
        assert!(d.progress("dl-nope").is_none());
    }
}
