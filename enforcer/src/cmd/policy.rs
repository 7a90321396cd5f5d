//! `enforcer policy` (being written).
