//! Test-only helpers.

pub(crate) mod mem_store;
