//! The snapshot file: a header (magic, format version, the payload's length and its SHA-256),
//! then the payload: when it was written, how many records, and each record (tenant, key,
//! fingerprint, expiry as wall-clock milliseconds since the Unix epoch, the response as
//! [`StoredResponse::encode`] writes it). A file that is not exactly that is ignored.

use std::fs::File;
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use super::{Saved, SnapshotLoad};
use crate::fingerprint::Fingerprint;
use crate::store::RecordKey;
use crate::stored::StoredResponse;
use crate::tenant::TenantId;

const MAGIC: &[u8; 8] = b"TIDEMSNP";
const VERSION: u32 = 1;
/// Magic, version, payload length, SHA-256 of the payload.
pub(super) const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// The fewest bytes a record takes in the payload.
const MIN_RECORD_LEN: usize = 32 + 2 + 32 + 8 + 8;

/// Reads the file: its live records, and what was found. Its header is read and checked
/// first, so that a file that is not a snapshot of this format (another file at the path,
/// however large) is never read whole; a snapshot of up to `max_len` bytes is read whole (one
/// written by a store with larger bounds is cut to this store's bounds when restored), and a
/// larger one is ignored whole: reading it would take that much memory.
pub(super) fn load(path: &Path, max_len: u64, now: SystemTime) -> (Vec<Saved>, SnapshotLoad) {
    let ignored = |reason: String| (Vec::new(), SnapshotLoad::Ignored { reason });
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return (Vec::new(), SnapshotLoad::Missing);
        }
        Err(e) => return ignored(format!("cannot read the file: {e}")),
    };
    let len = match file.metadata() {
        Ok(meta) => meta.len(),
        Err(e) => return ignored(format!("cannot read the file: {e}")),
    };
    let mut bytes = Vec::with_capacity(HEADER_LEN);
    if let Err(e) = (&mut file).take(HEADER_LEN as u64).read_to_end(&mut bytes) {
        return ignored(format!("cannot read the file: {e}"));
    }
    let rest = len.saturating_sub(bytes.len() as u64);
    if let Err(reason) = header(&bytes, rest) {
        return ignored(reason);
    }
    if len > max_len {
        return ignored(format!(
            "the snapshot is {len} bytes, more than this store reads ({max_len}: 16 times its \
             max_bytes, and 1 MiB)"
        ));
    }
    let room = usize::try_from(rest).ok();
    if room.is_none_or(|room| bytes.try_reserve_exact(room).is_err()) {
        return ignored(format!("no memory to read a snapshot of {len} bytes"));
    }
    if let Err(e) = file.read_to_end(&mut bytes) {
        return ignored(format!("cannot read the file: {e}"));
    }
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

/// Writes the file for `records` to `out`, streaming: the header's place first, then the
/// payload (hashed as it goes, one record's encoded response in memory at a time), then the
/// header over its place.
pub(super) fn write<W: Write + Seek>(
    mut out: W,
    records: &[Saved],
    written_at: SystemTime,
) -> io::Result<W> {
    out.write_all(&[0; HEADER_LEN])?;
    let mut payload = Hashed {
        out: &mut out,
        sha: Sha256::new(),
        len: 0,
    };
    payload.write_all(&millis(written_at).to_be_bytes())?;
    payload.write_all(&(records.len() as u64).to_be_bytes())?;
    for record in records {
        payload.write_all(record.key.tenant().as_bytes())?;
        let key = record.key.key().as_bytes();
        // No key longer than a u16 holds can be begun through the layer (255 at most).
        let key = &key[..key.len().min(usize::from(u16::MAX))];
        payload.write_all(&(key.len() as u16).to_be_bytes())?;
        payload.write_all(key)?;
        payload.write_all(record.fingerprint.as_bytes())?;
        payload.write_all(&millis(record.expires_at).to_be_bytes())?;
        let response = record.response.encode();
        payload.write_all(&(response.len() as u64).to_be_bytes())?;
        payload.write_all(&response)?;
    }
    let (sum, len) = (payload.sha.finalize(), payload.len);
    out.seek(SeekFrom::Start(0))?;
    out.write_all(MAGIC)?;
    out.write_all(&VERSION.to_be_bytes())?;
    out.write_all(&len.to_be_bytes())?;
    out.write_all(&sum)?;
    out.seek(SeekFrom::End(0))?;
    Ok(out)
}

/// The file's bytes for `records`, in memory.
#[cfg(test)]
pub(super) fn encode(records: &[Saved], written_at: SystemTime) -> Vec<u8> {
    let out = write(io::Cursor::new(Vec::new()), records, written_at);
    out.expect("writing to memory cannot fail").into_inner()
}

/// A writer that hashes and counts what goes through it.
struct Hashed<W> {
    out: W,
    sha: Sha256,
    len: u64,
}

impl<W: Write> Write for Hashed<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.out.write(buf)?;
        self.sha.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.out.flush()
    }
}

/// The records of a file's bytes, or why they cannot be used. Never panics, and allocates no
/// more than the input's length on any input.
pub(super) fn decode(bytes: &[u8]) -> Result<Vec<Saved>, String> {
    let head = &bytes[..bytes.len().min(HEADER_LEN)];
    let sum = header(head, (bytes.len() - head.len()) as u64)?;
    let payload = &bytes[HEADER_LEN..];
    if Sha256::digest(payload)[..] != sum[..] {
        return Err("corrupt: the checksum of the records does not match".into());
    }
    decode_payload(payload).map_err(|what| format!("corrupt: {what}"))
}

