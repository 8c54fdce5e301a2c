//! A [`MemoryStore`]'s completed records across a restart: written to a file (at shutdown, and
//! periodically), read back when the store is built, put in the store at its first use. The
//! file's format is in [`file`].

mod file;
#[cfg(test)]
mod tests;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime};

use super::MemoryStore;
use crate::fingerprint::Fingerprint;
use crate::store::RecordKey;
use crate::store::util::KeepRunning;
use crate::stored::StoredResponse;

/// A completed record as the file holds it.
#[derive(Debug, Clone)]
pub(super) struct Saved {
    pub(super) key: RecordKey,
    pub(super) fingerprint: Fingerprint,
    pub(super) response: StoredResponse,
    pub(super) expires_at: SystemTime,
}

/// What a store with a snapshot file keeps about it.
#[derive(Debug)]
pub(super) struct Snapshot {
    pub(super) path: PathBuf,
    /// Records read at build, waiting for the store's first use (when its clock starts).
    pub(super) pending: Mutex<Vec<Saved>>,
    /// Set once the pending records are in the store.
    pub(super) restored: OnceLock<()>,
    pub(super) status: Mutex<SnapshotStatus>,
    /// One write at a time: the periodic one and `save_snapshot`.
    pub(super) writer: tokio::sync::Mutex<()>,
    /// The shards' count of changes to their completed records when the file was last
    /// written: the periodic writer skips a store that did not change.
    written: AtomicU64,
    pub(super) task: KeepRunning,
}

impl Snapshot {
    /// Reads the file at `path` (a snapshot no larger than `max_len`), as a store is built.
    pub(super) fn open(path: PathBuf, max_len: u64) -> Self {
        let now = SystemTime::now();
        let (records, load) = file::load(&path, max_len, now);
        report_load(&path, &load);
        let stale = file::remove_stale_temps(&path, now);
        report_stale_temps(&path, stale);
        Self {
            path,
            pending: Mutex::new(records),
            restored: OnceLock::new(),
            status: Mutex::new(SnapshotStatus {
                load,
                last_save: None,
                last_error: None,
            }),
            writer: tokio::sync::Mutex::new(()),
            written: AtomicU64::new(u64::MAX),
            task: KeepRunning::default(),
        }
    }

    pub(super) fn status(&self) -> std::sync::MutexGuard<'_, SnapshotStatus> {
        self.status.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// What happened to a [`MemoryStore`]'s snapshot file, from
/// [`MemoryStore::snapshot_status`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotStatus {
    load: SnapshotLoad,
    last_save: Option<(SystemTime, usize)>,
    last_error: Option<String>,
}

impl SnapshotStatus {
    /// What reading the file found when the store was built.
    pub fn load(&self) -> &SnapshotLoad {
        &self.load
    }

    /// When the last write that succeeded finished, and how many records it wrote.
    pub fn last_save(&self) -> Option<(SystemTime, usize)> {
        self.last_save
    }

    /// Why the last write failed, if it did (cleared by a write that succeeds).
    pub fn last_error(&self) -> Option<&str> {
        self.last_error.as_deref()
    }
}

/// What reading a snapshot file found, in [`SnapshotStatus::load`].
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum SnapshotLoad {
    /// The file does not exist (a first start): the store starts empty.
    Missing,
    /// The file was read: `records` completed records are put in the store at its first use
    /// (as many as its bounds hold); `expired` had expired and were dropped.
    Loaded {
        /// Records read and still live.
        records: usize,
        /// Records read and already expired.
        expired: usize,
    },
    /// The file could not be used: unreadable, truncated, corrupt (its checksum does not
    /// match), from another format version, not a snapshot at all, or larger than the store
    /// reads (16 times its `max_bytes`, and 1 MiB: a file from a store with far larger bounds).
    /// The store starts empty; the next write replaces the file.
    Ignored {
        /// What was wrong with it.
        reason: String,
    },
}

