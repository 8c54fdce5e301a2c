//! What the PostgreSQL stores share, `PostgresStore` on tokio-postgres and `SqlxStore` on sqlx,
//! so that a fleet can run both against one table: the table name, validated once; the SQL,
//! built once for its table; and the decoding of what the statements return.

use std::future::Future;
use std::hash::{BuildHasher, Hasher, RandomState};
use std::time::{Duration, UNIX_EPOCH};

use sha2::{Digest, Sha256};

use crate::fingerprint::Fingerprint;
use crate::store::{
    Begin, Forget, LockToken, RecordInfo, RecordState, Settled, StoreError, StoreErrorKind,
    whole_millis,
};
use crate::stored::StoredResponse;

/// The default table.
pub(crate) const DEFAULT_TABLE: &str = "idempotency_records";
/// How many times `begin` runs its statement (and `take_over` after it, when it read an expired
/// row) when a concurrent writer changed the record between a statement's snapshot and its
/// insert (see [`Sql::begin`]).
pub(crate) const BEGIN_ATTEMPTS: usize = 10;
/// How many expired rows one `DELETE` of `delete_expired` removes.
pub(crate) const DELETE_BATCH: i64 = 1000;
/// The waits of `forget` before it tries again a row another statement holds locked: a
/// statement (`complete`, a renewal) holds it for a moment, and the forget then goes ahead; a
/// row still locked after them (a quarter of a second in all) is a transaction's, answered as in
/// flight.
pub(crate) fn forget_lock_waits() -> impl Iterator<Item = std::time::Duration> {
    std::iter::repeat_n(std::time::Duration::from_millis(25), 10)
}

/// How many times `renew`, `complete` and `release` run their statement when PostgreSQL failed
/// it with an error that asks for it to run again ([`runs_again`]).
pub(crate) const FENCED_ATTEMPTS: usize = 3;

/// SQLSTATE `lock_not_available`: a `NOWAIT` lock met a row that another transaction holds.
#[cfg(feature = "sqlx")]
pub(crate) const LOCK_NOT_AVAILABLE: &str = "55P03";

/// What an error the server answered says, for a `StoreError`'s text: its message and its
/// SQLSTATE (`schema "billing" does not exist (SQLSTATE 3F000)`).
pub(crate) fn server_message(message: &str, code: &str) -> String {
    format!("{message} (SQLSTATE {code})")
}

/// What `begin` answers when its statements kept meeting concurrent writers for all of its
/// [`BEGIN_ATTEMPTS`].
pub(crate) fn kept_changing() -> StoreError {
    StoreError::msg(
        StoreErrorKind::Other,
        "the record kept changing under concurrent writers; try again",
    )
}

/// Whether a statement that failed with SQLSTATE `code` is run again: `serialization_failure`
/// (40001) and `deadlock_detected` (40P01). Each of the store's statements is a transaction of
/// its own, rolled back whole by these errors, so running it again is safe; they come from a
/// database whose `default_transaction_isolation` is `serializable` or `repeatable read`, where
/// concurrent statements on one key (or one index page) conflict.
pub(crate) fn runs_again(code: &str) -> bool {
    matches!(code, "40001" | "40P01")
}

/// Waits before a statement that PostgreSQL failed as one to run again ([`runs_again`]) runs
/// again, after the `failures`-th such failure of one call: a random moment of up to 1 ms after
/// the first, the bound doubling with each to 32 ms. The statements that conflicted ran at the
/// same moment; run again at once, they would meet again.
pub(crate) async fn pause_before_again(failures: usize) {
    tokio::time::sleep(pause(failures, RandomState::new().build_hasher().finish())).await;
}

/// [`pause_before_again`]'s pause, `random` choosing where within its bound.
fn pause(failures: usize, random: u64) -> Duration {
    let bound = Duration::from_millis(1 << failures.saturating_sub(1).min(5));
    // `random % 1024` fits in a u32.
    bound * (random % 1_024) as u32 / 1_024
}