/// Checks the header `head` (the file's first bytes, up to [`HEADER_LEN`]) against the `rest`
/// bytes that follow it in the file, and returns the payload's SHA-256.
fn header(head: &[u8], rest: u64) -> Result<[u8; 32], String> {
    if head.len() < MAGIC.len() || &head[..MAGIC.len()] != MAGIC {
        if head.is_empty() {
            return Err("the file is empty".into());
        }
        if MAGIC.starts_with(head) {
            return Err("truncated header".into());
        }
        return Err("not a MemoryStore snapshot (unknown magic bytes)".into());
    }
    let mut buf = &head[MAGIC.len()..];
    let version = u32::from_be_bytes(take_array(&mut buf).ok_or("truncated header")?);
    if version != VERSION {
        return Err(format!(
            "written in snapshot format {version}; this version reads format {VERSION}"
        ));
    }
    let len = u64::from_be_bytes(take_array(&mut buf).ok_or("truncated header")?);
    let sum: [u8; 32] = take_array(&mut buf).ok_or("truncated header")?;
    if rest < len {
        return Err(format!(
            "truncated: the header announces {len} bytes of records, the file has {rest}"
        ));
    }
    if rest != len {
        return Err("trailing bytes after the records".into());
    }
    Ok(sum)
}

fn decode_payload(mut buf: &[u8]) -> Result<Vec<Saved>, &'static str> {
    let buf = &mut buf;
    let _written_at = u64::from_be_bytes(take_array(buf).ok_or("truncated")?);
    let count = u64::from_be_bytes(take_array(buf).ok_or("truncated")?);
    let capacity = usize::try_from(count).unwrap_or(usize::MAX);
    let mut records = Vec::with_capacity(capacity.min(buf.len() / MIN_RECORD_LEN));
    for _ in 0..count {
        let tenant = TenantId::from_bytes(take_array(buf).ok_or("truncated record")?);
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

/// Replaces the file at `path` by the snapshot of `records`, whole: a new file beside it,
/// written, synced, renamed over it, and the directory synced. A failure removes the new file
/// and leaves the old one. A `path` that is a symbolic link (a release's link into a directory
/// its releases share) is written through: the file it points to is replaced, and the link
/// stays.
pub(super) fn write_atomically(
    path: &Path,
    records: &[Saved],
    written_at: SystemTime,
) -> io::Result<()> {
    let path = &resolve(path)?;
    let (dir, prefix) = temp_names(path)?;
    let temp = dir.join(format!(
        "{prefix}{}-{:016x}.tmp",
        std::process::id(),
        super::super::random_u64()
    ));
    let written = write_then_rename(&temp, path, dir, records, written_at);
    if written.is_err() {
        let _ = std::fs::remove_file(&temp);
    }
    written
}

/// The file the snapshot at `path` is: `path`, or the file the symbolic link at `path` points
/// to, link after link (at most 40, as the kernel follows), which need not exist yet.
fn resolve(path: &Path) -> io::Result<PathBuf> {
    let mut path = path.to_path_buf();
    for _ in 0..40 {
        let is_link = std::fs::symlink_metadata(&path).is_ok_and(|meta| meta.is_symlink());
        if !is_link {
            return Ok(path);
        }
        let target = std::fs::read_link(&path)?;
        // A relative target is relative to the link's directory; `join` keeps an absolute one.
        path = match path.parent() {
            Some(dir) => dir.join(target),
            None => target,
        };
    }
    Err(io::Error::new(
        io::ErrorKind::InvalidInput,
        format!("the snapshot path {} is a loop of links", path.display()),
    ))
}

/// The directory of the snapshot at `path`, and how the names of its temporary files begin
/// (`.<file name>.`; each then has a process id, a random part and `.tmp`).
fn temp_names(path: &Path) -> io::Result<(&Path, String)> {
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
    Ok((dir, format!(".{}.", name.to_string_lossy())))
}

/// How long a temporary file of the snapshot may go unwritten before it is taken for the
/// leftover of a writer that died (a process killed mid-write): a write streams its file
/// without pause, so even a large store's takes seconds.
const STALE_TEMP: Duration = Duration::from_secs(600);

/// Removes the temporary files of the snapshot at `path` that writers which died left behind
/// (not written for [`STALE_TEMP`]; another process's write in progress is left alone), and
/// answers how many it removed. Each could be as large as a snapshot: a process killed again and
/// again mid-write would otherwise fill the disk.
pub(super) fn remove_stale_temps(path: &Path, now: SystemTime) -> usize {
    let Ok(path) = resolve(path) else {
        return 0;
    };
    let Ok((dir, prefix)) = temp_names(&path) else {
        return 0;
    };
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if !(name.starts_with(&prefix) && name.ends_with(".tmp")) {
            continue;
        }
        let modified = entry.metadata().and_then(|meta| meta.modified());
        let stale =
            modified.is_ok_and(|at| now.duration_since(at).unwrap_or_default() > STALE_TEMP);
        if stale && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn write_then_rename(
    temp: &Path,
    path: &Path,
    dir: &Path,
    records: &[Saved],
    written_at: SystemTime,
) -> io::Result<()> {
    let file = BufWriter::new(create_private(temp)?);
    let file = write(file, records, written_at)?
        .into_inner()
        .map_err(io::IntoInnerError::into_error)?;
    file.sync_all()?;
    drop(file);
    std::fs::rename(temp, path)?;
    sync_dir(dir)
}

/// Creates `path`, which must not exist, readable and writable by this process's user alone
/// (on Unix: mode `0600`, whatever the umask): the file holds stored responses, with their
/// bodies and, for a tenant's records, their `Set-Cookie` headers.
fn create_private(path: &Path) -> io::Result<File> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path)
}

#[cfg(unix)]
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(not(unix))]
fn sync_dir(_: &Path) -> io::Result<()> {
    Ok(())
}
