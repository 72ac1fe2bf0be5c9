//! Fast paths, by backend.

pub(crate) mod cpu;