impl MemoryStore {
    /// Writes the store's completed records to its [snapshot
    /// file](super::MemoryStoreBuilder::snapshot) now, and returns how many it wrote. In-flight
    /// records are never written. The file is replaced whole: the records go to a new file in
    /// the same directory, which is synced, renamed over the old one, and the directory synced,
    /// so that a crash leaves the old file or the new one, never half of one.
    ///
    /// Call it once the server stopped, after the handlers still running have stored their
    /// responses:
    ///
    /// ```no_run
    /// use std::time::Duration;
    /// use axum::{Router, routing::post};
    /// use tower_idempotency::{IdempotencyLayer, MemoryStore};
    ///
    /// # async fn run() -> std::io::Result<()> {
    /// let store = MemoryStore::builder().snapshot("/var/lib/app/idempotency.snapshot").build();
    /// let layer = IdempotencyLayer::new(store.clone());
    /// let detached = layer.detached_runs();
    /// let app: Router = Router::new().route("/payments", post(|| async { "paid" })).layer(layer);
    /// let listener = tokio::net::TcpListener::bind("127.0.0.1:3000").await?;
    /// // 1. Stop accepting, and let the connections finish.
    /// axum::serve(listener, app)
    ///     .with_graceful_shutdown(async { let _ = tokio::signal::ctrl_c().await; })
    ///     .await?;
    /// // 2. Let the handlers whose client went away finish and store their responses.
    /// detached.wait_timeout(Duration::from_secs(30)).await;
    /// // 3. Save.
    /// let written = store.save_snapshot().await?;
    /// println!("{written} records saved");
    /// # Ok(())
    /// # }
    /// ```
    ///
    /// # Errors
    ///
    /// When the store has no snapshot file ([`io::ErrorKind::InvalidInput`]), or when writing
    /// it fails; the old file is then left as it was.
    pub async fn save_snapshot(&self) -> io::Result<usize> {
        let saved = self.inner.save(true).await?;
        Ok(saved.unwrap_or_default())
    }

    /// What happened to the snapshot file: what reading it found when the store was built,
    /// and the last write. `None` when the store has no snapshot file.
    ///
    /// ```
    /// use tower_idempotency::{MemoryStore, SnapshotLoad};
    ///
    /// let path = std::env::temp_dir().join("tower-idempotency-doc-status.snapshot");
    /// # let _ = std::fs::remove_file(&path);
    /// let store = MemoryStore::builder().snapshot(&path).build();
    /// let status = store.snapshot_status().unwrap();
    /// assert_eq!(status.load(), &SnapshotLoad::Missing);
    /// assert!(MemoryStore::new().snapshot_status().is_none());
    /// ```
    pub fn snapshot_status(&self) -> Option<SnapshotStatus> {
        let snapshot = self.inner.snapshot.as_ref()?;
        Some(snapshot.status().clone())
    }

    /// The snapshot file the store was built with, if any.
    pub fn snapshot_path(&self) -> Option<&Path> {
        self.inner.snapshot.as_ref().map(|s| s.path.as_path())
    }
}