/// Whether a statement that failed with SQLSTATE `code` leaves its connection of no further use,
/// so that it is closed instead of going back to the pool: `read_only_sql_transaction` (25006:
/// the connection was opened read-only, on a standby or while the database was set read-only, and
/// stays so for its whole life), an operator intervention (class 57P: the server is shutting
/// down, the connection was terminated or timed out) and a connection exception (class 08).
pub(crate) fn discards_connection(code: &str) -> bool {
    code == "25006" || ends_connection(code)
}

/// Whether SQLSTATE `code` says that the server ended the connection (class 57P, 08). Such an
/// error may come after the statement committed, its answer lost: unlike any other error the
/// server answers, it does not say that the statement changed nothing.
pub(crate) fn ends_connection(code: &str) -> bool {
    code.starts_with("57P") || code.starts_with("08")
}

/// The advisory lock `migrate` takes: one for every migration of this crate, whatever the
/// table and however its name is spelled (`t` and `public.t` are one table), so that no two
/// migrations run at once on a database. The first 8 bytes of
/// SHA-256("tower-idempotency:migrate"), as a big-endian `i64`.
pub(crate) const MIGRATION_LOCK: i64 = 0x4f96_d0fd_b72c_7fa1;

/// A validated table name, optionally schema-qualified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Table {
    /// `"schema"."name"` or `"name"`, safe to splice into SQL.
    pub(crate) quoted: String,
    /// The quoted name of its index, in the table's schema.
    pub(crate) index: String,
    /// The quoted name of its index, schema-qualified when the table is.
    pub(crate) qualified_index: String,
}

impl Table {
    pub(crate) fn parse(name: &str) -> Result<Self, StoreError> {
        let (schema, table) = match name.split_once('.') {
            Some((schema, table)) => (Some(schema), table),
            None => (None, name),
        };
        let valid = |part: &str| {
            let mut chars = part.chars();
            matches!(chars.next(), Some(c) if c.is_ascii_alphabetic() || c == '_')
                && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
                && part.len() <= 63
        };
        if !valid(table) || schema.is_some_and(|schema| !valid(schema)) {
            return Err(StoreError::msg(
                StoreErrorKind::Other,
                format!(
                    "invalid table name {name:?}: expected `name` or `schema.name`, each part \
                     [A-Za-z_][A-Za-z0-9_]{{0,62}}"
                ),
            ));
        }
        let quoted = match schema {
            Some(schema) => format!("\"{schema}\".\"{table}\""),
            None => format!("\"{table}\""),
        };
        const SUFFIX: &str = "_expires_idx";
        // PostgreSQL cuts names at 63 bytes: a table name too long for the suffix is cut, and
        // marked with a hash of the whole name, so that two long names that share their start
        // do not share an index name (`migrate` would skip the second table's index).
        let index = if table.len() + SUFFIX.len() <= 63 {
            format!("\"{table}{SUFFIX}\"")
        } else {
            let hash = Sha256::digest(table.as_bytes());
            let mark: String = hash[..4].iter().map(|b| format!("{b:02x}")).collect();
            format!("\"{}_{mark}{SUFFIX}\"", &table[..63 - SUFFIX.len() - 9])
        };
        let qualified_index = match schema {
            Some(schema) => format!("\"{schema}\".{index}"),
            None => index.clone(),
        };
        Ok(Self {
            quoted,
            index,
            qualified_index,
        })
    }
}

/// The statements of `migrate`: the advisory lock, then the table and its index, each created
/// only when it is missing. A role without the `CREATE` privilege on the schema can run it on a
/// table its DBA made: `CREATE TABLE IF NOT EXISTS` checks that privilege before it looks. And
/// `CREATE INDEX IF NOT EXISTS` would lock the table before looking, and queue every statement
/// on it behind a handler's transaction that holds a row (`Claim::respond_in`).
///
/// The table has no `CHECK` on `state`: PostgreSQL 15 builds a check's expression again from the
/// catalog in every statement that writes a row, which cost a new key (its insert and its update)
/// about a tenth of the database's CPU. The store's statements are the column's only writers, and
/// read a state that is neither of theirs as corrupt ([`unknown_state`]).
struct Migration {
    lock: &'static str,
    table_exists: String,
    create_table: String,
    index_exists: String,
    create_index: String,
}

