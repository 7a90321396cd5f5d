//! `enforcer audit` (being written).
