//! The record layout in Redis and the Lua scripts that read and write it, one key each.

use std::sync::LazyLock;
use std::time::{Duration, SystemTime};

use crate::fingerprint::Fingerprint;
use crate::store::{LockToken, RecordInfo, RecordState, StoreError, StoreErrorKind, whole_millis};
use crate::stored::StoredResponse;
use crate::util::Decimal;

/// The first byte of every record: the layout's version.
pub(super) const VERSION: u8 = 1;
/// The state byte of an in-flight record.
pub(super) const IN_FLIGHT: u8 = b'f';
/// The state byte of a completed record.
pub(super) const COMPLETED: u8 = b'c';
/// Version, state, fingerprint (32 bytes) and lock token (16 bytes).
pub(super) const HEAD_LEN: usize = 2 + 32 + 16;

/// `true`, and the record's head, when `KEYS[1]` is in flight and held by the token `t`.
const HELD: &str = r"
local function held(t)
  local head = redis.call('GETRANGE', KEYS[1], 0, 49)
  return string.len(head) == 50 and string.sub(head, 1, 2) == '\1f'
    and string.sub(head, 35, 50) == t, head
end
";

/// `begin`. ARGV: fingerprint, the in-flight record to write, lease in ms.
/// Returns 0 (acquired), 1 (in flight), 2 (mismatch), 3 (unreadable record), or the whole
/// completed record. A record in flight under the token of the record to write is this call's
/// own (a first run whose answer a dropped connection lost): acquired again. Tokens are random,
/// so no other call meets it.
///
/// An existing key is a live record: Redis removes a record itself when its lease (in flight)
/// or its TTL (completed) runs out, so a dead holder's record is simply gone.
pub(super) static BEGIN: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
local head = redis.call('GETRANGE', KEYS[1], 0, 49)
if head == '' then
  redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
  return 0
end
if string.len(head) ~= 50 or string.byte(head, 1) ~= 1 then
  return 3
end
if string.sub(head, 3, 34) ~= ARGV[1] then
  return 2
end
local state = string.sub(head, 2, 2)
if state == 'f' then
  if string.sub(head, 35, 50) == string.sub(ARGV[2], 35, 50) then
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return 0
  end
  return 1
end
if state == 'c' then
  return redis.call('GET', KEYS[1])
end
return 3
",
    )
});

/// `renew`. ARGV: token, lease in ms. Returns 1, or 0 when the token does not hold the record.
pub(super) static RENEW: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        "{HELD}
if held(ARGV[1]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
return 0
"
    ))
});

/// `complete`. ARGV: token, encoded response, TTL in ms, and `1` when the call is run again
/// after a dropped connection. Rewrites the record as completed (keeping its fingerprint) with
/// the TTL as its expiry. Run again, a record this token completed counts as done: the first
/// run did it; its expiry is set again, a write on this connection, so that a replica wait
/// after it covers the first run's write too (a new connection has written nothing yet).
pub(super) static COMPLETE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        "{HELD}
local ok, head = held(ARGV[1])
if ok then
  redis.call('SET', KEYS[1], '\\1c' .. string.sub(head, 3, 50) .. ARGV[2], 'PX', ARGV[3])
  return 1
end
if ARGV[4] == '1' and string.sub(head, 1, 2) == '\\1c' and string.sub(head, 35, 50) == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  return 1
end
return 0
"
    ))
});

/// `release`. ARGV: token, and `1` when the call is run again after a dropped connection.
/// Deletes the record if the token holds it. Run again, no record counts as done.
pub(super) static RELEASE: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(format!(
        "{HELD}
local ok, head = held(ARGV[1])
if ok then
  redis.call('DEL', KEYS[1])
  return 1
end
if ARGV[2] == '1' and head == '' then
  return 1
end
return 0
"
    ))
});

/// `lookup`. Returns nil when there is no record, or the record and its expiry in ms since the
/// Unix epoch, on the server's clock (`PEXPIRETIME`, or `TIME` + `PTTL` before Redis 7), so that
/// two lookups of one record agree. Changes nothing.
pub(super) static LOOKUP: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
local record = redis.call('GET', KEYS[1])
if not record then
  return false
end
local at = redis.pcall('PEXPIRETIME', KEYS[1])
if type(at) ~= 'number' then
  local now = redis.call('TIME')
  local pttl = redis.call('PTTL', KEYS[1])
  if pttl < 0 then
    at = pttl
  else
    at = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000) + pttl
  end
end
return {record, at}
",
    )
});

/// `forget`. ARGV: `1` to force. Returns 0 (no record), 1 (removed) or 2 (in flight, left
/// alone). A value that is not a record is removed too: the key is ours.
pub(super) static FORGET: LazyLock<Lua> = LazyLock::new(|| {
    Lua::new(
        r"
local head = redis.call('GETRANGE', KEYS[1], 0, 1)
if head == '' then
  return 0
end
if head == '\1f' and ARGV[1] ~= '1' then
  return 2
end
redis.call('DEL', KEYS[1])
return 1
",
    )
});

/// A Lua script: its source, and the SHA-1 that `EVALSHA` calls it by.
pub(super) struct Lua {
    pub(super) source: String,
    pub(super) sha1: String,
}

impl Lua {
    fn new(source: impl Into<String>) -> Self {
        let source = source.into();
        let sha1 = ::redis::Script::new(&source).get_hash().to_owned();
        Self { source, sha1 }
    }
}