impl Migration {
    fn new(table: &Table) -> Self {
        let (t, index) = (&table.quoted, &table.index);
        Self {
            lock: "SELECT pg_advisory_xact_lock($1)",
            // Resolved as the store's statements resolve the name (by the connection's
            // `search_path` when it is not schema-qualified).
            table_exists: format!("SELECT to_regclass('{t}') IS NOT NULL"),
            create_table: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    tenant      bytea       NOT NULL,
                    key         text        COLLATE \"C\" NOT NULL,
                    state       text        NOT NULL,
                    fingerprint bytea       NOT NULL,
                    token       bytea       NOT NULL,
                    response    bytea,
                    expires_at  timestamptz NOT NULL,
                    PRIMARY KEY (tenant, key)
                )"
            ),
            index_exists: format!(
                "SELECT to_regclass('{}') IS NOT NULL",
                table.qualified_index
            ),
            create_index: format!("CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at)"),
        }
    }
}

/// A transaction of one of the drivers, as `migrate` uses it: each driver opens one and hands
/// it to [`Sql::migrate`], which runs the whole sequence and commits, so that the two stores
/// migrate the same way.
pub(crate) trait MigrationTx: Send {
    /// Runs a statement that returns no rows, with `$1` bound to `param` when it is given.
    fn execute(
        &mut self,
        sql: &str,
        param: Option<i64>,
    ) -> impl Future<Output = Result<(), StoreError>> + Send;
    /// Runs a statement that returns one row of one boolean.
    fn query_bool(&mut self, sql: &str) -> impl Future<Output = Result<bool, StoreError>> + Send;
    /// Commits the transaction.
    fn commit(self) -> impl Future<Output = Result<(), StoreError>> + Send;
}

/// The store's statements, built once for its table.
pub(crate) struct Sql {
    /// `migrate`'s statements, in the order [`Sql::migrate`] runs them.
    migration: Migration,
    pub(crate) begin: String,
    pub(crate) take_over: String,
    pub(crate) renew: String,
    pub(crate) complete: String,
    pub(crate) release: String,
    pub(crate) lookup: String,
    pub(crate) forget: String,
    pub(crate) delete_expired: String,
    pub(crate) peek: String,
    pub(crate) settle: String,
    pub(crate) settled: String,
}

/// `sql` without the indentation of its lines, nor blank lines: the same statement (no string
/// literal or name in these statements spans lines), in fewer bytes for what hashes its text on
/// every call (the statement caches of both drivers: deadpool's hashes it with SipHash, about
/// three instructions a byte).
fn unindented(sql: String) -> String {
    let lines = sql.lines().map(str::trim).filter(|line| !line.is_empty());
    lines.collect::<Vec<_>>().join("\n")
}

impl Sql {
    pub(crate) fn new(table: &Table) -> Self {
        let mut sql = Self::indented(table);
        for statement in sql.calls() {
            *statement = unindented(std::mem::take(statement));
        }
        sql
    }

    /// The statements the store's calls run (`migrate`'s aside).
    fn calls(&mut self) -> [&mut String; 11] {
        [
            &mut self.begin,
            &mut self.take_over,
            &mut self.renew,
            &mut self.complete,
            &mut self.release,
            &mut self.lookup,
            &mut self.forget,
            &mut self.delete_expired,
            &mut self.peek,
            &mut self.settle,
            &mut self.settled,
        ]
    }

