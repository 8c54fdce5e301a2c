//! Without a SQL store (features `postgres`, `sqlx`), no request carries a claim.

use std::sync::Arc;

use http::Extensions;

use crate::config::Shared;
use crate::fingerprint::Fingerprint;
use crate::store::{LockToken, RecordKey};

pub(crate) fn attach<St, T, E>(
    _: &mut Extensions,
    _: &Arc<Shared<St, T, E>>,
    _: &RecordKey,
    _: &Fingerprint,
    _: LockToken,
) {
}

#[derive(Clone)]
pub(crate) struct HeldClaim;

impl HeldClaim {
    pub(crate) fn of<B>(_: &http::Request<B>) -> Self {
        Self
    }

    pub(crate) fn written(&self) -> bool {
        false
    }
}
