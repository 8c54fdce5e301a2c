//! `lookup`: a record as an operator reads it.

use super::super::Nanos;
use super::Shard;
use super::State;
use crate::fingerprint::Fingerprint;
use crate::store::{RecordInfo, RecordKey, RecordState};

impl Shard {
    pub(in crate::store::memory) fn lookup(
        &self,
        hash: u64,
        key: &RecordKey,
        now: Nanos,
    ) -> Option<Info> {
        let record = self.find(hash, key).filter(|r| r.is_live(now))?;
        let state = match &record.state {
            State::InFlight { .. } => InfoState::InFlight,
            State::Completed(response) => InfoState::Completed {
                status: response.status(),
                replayable: !response.is_omitted(),
            },
        };
        Some(Info {
            fingerprint: record.fingerprint,
            deadline: record.deadline,
            state,
        })
    }
}

/// A record as `lookup` reads it, with its deadline still on the store's clock.
pub(in crate::store::memory) struct Info {
    pub(in crate::store::memory) fingerprint: Fingerprint,
    pub(in crate::store::memory) deadline: Nanos,
    pub(in crate::store::memory) state: InfoState,
}

pub(in crate::store::memory) enum InfoState {
    InFlight,
    Completed {
        status: http::StatusCode,
        replayable: bool,
    },
}

impl Info {
    /// The public form, with `deadline` turned into wall-clock time by `at`.
    pub(in crate::store::memory) fn into_record_info(
        self,
        at: impl Fn(Nanos) -> std::time::SystemTime,
    ) -> RecordInfo {
        let deadline = at(self.deadline);
        let state = match self.state {
            InfoState::InFlight => RecordState::InFlight {
                lease_until: deadline,
            },
            InfoState::Completed { status, replayable } => RecordState::Completed {
                status,
                replayable,
                expires_at: deadline,
            },
        };
        RecordInfo::new(self.fingerprint, state)
    }
}