    /// The statements as written here.
    fn indented(table: &Table) -> Self {
        let t = &table.quoted;
        let expiry = "clock_timestamp() + $5::bigint * interval '1 millisecond'";
        // The read `begin` and `take_over` start with: the row, and whether it is live.
        let found = format!(
            "found AS (
                SELECT state, fingerprint, response,
                       expires_at > clock_timestamp() AS live
                FROM {t} WHERE tenant = $1 AND key = $2
            )"
        );
        // Their answer from that read: `not_live` for a row that is no longer live; for a live
        // one, what it is, with the response of a completed record of the same request.
        let answer = |not_live: &str| {
            format!(
                "SELECT CASE
                           WHEN NOT f.live THEN '{not_live}'
                           WHEN f.state NOT IN ('in_flight', 'completed') THEN 'unknown'
                           WHEN f.fingerprint <> $3 THEN 'mismatch'
                           WHEN f.state = 'in_flight' THEN 'in_flight'
                           ELSE 'completed'
                       END,
                       CASE WHEN f.state = 'completed' AND f.fingerprint = $3
                            THEN f.response END
                FROM found f"
            )
        };
        Self {
            migration: Migration::new(table),
            // One statement. It reads the record first, in the statement's snapshot, without a
            // lock: a live record (a replay, a duplicate in flight, a key reused with another
            // request) is answered from that read alone, and the insert does not run: no row
            // lock, no transaction id, nothing written, so concurrent replays of one key never
            // queue behind each other. Only when no row was read (a new key, the common case)
            // does it insert; when that insert writes nothing, a concurrent writer committed the
            // row after the snapshot, and the statement runs again. A row that is no longer live
            // (its lease or its TTL ran out) is answered 'expired' and left to `take_over`.
            //
            // The insert is gated by a one-time filter on the read, so a replay's plan never
            // reaches it; and the statement has no lock node and no `DO UPDATE`: PostgreSQL
            // builds the start-up of the whole plan on every execution, and a new key's
            // statement is cheaper without the sub-plans only a takeover needs.
            begin: format!(
                "WITH {found}, acquired AS (
                    INSERT INTO {t}
                        (tenant, key, state, fingerprint, token, response, expires_at)
                    SELECT $1::bytea, $2::text, 'in_flight', $3::bytea, $4::bytea, NULL, {expiry}
                    WHERE NOT EXISTS (SELECT 1 FROM found)
                    ON CONFLICT (tenant, key) DO NOTHING
                    RETURNING 1
                )
                SELECT 'acquired'::text, NULL::bytea FROM acquired
                UNION ALL
                {answer}",
                answer = answer("expired"),
            ),
            // The takeover, run after `begin` read a row that is no longer live, with `begin`'s
            // parameters: the same read, then an insert that takes over a row that is no longer
            // live. A live record is answered from the read, as in `begin`; when the insert
            // writes nothing, a concurrent writer committed a live row after the snapshot: the
            // read missed it (no row) or saw its older version ('retry'), and `begin` runs again.
            //
            // An in-flight row whose lease ran out is first locked with `NOWAIT`: a row that a
            // transaction holds (a handler completing it with `Claim::respond_in`, until its
            // COMMIT) fails the statement at once with `lock_not_available` instead of waiting,
            // and is then read with `peek`: in flight, never taken over under an open
            // transaction. The insert and the lock are gated by one-time filters on the read.
            take_over: format!(
                "WITH {found}, locked AS (
                    SELECT 1 FROM {t}
                    WHERE tenant = $1 AND key = $2 AND state = 'in_flight'
                      AND EXISTS (SELECT 1 FROM found WHERE state = 'in_flight' AND NOT live)
                    FOR UPDATE NOWAIT
                ), acquired AS (
                    INSERT INTO {t} AS r
                        (tenant, key, state, fingerprint, token, response, expires_at)
                    SELECT $1::bytea, $2::text, 'in_flight', $3::bytea, $4::bytea, NULL, {expiry}
                    FROM (SELECT count(*) FROM locked) AS l
                    WHERE NOT EXISTS (SELECT 1 FROM found WHERE live)
                    ON CONFLICT (tenant, key) DO UPDATE
                        SET state = 'in_flight', fingerprint = excluded.fingerprint,
                            token = excluded.token, response = NULL,
                            expires_at = excluded.expires_at
                        WHERE r.expires_at <= clock_timestamp()
                    RETURNING 1
                )
                SELECT 'acquired'::text, NULL::bytea FROM acquired
                UNION ALL
                {answer}
                WHERE NOT EXISTS (SELECT 1 FROM acquired)",
                answer = answer("retry"),
            ),
            // `NOWAIT`: a row locked by the handler's own transaction is not waited for.
            renew: format!(
                "UPDATE {t} SET expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond'
                 WHERE (tenant, key) IN (
                    SELECT tenant, key FROM {t}
                    WHERE tenant = $1 AND key = $2 AND token = $3 AND state = 'in_flight'
                    FOR UPDATE NOWAIT
                 ) AND token = $3 AND state = 'in_flight'"
            ),
            complete: format!(
                "UPDATE {t} SET state = 'completed', response = $4, expires_at = {expiry}
                 WHERE tenant = $1 AND key = $2 AND token = $3 AND state = 'in_flight'"
            ),
            release: format!(
                "DELETE FROM {t} WHERE tenant = $1 AND key = $2 AND token = $3 AND state = 'in_flight'"
            ),
            // The expiry in microseconds since the Unix epoch: both drivers read a `bigint`.
            lookup: format!(
                "SELECT state, fingerprint, response,
                        (extract(epoch FROM expires_at) * 1000000)::bigint FROM {t}
                 WHERE tenant = $1 AND key = $2 AND expires_at > clock_timestamp()"
            ),
            // One statement: the delete of a live record (completed, or in flight when $3 forces
            // it; one in a state neither of these, which no holder runs under, as a completed
            // one) and, when it deleted nothing, whether a live in-flight record stopped it.
            //
            // The row is first locked with `NOWAIT` (a one-time filter of the delete): a row a
            // transaction holds (a handler's, between `Claim::respond_in` and its COMMIT) fails
            // the statement at once with `lock_not_available`; the store tries again a few times
            // (another statement's lock lasts a moment), then answers in flight, forced or not:
            // its holder is alive, and waiting for it could take as long as it likes.
            forget: format!(
                "WITH locked AS (
                    SELECT 1 FROM {t} WHERE tenant = $1 AND key = $2 FOR UPDATE NOWAIT
                ), forgotten AS (
                    DELETE FROM {t}
                    WHERE tenant = $1 AND key = $2 AND expires_at > clock_timestamp()
                      AND (state <> 'in_flight' OR $3::boolean)
                      AND EXISTS (SELECT 1 FROM locked)
                    RETURNING 1
                )
                SELECT CASE
                    WHEN EXISTS (SELECT 1 FROM forgotten) THEN 'forgotten'
                    WHEN EXISTS (
                        SELECT 1 FROM {t}
                        WHERE tenant = $1 AND key = $2 AND expires_at > clock_timestamp()
                          AND state = 'in_flight'
                    ) THEN 'in_flight'
                    ELSE 'not_found'
                END"
            ),
            delete_expired: format!(
                "DELETE FROM {t} WHERE (tenant, key) IN (
                    SELECT tenant, key FROM {t} WHERE expires_at <= clock_timestamp()
                    LIMIT $1 FOR UPDATE SKIP LOCKED
                 ) AND expires_at <= clock_timestamp()"
            ),
            // `begin`'s answer for a row another transaction holds locked, read without a lock:
            // in flight, unless it is live and bound to another request (mismatch) or completed.
            // No row when it is gone: `begin` runs again.
            peek: format!(
                "SELECT CASE
                            WHEN r.expires_at > clock_timestamp() AND r.fingerprint <> $3
                                THEN 'mismatch'
                            WHEN r.expires_at > clock_timestamp() AND r.state = 'completed'
                                THEN 'completed'
                            ELSE 'in_flight'
                        END,
                        CASE WHEN r.state = 'completed' AND r.fingerprint = $3
                             THEN r.response END
                 FROM {t} r WHERE r.tenant = $1 AND r.key = $2"
            ),
            // After a handler completed its record in its own transaction: the row still in
            // flight under the token (the transaction did not commit) is deleted; else whether
            // the token completed it. The delete waits for a transaction still holding the row.
            settle: format!(
                "WITH released AS (
                    DELETE FROM {t}
                    WHERE tenant = $1 AND key = $2 AND token = $3 AND state = 'in_flight'
                    RETURNING 1
                )
                SELECT CASE
                    WHEN EXISTS (SELECT 1 FROM released) THEN 'released'
                    WHEN EXISTS (
                        SELECT 1 FROM {t}
                        WHERE tenant = $1 AND key = $2 AND token = $3 AND state = 'completed'
                    ) THEN 'completed'
                    ELSE 'lost'
                END"
            ),
            // `settle`'s read again, on a snapshot of its own: when `settle`'s delete waited
            // for a transaction that then committed, its snapshot still saw the row in flight.
            settled: format!(
                "SELECT CASE WHEN EXISTS (
                    SELECT 1 FROM {t}
                    WHERE tenant = $1 AND key = $2 AND token = $3 AND state = 'completed'
                ) THEN 'completed' ELSE 'lost' END"
            ),
        }
    }
}