impl super::Inner {
    /// Writes the snapshot file, `always` or only if the completed records changed since the
    /// last write; records the outcome in the status. `None` when nothing changed.
    pub(super) async fn save(&self, always: bool) -> io::Result<Option<usize>> {
        let Some(snapshot) = &self.snapshot else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                "MemoryStore: no snapshot file is set (MemoryStoreBuilder::snapshot)",
            ));
        };
        let _one_at_a_time = snapshot.writer.lock().await;
        // Restores the records read at build first, if the store was never used: else they
        // would be lost.
        let now = self.now();
        let wall_epoch = self.wall_epoch();
        let mut records = Vec::new();
        let mut changes = 0_u64;
        for shard in self.shards() {
            let shard = super::read(shard);
            changes = changes.wrapping_add(shard.changes());
            shard.saved(now, &mut records, |deadline| {
                wall_epoch + Duration::from_nanos(deadline)
            });
        }
        if !always && snapshot.written.load(Ordering::Relaxed) == changes {
            return Ok(None);
        }
        let count = records.len();
        let path = snapshot.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            file::write_atomically(&path, &records, SystemTime::now())
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        let mut status = snapshot.status();
        match &written {
            Ok(()) => {
                status.last_save = Some((SystemTime::now(), count));
                status.last_error = None;
                snapshot.written.store(changes, Ordering::Relaxed);
            }
            Err(e) => {
                status.last_error = Some(e.to_string());
                #[cfg(feature = "tracing")]
                tracing::warn!(
                    target: "tower_idempotency",
                    path = %snapshot.path.display(),
                    error = %e,
                    "MemoryStore: writing the snapshot failed; the previous file is left as it was"
                );
            }
        }
        written.map(|()| Some(count))
    }

    /// Puts the records read at build in the store, at its first use: nearest expiry last, so
    /// that when the bounds hold fewer than the file, the nearest ones are left out, each
    /// tenant within its share keeping its own (see `Shard::restore`).
    pub(super) fn restore(&self, snapshot: &Snapshot, now: super::Nanos, wall_epoch: SystemTime) {
        let mut records = std::mem::take(
            &mut *snapshot
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        records.sort_unstable_by_key(|r| std::cmp::Reverse(r.expires_at));
        let (mut restored, mut expired, mut no_room) = (0, 0, 0);
        let mut displaced = super::shard::Removed::default();
        for record in records {
            let at = record
                .expires_at
                .duration_since(wall_epoch)
                .map_or(0, super::nanos);
            if at <= now {
                expired += 1;
                continue;
            }
            let hash = self.hash(&record.key);
            let mut shard = super::write(self.shard(hash));
            if shard.restore(hash, record, (at, now), &mut displaced) {
                restored += 1;
            } else {
                no_room += 1;
            }
        }
        // Records restored, then dropped for another tenant's within its share.
        let displaced = displaced.evicted + displaced.pruned;
        restored -= displaced;
        no_room += displaced;
        #[cfg(feature = "tracing")]
        tracing::info!(
            target: "tower_idempotency",
            path = %snapshot.path.display(),
            restored,
            expired,
            no_room,
            "MemoryStore: records from the snapshot are in the store"
        );
        #[cfg(not(feature = "tracing"))]
        let _ = (restored, expired, no_room);
    }
}

/// The background writer: it holds only a weak reference between writes, so it ends at its
/// first tick after the store is dropped, and only then: a write that fails or panics is
/// reported and the next one runs.
pub(super) async fn save_periodically(store: std::sync::Weak<super::Inner>, period: Duration) {
    let start = tokio::time::Instant::now() + period;
    let mut interval = tokio::time::interval_at(start, period);
    interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        interval.tick().await;
        let Some(inner) = store.upgrade() else {
            break;
        };
        // On a task of its own, so that a panic is caught here; a failed write is in the status
        // and reported by `save`.
        let written = tokio::spawn(async move { inner.save(false).await }).await;
        #[cfg(feature = "tracing")]
        if let Err(e) = written {
            tracing::error!(
                target: "tower_idempotency",
                error = %e,
                "MemoryStore: writing the snapshot panicked; the next write is in {period:?}"
            );
        }
        #[cfg(not(feature = "tracing"))]
        let _ = written;
    }
    #[cfg(feature = "tracing")]
    tracing::debug!(
        target: "tower_idempotency",
        "MemoryStore dropped: its periodic snapshot ended"
    );
}

fn report_load(path: &Path, load: &SnapshotLoad) {
    #[cfg(feature = "tracing")]
    match load {
        SnapshotLoad::Missing => tracing::info!(
            target: "tower_idempotency",
            path = %path.display(),
            "MemoryStore: no snapshot file yet; the store starts empty"
        ),
        SnapshotLoad::Loaded { records, expired } => tracing::info!(
            target: "tower_idempotency",
            path = %path.display(),
            records,
            expired,
            "MemoryStore: snapshot read"
        ),
        SnapshotLoad::Ignored { reason } => tracing::warn!(
            target: "tower_idempotency",
            path = %path.display(),
            reason = %reason,
            "MemoryStore: the snapshot file cannot be used and is ignored; the store starts empty"
        ),
    }
    #[cfg(not(feature = "tracing"))]
    let _ = (path, load);
}

fn report_stale_temps(path: &Path, removed: usize) {
    #[cfg(feature = "tracing")]
    if removed > 0 {
        tracing::info!(
            target: "tower_idempotency",
            path = %path.display(),
            removed,
            "MemoryStore: removed temporary snapshot files that writers which died left behind"
        );
    }
    #[cfg(not(feature = "tracing"))]
    let _ = (path, removed);
}
