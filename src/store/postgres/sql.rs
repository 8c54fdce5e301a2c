//! The table name, validated once, and the SQL of the store, built once for its table.

use sha2::{Digest, Sha256};

use crate::store::{StoreError, StoreErrorKind};

/// A validated table name, optionally schema-qualified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Table {
    /// `"schema"."name"` or `"name"`, safe to splice into SQL.
    pub(super) quoted: String,
    /// The quoted name of its index, in the table's schema.
    pub(super) index: String,
}

impl Table {
    pub(super) fn parse(name: &str) -> Result<Self, StoreError> {
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
        let index = format!(
            "\"{}{SUFFIX}\"",
            &table[..table.len().min(63 - SUFFIX.len())]
        );
        Ok(Self { quoted, index })
    }

    /// The advisory lock `migrate` takes: the same on every instance, one per table.
    pub(super) fn lock_id(&self) -> i64 {
        let hash = Sha256::new_with_prefix(b"tower-idempotency:migrate:")
            .chain_update(self.quoted.as_bytes())
            .finalize();
        let mut id = [0; 8];
        id.copy_from_slice(&hash[..8]);
        i64::from_be_bytes(id)
    }
}

/// The store's statements, built once for its table.
pub(super) struct Sql {
    pub(super) migrate: String,
    pub(super) begin: String,
    pub(super) renew: String,
    pub(super) complete: String,
    pub(super) release: String,
    pub(super) lookup: String,
    pub(super) forget: String,
    pub(super) delete_expired: String,
}

impl Sql {
    pub(super) fn new(table: &Table) -> Self {
        let (t, index) = (&table.quoted, &table.index);
        let expiry = "clock_timestamp() + $5::bigint * interval '1 millisecond'";
        Self {
            migrate: format!(
                "CREATE TABLE IF NOT EXISTS {t} (
                    tenant      bytea       NOT NULL,
                    key         text        COLLATE \"C\" NOT NULL,
                    state       text        NOT NULL CHECK (state IN ('in_flight', 'completed')),
                    fingerprint bytea       NOT NULL,
                    token       bytea       NOT NULL,
                    response    bytea,
                    expires_at  timestamptz NOT NULL,
                    PRIMARY KEY (tenant, key)
                );
                CREATE INDEX IF NOT EXISTS {index} ON {t} (expires_at);"
            ),
            // One statement: the insert (or the takeover of a row that is no longer live) and,
            // when it wrote nothing, a read of the live row it met. The read uses the
            // statement's snapshot; if a concurrent writer committed the live row after that
            // snapshot, the read misses it (no row) or sees its older version ('retry'), and
            // the statement runs again.
            begin: format!(
                "WITH acquired AS (
                    INSERT INTO {t} AS r
                        (tenant, key, state, fingerprint, token, response, expires_at)
                    VALUES ($1, $2, 'in_flight', $3, $4, NULL, {expiry})
                    ON CONFLICT (tenant, key) DO UPDATE
                        SET state = 'in_flight', fingerprint = excluded.fingerprint,
                            token = excluded.token, response = NULL,
                            expires_at = excluded.expires_at
                        WHERE r.expires_at <= clock_timestamp()
                    RETURNING 1
                )
                SELECT 'acquired'::text, NULL::bytea FROM acquired
                UNION ALL
                SELECT CASE
                           WHEN r.expires_at <= clock_timestamp() THEN 'retry'
                           WHEN r.fingerprint <> $3 THEN 'mismatch'
                           WHEN r.state = 'in_flight' THEN 'in_flight'
                           ELSE 'completed'
                       END,
                       CASE WHEN r.state = 'completed' AND r.fingerprint = $3
                            THEN r.response END
                FROM {t} r
                WHERE r.tenant = $1 AND r.key = $2 AND NOT EXISTS (SELECT 1 FROM acquired)"
            ),
            renew: format!(
                "UPDATE {t} SET expires_at = clock_timestamp() + $4::bigint * interval '1 millisecond'
                 WHERE tenant = $1 AND key = $2 AND token = $3 AND state = 'in_flight'"
            ),
            complete: format!(
                "UPDATE {t} SET state = 'completed', response = $4, expires_at = {expiry}
                 WHERE tenant = $1 AND key = $2 AND token = $3 AND state = 'in_flight'"
            ),
            release: format!(
                "DELETE FROM {t} WHERE tenant = $1 AND key = $2 AND token = $3 AND state = 'in_flight'"
            ),
            lookup: format!(
                "SELECT state, fingerprint, response, expires_at FROM {t}
                 WHERE tenant = $1 AND key = $2 AND expires_at > clock_timestamp()"
            ),
            // One statement: the delete of a live record (completed, or in flight when $3 forces
            // it) and, when it deleted nothing, whether a live in-flight record stopped it.
            forget: format!(
                "WITH forgotten AS (
                    DELETE FROM {t}
                    WHERE tenant = $1 AND key = $2 AND expires_at > clock_timestamp()
                      AND (state = 'completed' OR $3::boolean)
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_names_are_validated() {
        let table = Table::parse("idempotency_records").unwrap();
        assert_eq!(table.quoted, "\"idempotency_records\"");
        assert_eq!(table.index, "\"idempotency_records_expires_idx\"");
        let table = Table::parse("Billing._idem2").unwrap();
        assert_eq!(table.quoted, "\"Billing\".\"_idem2\"");
        assert_eq!(table.index, "\"_idem2_expires_idx\"");
        let long = "a".repeat(63);
        let table = Table::parse(&long).unwrap();
        assert!(table.index.len() <= 63 + 2);

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
    fn lock_ids_are_stable_per_table() {
        let a = Table::parse("a").unwrap();
        assert_eq!(a.lock_id(), Table::parse("a").unwrap().lock_id());
        assert_ne!(a.lock_id(), Table::parse("s.a").unwrap().lock_id());
    }
}