impl Sql {
    /// `migrate`, in the transaction `tx`: takes the migrations' advisory lock
    /// ([`MIGRATION_LOCK`], held until the transaction ends, so concurrent migrations wait for
    /// each other), creates the table if it is missing, and its index if it is missing, then
    /// commits.
    pub(crate) async fn migrate(&self, mut tx: impl MigrationTx) -> Result<(), StoreError> {
        let m = &self.migration;
        tx.execute(m.lock, Some(MIGRATION_LOCK)).await?;
        if !tx.query_bool(&m.table_exists).await? {
            tx.execute(&m.create_table, None).await?;
        }
        if !tx.query_bool(&m.index_exists).await? {
            tx.execute(&m.create_index, None).await?;
        }
        tx.commit().await
    }
}

/// Runs `batch` (one `delete_expired` statement, at most [`DELETE_BATCH`] rows) until a batch
/// deletes fewer: no expired row is left. Returns how many rows were deleted. Both drivers'
/// `delete_expired`.
pub(crate) async fn delete_in_batches<F>(mut batch: impl FnMut() -> F) -> Result<u64, StoreError>
where
    F: Future<Output = Result<u64, StoreError>>,
{
    let mut total = 0;
    loop {
        let deleted = batch().await?;
        total += deleted;
        if deleted < DELETE_BATCH as u64 {
            return Ok(total);
        }
    }
}

