//! Watching one file for changes the way both the config and the placement map need it: through its
//! directory (an editor's rename-over, or Kubernetes swapping a mounted volume's `..data` link, replaces
//! the file rather than writing it), debounced, and blind to reads and to the directory's other files.
//! A leaf: it knows files and time, nothing of popgate.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecommendedWatcher, RecursiveMode, Watcher};
use tokio::sync::mpsc::{UnboundedReceiver, unbounded_channel};

/// What changed, least to most far-reaching.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Debug)]
pub enum Change {
    /// The file itself was written, created or removed.
    File,
    /// A `..data`-style volume swap: any file of the mount may be new.
    Volume,
}

/// Changes to one file, as they settle.
#[derive(Debug)]
pub struct FileWatch {
    /// The watched directory (the file's, or `.`).
    pub dir: PathBuf,
    changes: UnboundedReceiver<Change>,
    /// Watching stops when this is dropped.
    _watcher: RecommendedWatcher,
}

/// The directory watched for `path`: its parent, or `.` for a bare file name.
pub fn watched_dir(path: &Path) -> PathBuf {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
        .to_path_buf()
}

/// Starts watching `path` through its directory.
pub fn watch_file(path: &Path) -> Result<FileWatch, notify::Error> {
    let dir = watched_dir(path);
    let name: Option<OsString> = path.file_name().map(std::ffi::OsStr::to_os_string);
    let (tx, changes) = unbounded_channel();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        let Ok(event) = event else { return };
        // Reads (ours included: every load opens the file) are not changes.
        if !matches!(
            event.kind,
            EventKind::Create(_) | EventKind::Modify(_) | EventKind::Remove(_)
        ) {
            return;
        }
        for p in &event.paths {
            let n = p.file_name();
            if n.is_some_and(|n| n.to_string_lossy().starts_with("..")) {
                let _ = tx.send(Change::Volume);
            } else if n == name.as_deref() {
                let _ = tx.send(Change::File);
            }
        }
    })?;
    watcher.watch(&dir, RecursiveMode::NonRecursive)?;
    Ok(FileWatch {
        dir,
        changes,
        _watcher: watcher,
    })
}

impl FileWatch {
    /// The next change, once no other has come for `settle` (an editor's save or a volume swap is several
    /// events): the most far-reaching of them. `None` when the watcher has stopped.
    pub async fn settled(&mut self, settle: Duration) -> Option<Change> {
        let mut change = self.changes.recv().await?;
        while let Ok(Some(more)) = tokio::time::timeout(settle, self.changes.recv()).await {
            change = change.max(more);
        }
        Some(change)
    }
}
