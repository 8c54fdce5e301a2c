//! Snapshots: the round trip, what is left out, files that cannot be used, the atomic write,
//! the periodic writer.

use std::path::PathBuf;

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use proptest::prelude::*;

use super::super::*;
use super::file::{HEADER_LEN, decode, encode};
use super::*;
use crate::fingerprint::Fingerprint;
use crate::store::RecordState;
use crate::store::{Begin, IdempotencyStore};
use crate::stored::StoredResponse;
use crate::tenant::TenantId;

const LEASE: Duration = Duration::from_secs(10);
const TTL: Duration = Duration::from_secs(3600);

/// A directory of its own, removed when dropped.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Self {
        let dir = std::env::temp_dir().join(format!(
            "tower-idempotency-snapshot-{}-{:016x}",
            std::process::id(),
            random_u64()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        Self(dir)
    }

    fn file(&self) -> PathBuf {
        self.0.join("store.snapshot")
    }

    fn entries(&self) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(&self.0)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn key(t: u8, k: &str) -> RecordKey {
    RecordKey::new(TenantId::hashed([t]), k)
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn created(body: &'static [u8]) -> StoredResponse {
    let mut headers = HeaderMap::new();
    headers.insert("location", "/payments/1".parse().unwrap());
    headers.append("set-cookie", "a=1".parse().unwrap());
    headers.append("set-cookie", "b=2".parse().unwrap());
    StoredResponse::new(StatusCode::CREATED, headers, Bytes::from_static(body))
}

async fn complete(store: &MemoryStore, k: &RecordKey, response: StoredResponse, ttl: Duration) {
    let Begin::Acquired(token) = store.begin(k, &fp(1), LEASE).await.unwrap() else {
        panic!("a new key");
    };
    store.complete(k, token, response, ttl).await.unwrap();
}

/// Writes a snapshot of `n` completed records of tenant 1, keys "0" to "n - 1", each answered
/// `body`, record `i` expiring `TTL + i` seconds after `now`.
fn write_spread(path: &std::path::Path, n: u64, body: &'static [u8], now: SystemTime) {
    let records: Vec<Saved> = (0..n)
        .map(|i| Saved {
            key: key(1, &i.to_string()),
            fingerprint: fp(1),
            response: created(body),
            expires_at: now + TTL + Duration::from_secs(i),
        })
        .collect();
    std::fs::write(path, encode(&records, now)).unwrap();
}

fn with_snapshot(path: &std::path::Path) -> MemoryStore {
    MemoryStore::builder().snapshot(path).build()
}

#[tokio::test]
async fn completed_records_survive_a_restart_and_in_flight_ones_do_not() {
    let dir = TempDir::new();
    let store = with_snapshot(&dir.file());
    assert_eq!(
        store.snapshot_status().unwrap().load(),
        &SnapshotLoad::Missing
    );
    let binary: &'static [u8] = &[0, 1, 2, 255, 254, b'\n'];
    complete(&store, &key(1, "a"), created(b"{\"id\":1}"), TTL).await;
    complete(&store, &key(2, "a"), created(binary), TTL).await;
    let shared = RecordKey::new(TenantId::shared(), "s");
    complete(
        &store,
        &shared,
        StoredResponse::omitted(StatusCode::OK),
        TTL,
    )
    .await;
    let Begin::Acquired(_) = store
        .begin(&key(1, "running"), &fp(1), LEASE)
        .await
        .unwrap()
    else {
        panic!("a new key");
    };
    let before = store.lookup(&key(1, "a")).await.unwrap().unwrap();

    assert_eq!(
        store.save_snapshot().await.unwrap(),
        3,
        "in flight is not written"
    );
    let status = store.snapshot_status().unwrap();
    assert_eq!(status.last_save().map(|(_, n)| n), Some(3));
    assert_eq!(status.last_error(), None);
    // It holds responses (bodies, a tenant's cookies): its owner alone reads it, whatever the
    // umask.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.file()).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{mode:o}");
    }
    assert_eq!(
        dir.entries(),
        ["store.snapshot"],
        "no temporary file is left"
    );
    drop(store);

    let restarted = with_snapshot(&dir.file());
    assert_eq!(
        restarted.snapshot_status().unwrap().load(),
        &SnapshotLoad::Loaded {
            records: 3,
            expired: 0
        }
    );
    for (k, body) in [(key(1, "a"), &b"{\"id\":1}"[..]), (key(2, "a"), binary)] {
        let Begin::Completed(replay) = restarted.begin(&k, &fp(1), LEASE).await.unwrap() else {
            panic!("{k:?} replays");
        };
        assert_eq!(replay, created(Box::leak(body.to_vec().into_boxed_slice())));
    }
    assert!(matches!(
        restarted.begin(&key(1, "a"), &fp(2), LEASE).await.unwrap(),
        Begin::Mismatch
    ));
    let Begin::Completed(omitted) = restarted.begin(&shared, &fp(1), LEASE).await.unwrap() else {
        panic!("the shared scope's record replays");
    };
    assert!(omitted.is_omitted());
    assert!(
        matches!(
            restarted
                .begin(&key(1, "running"), &fp(1), LEASE)
                .await
                .unwrap(),
            Begin::Acquired(_)
        ),
        "an in-flight record is not restored"
    );
    // The expiry is the same wall-clock time, to the millisecond.
    let after = restarted.lookup(&key(1, "a")).await.unwrap().unwrap();
    let (
        RecordState::Completed { expires_at: a, .. },
        RecordState::Completed { expires_at: b, .. },
    ) = (before.state, after.state)
    else {
        panic!("completed");
    };
    let gap = a.duration_since(b).unwrap_or_else(|e| e.duration());
    assert!(gap <= Duration::from_millis(2), "{gap:?}");
    assert_eq!(restarted.tenant_entry_count(&TenantId::hashed([1])), 2);
    for shard in restarted.inner.shards() {
        read(shard).check_counts();
    }
}

#[tokio::test]
async fn expired_records_are_dropped_at_load() {
    let dir = TempDir::new();
    let now = SystemTime::now();
    let saved = |k: &str, expires_at| Saved {
        key: key(1, k),
        fingerprint: fp(1),
        response: created(b"x"),
        expires_at,
    };
    let records = [
        saved("gone", now - Duration::from_secs(1)),
        saved("live", now + TTL),
    ];
    std::fs::write(dir.file(), encode(&records, now)).unwrap();
    let store = with_snapshot(&dir.file());
    assert_eq!(
        store.snapshot_status().unwrap().load(),
        &SnapshotLoad::Loaded {
            records: 1,
            expired: 1
        }
    );
    assert!(store.lookup(&key(1, "gone")).await.unwrap().is_none());
    assert!(store.lookup(&key(1, "live")).await.unwrap().is_some());
    assert_eq!(store.entry_count(), 1);
}

#[tokio::test]
async fn a_store_restores_what_its_bounds_hold_the_farthest_expiry_first() {
    let dir = TempDir::new();
    let now = SystemTime::now();
    write_spread(&dir.file(), 10, b"x", now);
    let store = MemoryStore::builder()
        .max_entries(8)
        .max_entries_per_tenant(4)
        .snapshot(dir.file())
        .build();
    assert_eq!(store.entry_count(), 0, "put in the store at its first use");
    assert!(store.lookup(&key(1, "9")).await.unwrap().is_some());
    assert!(store.lookup(&key(1, "2")).await.unwrap().is_some());
    assert!(store.lookup(&key(1, "1")).await.unwrap().is_none());
    assert!(store.lookup(&key(1, "0")).await.unwrap().is_none());
    assert_eq!(
        store.entry_count(),
        8,
        "one tenant fills the store, its share notwithstanding"
    );
    assert_eq!(store.tenant_entry_count(key(1, "0").tenant()), 8);
    assert_eq!(store.evicted(), 0);
}

/// After a deploy that lowered `max_bytes`, the file (written under the larger bound, here
/// four times the new one) is still read, and what the new bound holds is restored: the
/// farthest expiries.
#[tokio::test]
async fn a_snapshot_from_a_larger_store_is_cut_to_the_new_bounds() {
    let dir = TempDir::new();
    let now = SystemTime::now();
    static BODY: [u8; 100_000] = [b'x'; 100_000];
    write_spread(&dir.file(), 40, &BODY, now);
    let file_len = std::fs::metadata(dir.file()).unwrap().len();
    let max_bytes = 1 << 20;
    assert!(file_len > 3 * max_bytes as u64, "{file_len}");
    let store = MemoryStore::builder()
        .max_bytes(max_bytes)
        .snapshot(dir.file())
        .build();
    assert_eq!(
        store.snapshot_status().unwrap().load(),
        &SnapshotLoad::Loaded {
            records: 40,
            expired: 0
        }
    );
    assert!(store.lookup(&key(1, "39")).await.unwrap().is_some());
    assert!(store.lookup(&key(1, "0")).await.unwrap().is_none());
    let held = store.entry_count();
    assert!(
        (5..=12).contains(&held),
        "about max_bytes of records: {held}"
    );
    // A shard checks its bound before it takes a record: each may end one record over.
    assert!(
        store.weighted_size() < max_bytes * 3 / 2,
        "{}",
        store.weighted_size()
    );
    for i in 40 - held..40 {
        let found = store.lookup(&key(1, &i.to_string())).await.unwrap();
        assert!(found.is_some(), "the farthest expiries are kept: {i}");
    }
}

fn ignored(bytes: &[u8]) -> (String, MemoryStore, TempDir) {
    let dir = TempDir::new();
    std::fs::write(dir.file(), bytes).unwrap();
    let store = with_snapshot(&dir.file());
    let status = store.snapshot_status().unwrap();
    let SnapshotLoad::Ignored { reason } = status.load() else {
        panic!("ignored: {status:?}");
    };
    (reason.clone(), store, dir)
}

#[tokio::test]
async fn files_that_cannot_be_used_are_reported_and_ignored() {
    let now = SystemTime::now();
    let records = [Saved {
        key: key(1, "a"),
        fingerprint: fp(1),
        response: created(b"body"),
        expires_at: now + TTL,
    }];
    let good = encode(&records, now);

    let (reason, store, dir) = ignored(b"");
    assert!(reason.contains("empty"), "{reason}");
    // The store starts empty and works; the next save replaces the file.
    complete(&store, &key(1, "b"), created(b"b"), TTL).await;
    assert_eq!(store.save_snapshot().await.unwrap(), 1);
    let again = with_snapshot(&dir.file());
    assert!(matches!(
        again.snapshot_status().unwrap().load(),
        SnapshotLoad::Loaded { records: 1, .. }
    ));

    let (reason, ..) = ignored(b"GET / HTTP/1.1\r\n\r\nnot a snapshot at all");
    assert!(reason.contains("magic"), "{reason}");
    for cut in [4, 10, 30, good.len() / 2, good.len() - 1] {
        let (reason, store, _dir) = ignored(&good[..cut]);
        assert!(reason.contains("truncated"), "cut at {cut}: {reason}");
        assert!(store.is_empty());
    }
    let mut corrupt = good.clone();
    *corrupt.last_mut().unwrap() ^= 1;
    let (reason, ..) = ignored(&corrupt);
    assert!(reason.contains("checksum"), "{reason}");
    let mut other_version = good.clone();
    other_version[8..12].copy_from_slice(&2u32.to_be_bytes());
    let (reason, ..) = ignored(&other_version);
    assert!(reason.contains("format 2"), "{reason}");
    let mut longer = good.clone();
    longer.push(0);
    let (reason, ..) = ignored(&longer);
    assert!(reason.contains("trailing"), "{reason}");

    // Another file at the path, a terabyte (sparse): recognised by its first bytes, never
    // read whole.
    let dir = TempDir::new();
    std::fs::File::create(dir.file())
        .unwrap()
        .set_len(1 << 40)
        .unwrap();
    let store = MemoryStore::builder()
        .max_bytes(1 << 20)
        .snapshot(dir.file())
        .build();
    let status = store.snapshot_status().unwrap();
    assert!(
        matches!(status.load(), SnapshotLoad::Ignored { reason } if reason.contains("magic")),
        "{:?}",
        status.load()
    );

    // A snapshot more than 16 times the store's max_bytes: not read.
    let dir = TempDir::new();
    static BODY: [u8; 100_000] = [b'x'; 100_000];
    let now = SystemTime::now();
    write_spread(&dir.file(), 30, &BODY, now);
    let store = MemoryStore::builder()
        .max_bytes(64 << 10)
        .snapshot(dir.file())
        .build();
    let status = store.snapshot_status().unwrap();
    assert!(
        matches!(status.load(), SnapshotLoad::Ignored { reason } if reason.contains("16 times")),
        "{:?}",
        status.load()
    );

    // A directory where the file should be: unreadable.
    let dir = TempDir::new();
    std::fs::create_dir(dir.file()).unwrap();
    let store = with_snapshot(&dir.file());
    assert!(matches!(
        store.snapshot_status().unwrap().load(),
        SnapshotLoad::Ignored { .. }
    ));
}

/// A writer killed mid-write (`kill -9`) leaves its temporary file: the next store built on the
/// path removes such leftovers, once they have not been written for ten minutes, and leaves a
/// write in progress (a fresh one) and every other file alone.
#[test]
fn leftover_temporary_files_of_dead_writers_are_removed_at_build() {
    let dir = TempDir::new();
    let old = SystemTime::now() - Duration::from_secs(3600);
    let make = |name: &str, modified: Option<SystemTime>| {
        let file = std::fs::File::create(dir.0.join(name)).unwrap();
        if let Some(at) = modified {
            file.set_modified(at).unwrap();
        }
    };
    make(".store.snapshot.4242-00000000000000aa.tmp", Some(old));
    make(".store.snapshot.4243-00000000000000bb.tmp", Some(old));
    make(".store.snapshot.4244-00000000000000cc.tmp", None);
    make(".other.snapshot.4242-00000000000000aa.tmp", Some(old));
    make("notes.tmp", Some(old));
    let _store = with_snapshot(&dir.file());
    assert_eq!(
        dir.entries(),
        [
            ".other.snapshot.4242-00000000000000aa.tmp",
            ".store.snapshot.4244-00000000000000cc.tmp",
            "notes.tmp",
        ]
    );
}

#[tokio::test]
async fn a_failed_write_leaves_the_old_file_and_is_reported() {
    let dir = TempDir::new();
    let store = with_snapshot(&dir.file());
    complete(&store, &key(1, "a"), created(b"a"), TTL).await;
    store.save_snapshot().await.unwrap();
    let old = std::fs::read(dir.file()).unwrap();

    // The file's directory is gone: the write fails, and says why.
    let gone = TempDir::new();
    let path = gone.file();
    drop(gone);
    let elsewhere = with_snapshot(&path);
    complete(&elsewhere, &key(1, "a"), created(b"a"), TTL).await;
    let err = elsewhere.save_snapshot().await.unwrap_err();
    let status = elsewhere.snapshot_status().unwrap();
    assert_eq!(status.last_error(), Some(err.to_string().as_str()));
    assert_eq!(status.last_save(), None);
    assert_eq!(std::fs::read(dir.file()).unwrap(), old);

    let none = MemoryStore::new().save_snapshot().await.unwrap_err();
    assert_eq!(none.kind(), std::io::ErrorKind::InvalidInput);
    assert!(MemoryStore::new().snapshot_status().is_none());
}

/// A release's snapshot path that links into a directory releases share (as deploy tools lay
/// them out): the write goes through the link to the shared file, and the link stays, so the
/// next release, linked to the same file, restores what this one saved.
#[cfg(unix)]
#[tokio::test]
async fn a_snapshot_path_that_is_a_link_is_written_through() {
    use std::os::unix::fs::symlink;

    let dir = TempDir::new();
    let shared = dir.0.join("shared");
    std::fs::create_dir(&shared).unwrap();
    let releases: Vec<PathBuf> = ["release-1", "release-2"]
        .iter()
        .map(|release| {
            let release = dir.0.join(release);
            std::fs::create_dir(&release).unwrap();
            let link = release.join("store.snapshot");
            // Relative, to a file that does not exist yet.
            symlink("../shared/store.snapshot", &link).unwrap();
            link
        })
        .collect();
    let first = with_snapshot(&releases[0]);
    complete(&first, &key(1, "a"), created(b"a"), TTL).await;
    assert_eq!(first.save_snapshot().await.unwrap(), 1);
    drop(first);
    assert!(
        std::fs::symlink_metadata(&releases[0])
            .unwrap()
            .is_symlink()
    );
    assert!(
        std::fs::metadata(shared.join("store.snapshot"))
            .unwrap()
            .is_file()
    );
    // No temporary file left beside the link or the file.
    let names = |at: &std::path::Path| -> Vec<String> {
        let entries = std::fs::read_dir(at).unwrap();
        entries
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(names(&shared), ["store.snapshot"]);
    assert_eq!(names(releases[0].parent().unwrap()), ["store.snapshot"]);

    let second = with_snapshot(&releases[1]);
    assert_eq!(
        second.snapshot_status().unwrap().load(),
        &SnapshotLoad::Loaded {
            records: 1,
            expired: 0
        }
    );
    assert!(matches!(
        second.begin(&key(1, "a"), &fp(1), LEASE).await.unwrap(),
        Begin::Completed(_)
    ));
}

#[tokio::test]
async fn the_background_writer_saves_every_interval_and_ends_with_the_store() {
    let dir = TempDir::new();
    let store = MemoryStore::builder()
        .snapshot(dir.file())
        .snapshot_interval(Duration::from_millis(20))
        .build();
    complete(&store, &key(1, "a"), created(b"a"), TTL).await;
    let mut saved = false;
    for _ in 0..500 {
        if store
            .snapshot_status()
            .unwrap()
            .last_save()
            .is_some_and(|(_, n)| n == 1)
        {
            saved = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(saved, "the periodic write ran");
    let loaded = with_snapshot(&dir.file());
    assert!(matches!(
        loaded.snapshot_status().unwrap().load(),
        SnapshotLoad::Loaded { records: 1, .. }
    ));
    let weak = Arc::downgrade(&store.inner);
    drop(store);
    let mut ended = false;
    for _ in 0..500 {
        if weak.upgrade().is_none() {
            ended = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(ended, "nothing holds the store once it is dropped");
}

#[tokio::test]
async fn the_periodic_write_skips_a_store_that_did_not_change() {
    let dir = TempDir::new();
    let store = with_snapshot(&dir.file());
    complete(&store, &key(1, "a"), created(b"a"), TTL).await;
    assert_eq!(store.inner.save(false).await.unwrap(), Some(1));
    assert_eq!(
        store.inner.save(false).await.unwrap(),
        None,
        "nothing changed"
    );
    // An in-flight record is no change to the file.
    let Begin::Acquired(token) = store.begin(&key(1, "b"), &fp(1), LEASE).await.unwrap() else {
        panic!("a new key");
    };
    assert_eq!(store.inner.save(false).await.unwrap(), None);
    store
        .complete(&key(1, "b"), token, created(b"b"), TTL)
        .await
        .unwrap();
    assert_eq!(store.inner.save(false).await.unwrap(), Some(2));
    store.forget(&key(1, "a"), false).await.unwrap();
    assert_eq!(store.inner.save(false).await.unwrap(), Some(1));
    // `save_snapshot` always writes.
    assert_eq!(store.save_snapshot().await.unwrap(), 1);
    assert_eq!(dir.entries(), ["store.snapshot"]);
}

#[test]
fn snapshot_settings_are_checked_in_build() {
    fn message(f: impl FnOnce() + std::panic::UnwindSafe) -> String {
        let err = std::panic::catch_unwind(f).unwrap_err();
        err.downcast_ref::<String>().cloned().unwrap_or_default()
    }
    let zero = message(|| {
        drop(
            MemoryStore::builder()
                .snapshot_interval(Duration::ZERO)
                .build(),
        )
    });
    assert!(
        zero.contains("snapshot_interval must be longer than zero"),
        "{zero}"
    );
    let huge = message(|| {
        drop(
            MemoryStore::builder()
                .snapshot_interval(Duration::MAX)
                .build(),
        )
    });
    assert!(huge.contains("at most 365 days"), "{huge}");
    let empty = message(|| drop(MemoryStore::builder().snapshot("").build()));
    assert!(empty.contains("must name a file"), "{empty}");
    let store = MemoryStore::new();
    assert_eq!(
        store.settings().snapshot_interval(),
        Duration::from_secs(30)
    );
    assert_eq!(store.snapshot_path(), None);
}

proptest! {
    /// Any bytes, and any change to a valid file, are refused or read: never a panic.
    #[test]
    fn decoding_never_panics(
        garbage in prop::collection::vec(any::<u8>(), 0..512),
        flips in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let _ = decode(&garbage);
        let now = SystemTime::now();
        let records = [Saved {
            key: key(1, "a"),
            fingerprint: fp(1),
            response: created(b"body"),
            expires_at: now + TTL,
        }];
        let mut bytes = encode(&records, now);
        // Past the header, with the checksum recomputed: what the record decoder sees.
        let payload_at = HEADER_LEN;
        for (at, value) in flips {
            let i = payload_at + at.index(bytes.len() - payload_at);
            bytes[i] ^= value | 1;
        }
        let sum = <sha2::Sha256 as sha2::Digest>::digest(&bytes[payload_at..]);
        bytes[20..52].copy_from_slice(&sum);
        let _ = decode(&bytes);
    }
}