/// A duration as whole milliseconds ([`whole_millis`]), as the statements take it.
pub(crate) fn millis(duration: Duration) -> i64 {
    // At most `MAX_MILLIS`, 100 years: well within an `i64`.
    whole_millis(duration) as i64
}

/// A lock token as the `token` column holds it.
pub(crate) fn token_bytes(token: LockToken) -> [u8; 16] {
    token.as_u128().to_be_bytes()
}

/// A row of `begin`, `take_over` or `peek`: its outcome and response.
pub(crate) type BeginRow<'a> = Option<(&'a str, Option<&'a [u8]>)>;

/// What `begin` does after one of its statements.
#[derive(Debug)]
pub(crate) enum Step {
    /// The answer.
    Done(Begin),
    /// `begin` read a row that is no longer live: `take_over` runs next.
    TakeOver,
    /// A concurrent writer changed the record after the statement's snapshot: `begin` runs
    /// again.
    Again,
}

/// Reads the row of `begin`, `take_over` or `peek` (its outcome and response).
pub(crate) fn decide(row: BeginRow<'_>, token: LockToken) -> Result<Step, StoreError> {
    let Some((outcome, response)) = row else {
        // The record was inserted after this statement's snapshot was taken, and is live: the
        // insert saw it, the read did not. The next run sees it.
        return Ok(Step::Again);
    };
    let begin = match outcome {
        "acquired" => Begin::Acquired(token),
        "in_flight" => Begin::InFlight,
        "mismatch" => Begin::Mismatch,
        "completed" => Begin::Completed(decode_response(response)?),
        "expired" => return Ok(Step::TakeOver),
        "unknown" => return Err(unknown_state()),
        // 'retry': the row `take_over` read was already replaced by a concurrent writer.
        _ => return Ok(Step::Again),
    };
    Ok(Step::Done(begin))
}

/// A row whose state is neither of the two the store writes. The table has no check on the
/// column (see [`Migration`]), so such a row is refused as it is read, never replayed.
fn unknown_state() -> StoreError {
    StoreError::msg(
        StoreErrorKind::Corrupt,
        "a record's state is neither in_flight nor completed",
    )
}

