//! A [`MemoryStore`]'s completed records across a restart: written to a file (at shutdown, and
//! periodically), read back when the store is built, put in the store at its first use.
//!
//! The file: a header (magic, format version, the payload's length and its SHA-256), then the
//! payload: when it was written, how many records, and each record (tenant, key, fingerprint,
//! expiry as wall-clock milliseconds since the Unix epoch, the response as
//! [`StoredResponse::encode`] writes it). A file that is not exactly that is ignored.

use std::fs::File;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::MemoryStore;
use crate::fingerprint::Fingerprint;
use crate::response::StoredResponse;
use crate::store::RecordKey;
use crate::store::background::StartOnce;
use crate::tenant::TenantId;

const MAGIC: &[u8; 8] = b"TIDEMSNP";
const VERSION: u32 = 1;
/// Magic, version, payload length, SHA-256 of the payload.
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// The fewest bytes a record takes in the payload.
const MIN_RECORD_LEN: usize = 32 + 2 + 32 + 8 + 8;

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
    pub(super) task: StartOnce,
}

impl Snapshot {
    /// Reads the file at `path` (no larger than `max_len`), as a store is built.
    pub(super) fn open(path: PathBuf, max_len: u64) -> Self {
        let (records, load) = load(&path, max_len, SystemTime::now());
        report_load(&path, &load);
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
            task: StartOnce::default(),
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
    /// match), from another format version, or not a snapshot at all. The store starts empty;
    /// the next write replaces the file.
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
        self.inner.save().await
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
    /// Writes the snapshot file; records the outcome in the status.
    pub(super) async fn save(&self) -> io::Result<usize> {
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
        for shard in self.shards() {
            super::read(shard).saved(now, &mut records, |deadline| {
                wall_epoch + Duration::from_nanos(deadline)
            });
        }
        let count = records.len();
        let path = snapshot.path.clone();
        let written = tokio::task::spawn_blocking(move || {
            let bytes = encode(&records, SystemTime::now());
            write_atomically(&path, &bytes)
        })
        .await
        .unwrap_or_else(|e| Err(io::Error::other(e)));
        let mut status = snapshot.status();
        match &written {
            Ok(()) => {
                status.last_save = Some((SystemTime::now(), count));
                status.last_error = None;
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
        written.map(|()| count)
    }

    /// Puts the records read at build in the store, at its first use: nearest expiry last, so
    /// that when the bounds hold fewer than the file, the nearest ones are left out.
    pub(super) fn restore(&self, snapshot: &Snapshot, now: super::Nanos, wall_epoch: SystemTime) {
        let mut records = std::mem::take(
            &mut *snapshot
                .pending
                .lock()
                .unwrap_or_else(PoisonError::into_inner),
        );
        records.sort_unstable_by_key(|r| std::cmp::Reverse(r.expires_at));
        let (mut restored, mut expired, mut no_room) = (0, 0, 0);
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
            if super::write(self.shard(hash)).restore(hash, record, at) {
                restored += 1;
            } else {
                no_room += 1;
            }
        }
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
        let written = tokio::spawn(async move { inner.save().await }).await;
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

/// Reads the file: its live records, and what was found.
fn load(path: &Path, max_len: u64, now: SystemTime) -> (Vec<Saved>, SnapshotLoad) {
    let ignored = |reason: String| (Vec::new(), SnapshotLoad::Ignored { reason });
    let len = match std::fs::metadata(path) {
        Ok(meta) => meta.len(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return (Vec::new(), SnapshotLoad::Missing);
        }
        Err(e) => return ignored(format!("cannot read the file: {e}")),
    };
    if len > max_len {
        return ignored(format!(
            "the file is {len} bytes, more than twice the store's max_bytes"
        ));
    }
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) => return ignored(format!("cannot read the file: {e}")),
    };
    match decode(&bytes) {
        Ok(records) => {
            let total = records.len();
            let live: Vec<Saved> = records.into_iter().filter(|r| r.expires_at > now).collect();
            let load = SnapshotLoad::Loaded {
                records: live.len(),
                expired: total - live.len(),
            };
            (live, load)
        }
        Err(reason) => ignored(reason),
    }
}

/// The file's bytes for `records`.
pub(super) fn encode(records: &[Saved], written_at: SystemTime) -> Vec<u8> {
    let mut payload = Vec::new();
    payload.extend_from_slice(&millis(written_at).to_be_bytes());
    payload.extend_from_slice(&(records.len() as u64).to_be_bytes());
    for record in records {
        payload.extend_from_slice(record.key.tenant().as_bytes());
        let key = record.key.key().as_bytes();
        // Keys longer than a u16 holds are cut off by no layer: they cannot be begun (255).
        let key = &key[..key.len().min(usize::from(u16::MAX))];
        payload.extend_from_slice(&(key.len() as u16).to_be_bytes());
        payload.extend_from_slice(key);
        payload.extend_from_slice(record.fingerprint.as_bytes());
        payload.extend_from_slice(&millis(record.expires_at).to_be_bytes());
        let response = record.response.encode();
        payload.extend_from_slice(&(response.len() as u64).to_be_bytes());
        payload.extend_from_slice(&response);
    }
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_be_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    out
}

/// The records of a file's bytes, or why they cannot be used. Never panics, and allocates no
/// more than the input's length on any input.
pub(super) fn decode(bytes: &[u8]) -> Result<Vec<Saved>, String> {
    if bytes.len() < MAGIC.len() || &bytes[..MAGIC.len()] != MAGIC {
        if bytes.is_empty() {
            return Err("the file is empty".into());
        }
        if MAGIC.starts_with(bytes) {
            return Err("truncated header".into());
        }
        return Err("not a MemoryStore snapshot (unknown magic bytes)".into());
    }
    let mut buf = &bytes[MAGIC.len()..];
    let version = u32::from_be_bytes(take_array(&mut buf).ok_or("truncated header")?);
    if version != VERSION {
        return Err(format!(
            "written in snapshot format {version}; this version reads format {VERSION}"
        ));
    }
    let len = u64::from_be_bytes(take_array(&mut buf).ok_or("truncated header")?);
    let sum: [u8; 32] = take_array(&mut buf).ok_or("truncated header")?;
    if (buf.len() as u64) < len {
        return Err(format!(
            "truncated: the header announces {len} bytes of records, the file has {}",
            buf.len()
        ));
    }
    if buf.len() as u64 != len {
        return Err("trailing bytes after the records".into());
    }
    if Sha256::digest(buf)[..] != sum[..] {
        return Err("corrupt: the checksum of the records does not match".into());
    }
    decode_payload(buf).map_err(|what| format!("corrupt: {what}"))
}

fn decode_payload(mut buf: &[u8]) -> Result<Vec<Saved>, &'static str> {
    let buf = &mut buf;
    let _written_at = u64::from_be_bytes(take_array(buf).ok_or("truncated")?);
    let count = u64::from_be_bytes(take_array(buf).ok_or("truncated")?);
    let capacity = usize::try_from(count).unwrap_or(usize::MAX);
    let mut records = Vec::with_capacity(capacity.min(buf.len() / MIN_RECORD_LEN));
    for _ in 0..count {
        let tenant = TenantId::from_hash(take_array(buf).ok_or("truncated record")?);
        let key_len = u16::from_be_bytes(take_array(buf).ok_or("truncated record")?);
        let key = take(buf, usize::from(key_len)).ok_or("truncated record")?;
        let key = std::str::from_utf8(key).map_err(|_| "a key is not UTF-8")?;
        let fingerprint = Fingerprint::from_bytes(take_array(buf).ok_or("truncated record")?);
        let expires = u64::from_be_bytes(take_array(buf).ok_or("truncated record")?);
        let len = u64::from_be_bytes(take_array(buf).ok_or("truncated record")?);
        let len = usize::try_from(len).map_err(|_| "a response is too long")?;
        let response = take(buf, len).ok_or("truncated record")?;
        let response = StoredResponse::decode(response).map_err(|_| "a response is invalid")?;
        records.push(Saved {
            key: RecordKey::new(tenant, key),
            fingerprint,
            response,
            expires_at: UNIX_EPOCH + Duration::from_millis(expires),
        });
    }
    if !buf.is_empty() {
        return Err("bytes after the last record");
    }
    Ok(records)
}

fn take<'a>(buf: &mut &'a [u8], len: usize) -> Option<&'a [u8]> {
    if buf.len() < len {
        return None;
    }
    let (head, rest) = buf.split_at(len);
    *buf = rest;
    Some(head)
}

fn take_array<const N: usize>(buf: &mut &[u8]) -> Option<[u8; N]> {
    take(buf, N)?.try_into().ok()
}

/// Milliseconds since the Unix epoch (0 before it, saturating).
fn millis(at: SystemTime) -> u64 {
    let since = at.duration_since(UNIX_EPOCH).unwrap_or_default();
    u64::try_from(since.as_millis()).unwrap_or(u64::MAX)
}

/// Replaces the file at `path` by `bytes`, whole: a new file beside it, synced, renamed over
/// it, and the directory synced. A failure removes the new file and leaves the old one.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let name = path.file_name().ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("the snapshot path {} names no file", path.display()),
        )
    })?;
    let dir = match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    };
    let temp = dir.join(format!(
        ".{}.{}-{:016x}.tmp",
        name.to_string_lossy(),
        std::process::id(),
        super::random_u64()
    ));
    let written = write_then_rename(&temp, path, dir, bytes);
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

fn write_then_rename(temp: &Path, path: &Path, dir: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut file = File::create_new(temp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(temp, path)?;
    sync_dir(dir)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> io::Result<()> {
    Ok(())
}