/// Every script, to load them on a new connection.
pub(super) fn all() -> [&'static Lua; 6] {
    [&BEGIN, &RENEW, &COMPLETE, &RELEASE, &LOOKUP, &FORGET]
}

/// The in-flight record `begin` writes: head only.
pub(super) fn in_flight(fingerprint: &Fingerprint, token: LockToken) -> Vec<u8> {
    let mut record = Vec::with_capacity(HEAD_LEN);
    record.extend_from_slice(&[VERSION, IN_FLIGHT]);
    record.extend_from_slice(fingerprint.as_bytes());
    record.extend_from_slice(&token.as_u128().to_be_bytes());
    record
}

/// A duration as whole milliseconds ([`whole_millis`]), in decimal, as `PX`, `PEXPIRE` and
/// `WAIT` take it: written on the stack, not formatted into a `String`.
pub(super) fn millis(duration: Duration) -> Decimal {
    Decimal::of(whole_millis(duration))
}

/// Reads a completed record back: its head, then the encoded response.
pub(super) fn decode_completed(bytes: &[u8]) -> Result<StoredResponse, StoreError> {
    match bytes.split_at_checked(HEAD_LEN) {
        Some((head, response)) if head[..2] == [VERSION, COMPLETED] => {
            StoredResponse::decode(response)
                .map_err(|err| StoreError::new(StoreErrorKind::Corrupt, err))
        }
        _ => Err(corrupt()),
    }
}

/// Reads any record back for `lookup`, given its expiry in ms since the Unix epoch.
pub(super) fn decode_info(bytes: &[u8], expires_at_ms: i64) -> Result<RecordInfo, StoreError> {
    let Some((head, rest)) = bytes.split_at_checked(HEAD_LEN) else {
        return Err(corrupt());
    };
    let mut fingerprint = [0; 32];
    fingerprint.copy_from_slice(&head[2..34]);
    let fingerprint = Fingerprint::from_bytes(fingerprint);
    // Every record is written with an expiry; a key without one (-1) was not written here.
    let at = u64::try_from(expires_at_ms).map_err(|_| corrupt())?;
    let until = SystemTime::UNIX_EPOCH + Duration::from_millis(at);
    let state = match head[..2] {
        [VERSION, IN_FLIGHT] if rest.is_empty() => RecordState::InFlight { lease_until: until },
        [VERSION, COMPLETED] => {
            let response = StoredResponse::decode(rest)
                .map_err(|err| StoreError::new(StoreErrorKind::Corrupt, err))?;
            RecordState::Completed {
                status: response.status(),
                replayable: !response.is_omitted(),
                expires_at: until,
            }
        }
        _ => return Err(corrupt()),
    };
    Ok(RecordInfo::new(fingerprint, state))
}

fn corrupt() -> StoreError {
    StoreError::msg(
        StoreErrorKind::Corrupt,
        "the Redis key does not hold an idempotency record",
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use http::{HeaderMap, StatusCode};

    #[test]
    fn millis_round_up_and_clamp() {
        assert_eq!(millis(Duration::ZERO), "1");
        assert_eq!(millis(Duration::from_micros(1500)), "2");
        assert_eq!(millis(Duration::from_millis(300)), "300");
        assert_eq!(
            millis(Duration::MAX),
            &*crate::store::MAX_MILLIS.to_string()
        );
    }

    fn completed(response: &StoredResponse) -> Vec<u8> {
        let mut record = vec![VERSION, COMPLETED];
        record.extend_from_slice(&[7; 48]);
        record.extend_from_slice(&response.encode());
        record
    }

    #[test]
    fn completed_records_decode_and_garbage_is_corrupt() {
        let response = StoredResponse::new(
            StatusCode::CREATED,
            HeaderMap::new(),
            Bytes::from_static(b"\0\xff"),
        );
        let mut record = completed(&response);
        assert_eq!(decode_completed(&record).unwrap(), response);

        record[1] = IN_FLIGHT;
        assert_eq!(
            decode_completed(&record).unwrap_err().kind(),
            StoreErrorKind::Corrupt
        );
        assert_eq!(
            decode_completed(b"short").unwrap_err().kind(),
            StoreErrorKind::Corrupt
        );
        let mut truncated = vec![VERSION, COMPLETED];
        truncated.extend_from_slice(&[7; 48]);
        truncated.push(1);
        assert_eq!(
            decode_completed(&truncated).unwrap_err().kind(),
            StoreErrorKind::Corrupt
        );
    }

    #[test]
    fn lookups_read_state_fingerprint_and_expiry() {
        let fp = Fingerprint::from_bytes([3; 32]);
        let info = decode_info(&in_flight(&fp, LockToken::random()), 5_000).unwrap();
        assert_eq!(info.fingerprint, fp);
        let RecordState::InFlight { lease_until } = info.state else {
            panic!("in flight expected: {info:?}");
        };
        assert_eq!(lease_until, SystemTime::UNIX_EPOCH + Duration::from_secs(5));

        let info = decode_info(&completed(&StoredResponse::omitted(StatusCode::OK)), 1).unwrap();
        assert!(matches!(
            info.state,
            RecordState::Completed {
                status: StatusCode::OK,
                replayable: false,
                ..
            }
        ));
        let no_expiry = decode_info(&in_flight(&fp, LockToken::random()), -1);
        assert_eq!(no_expiry.unwrap_err().kind(), StoreErrorKind::Corrupt);
        assert!(decode_info(b"\x01f", 10).is_err());
    }
}