/// Reads a row of `lookup`: state, fingerprint, response, expiry (microseconds since the Unix
/// epoch).
pub(crate) fn record_info(
    state: &str,
    fingerprint: &[u8],
    response: Option<&[u8]>,
    expires_at: i64,
) -> Result<RecordInfo, StoreError> {
    let expires_at = UNIX_EPOCH + Duration::from_micros(expires_at.max(0) as u64);
    let fingerprint = <[u8; 32]>::try_from(fingerprint)
        .map_err(|_| StoreError::msg(StoreErrorKind::Corrupt, "a fingerprint is not 32 bytes"))?;
    let state = match state {
        "in_flight" => RecordState::InFlight {
            lease_until: expires_at,
        },
        "completed" => {
            let response = decode_response(response)?;
            RecordState::Completed {
                status: response.status(),
                replayable: !response.is_omitted(),
                expires_at,
            }
        }
        _ => return Err(unknown_state()),
    };
    Ok(RecordInfo::new(Fingerprint::from_bytes(fingerprint), state))
}

/// Reads the answer of `forget`.
pub(crate) fn forget(answer: &str) -> Forget {
    match answer {
        "forgotten" => Forget::Forgotten,
        "in_flight" => Forget::InFlight,
        _ => Forget::NotFound,
    }
}

/// Reads the answer of `settle` or `settled`; `None` for `lost`, which `settled` reads again.
pub(crate) fn settled(answer: &str) -> Option<Settled> {
    match answer {
        "released" => Some(Settled::Released),
        "completed" => Some(Settled::Completed),
        _ => None,
    }
}

/// The stored response of a completed row.
fn decode_response(bytes: Option<&[u8]>) -> Result<StoredResponse, StoreError> {
    let bytes = bytes.ok_or_else(|| {
        StoreError::msg(
            StoreErrorKind::Corrupt,
            "a completed record has no response",
        )
    })?;
    StoredResponse::decode(bytes).map_err(corrupt)
}

