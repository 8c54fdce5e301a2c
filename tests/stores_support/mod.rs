//! The test helpers live in `tests/support`; this name loads them for the test files that say
//! `mod stores_support;`.
#![allow(unreachable_pub)]

#[macro_use]
#[path = "../support/mod.rs"]
mod support;

pub use support::*;