pub(crate) fn corrupt(err: impl std::error::Error + Send + Sync + 'static) -> StoreError {
    StoreError::new(StoreErrorKind::Corrupt, err)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statement run again waits up to 1 ms after its first failure, the bound doubling to
    /// 32 ms; where within the bound is random, from nothing up to the bound.
    #[test]
    fn pauses_before_running_again_double_to_32_ms_and_spread_out() {
        let most = |failures| pause(failures, 1_023);
        let bounds: Vec<u64> = (1..=8).map(|n| most(n).as_micros() as u64).collect();
        assert_eq!(
            bounds,
            [999, 1_998, 3_996, 7_992, 15_984, 31_968, 31_968, 31_968]
        );
        assert_eq!(pause(1, 0), Duration::ZERO);
        assert_eq!(pause(3, 512), Duration::from_millis(2));
        assert!(pause(usize::MAX, u64::MAX) < Duration::from_millis(32));
        // As `pause_before_again` draws it.
        let drawn: std::collections::HashSet<Duration> = (0..64)
            .map(|_| pause(6, RandomState::new().build_hasher().finish()))
            .collect();
        assert!(drawn.len() > 32, "{drawn:?}");
    }

    /// The statements run as written, but for the indentation of their lines and blank lines.
    #[test]
    fn statements_are_sent_unindented() {
        let table = Table::parse("s.t").unwrap();
        let (mut sent, mut written) = (Sql::new(&table), Sql::indented(&table));
        for (sent, written) in sent.calls().into_iter().zip(written.calls()) {
            let words = |sql: &str| {
                sql.split_whitespace()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            };
            assert_eq!(words(sent), words(written));
            assert!(
                sent.lines()
                    .all(|line| line == line.trim() && !line.is_empty()),
                "{sent}"
            );
        }
        assert!(
            sent.begin.len() * 3 < written.begin.len() * 2,
            "{}",
            sent.begin
        );
    }

    #[test]
    fn table_names_are_validated() {
        let table = Table::parse("idempotency_records").unwrap();
        assert_eq!(table.quoted, "\"idempotency_records\"");
        assert_eq!(table.index, "\"idempotency_records_expires_idx\"");
        let table = Table::parse("Billing._idem2").unwrap();
        assert_eq!(table.quoted, "\"Billing\".\"_idem2\"");
        assert_eq!(table.index, "\"_idem2_expires_idx\"");
        let long = "a".repeat(63);
        let table = Table::parse("s.t").unwrap();
        assert_eq!(table.qualified_index, "\"s\".\"t_expires_idx\"");
        let table = Table::parse(&long).unwrap();
        assert_eq!(table.index.len(), 63 + 2);
        // Two long names that share their first 51 characters get an index each.
        let other = format!("{}b", "a".repeat(62));
        let other = Table::parse(&other).unwrap();
        assert_eq!(other.index.len(), 63 + 2);
        assert_ne!(table.index, other.index);
        let fits = "a".repeat(51);
        let fits = Table::parse(&fits).unwrap();
        assert_eq!(fits.index, format!("\"{}_expires_idx\"", "a".repeat(51)));

        for bad in [
            "",
            "1table",
            "a-b",
            "a b",
            "x\"; DROP TABLE users; --",
            "a.b.c",
            ".a",
            "a.",
            "tablé",
            &"a".repeat(64),
        ] {
            let err = Table::parse(bad).unwrap_err();
            assert_eq!(err.kind(), StoreErrorKind::Other, "{bad:?}");
        }
    }

    #[test]
    fn millis_round_up_and_clamp() {
        assert_eq!(millis(Duration::ZERO), 1);
        assert_eq!(millis(Duration::from_micros(2001)), 3);
        assert_eq!(millis(Duration::MAX), crate::store::MAX_MILLIS as i64);
    }

    #[test]
    fn begin_rows_decide_the_next_step() {
        let token = LockToken::random();
        let step = |row| decide(row, token).unwrap();
        assert!(
            matches!(step(Some(("acquired", None))), Step::Done(Begin::Acquired(t)) if t == token)
        );
        assert!(matches!(
            step(Some(("in_flight", None))),
            Step::Done(Begin::InFlight)
        ));
        assert!(matches!(
            step(Some(("mismatch", None))),
            Step::Done(Begin::Mismatch)
        ));
        assert!(matches!(step(Some(("expired", None))), Step::TakeOver));
        assert!(matches!(step(Some(("retry", None))), Step::Again));
        assert!(matches!(step(None), Step::Again));
        let err = decide(Some(("unknown", None)), token).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt);
        let err = decide(Some(("completed", None)), token).unwrap_err();
        assert_eq!(err.kind(), StoreErrorKind::Corrupt);
    }

    #[test]
    fn every_migration_takes_one_lock() {
        let hash = Sha256::digest(b"tower-idempotency:migrate");
        let mut id = [0; 8];
        id.copy_from_slice(&hash[..8]);
        assert_eq!(MIGRATION_LOCK, i64::from_be_bytes(id));
        // Whatever the table, its migration names the lock only as a parameter.
        for name in ["a", "public.a", "s.b"] {
            let migration = Migration::new(&Table::parse(name).unwrap());
            assert_eq!(migration.lock, "SELECT pg_advisory_xact_lock($1)");
        }
    }

    #[test]
    fn migrations_look_before_they_create() {
        let migration = Migration::new(&Table::parse("s.t").unwrap());
        assert_eq!(
            migration.table_exists,
            "SELECT to_regclass('\"s\".\"t\"') IS NOT NULL"
        );
        assert_eq!(
            migration.index_exists,
            "SELECT to_regclass('\"s\".\"t_expires_idx\"') IS NOT NULL"
        );
    }

    #[test]
    fn sqlstates_that_run_again_or_discard_the_connection() {
        for code in ["40001", "40P01"] {
            assert!(runs_again(code) && !discards_connection(code), "{code}");
        }
        for code in ["25006", "57P01", "57P05", "08006"] {
            assert!(discards_connection(code) && !runs_again(code), "{code}");
        }
        for code in ["23505", "42P01", "55P03", "57014", "40002"] {
            assert!(!runs_again(code) && !discards_connection(code), "{code}");
        }
    }
}
