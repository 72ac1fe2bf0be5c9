//! How much memory a request may use, checked before anything large is allocated.

use crate::base::{Error, Result};

/// Memory assumed where the system cannot say (an unsupported platform): the smallest
/// machine linattn is built for, so a request is refused rather than risked.
const UNKNOWN_AVAILABLE: u128 = 4 << 30;

/// Bytes of memory the system reports available now (MemAvailable on Linux).
///
/// ```
/// assert!(linattn::available_memory() > 0);
/// ```
pub fn available_bytes() -> u128 {
    match sysinfo::System::new() {
        Ok(mut system) => {
            system.refresh_memory();
            match system.available_memory() {
                0 => UNKNOWN_AVAILABLE,
                available => available as u128,
            }
        }
        Err(_) => UNKNOWN_AVAILABLE,
    }
}

/// Bytes of memory the machine has in all (MemTotal on Linux).
///
/// ```
/// assert!(linattn::total_memory() >= linattn::available_memory());
/// ```
pub fn total_bytes() -> u128 {
    match sysinfo::System::new() {
        Ok(mut system) => {
            system.refresh_memory();
            match system.total_memory() {
                0 => UNKNOWN_AVAILABLE,
                total => total as u128,
            }
        }
        Err(_) => UNKNOWN_AVAILABLE,
    }
}

/// The bytes a request may use: `limit`, or without one the memory available now (which
/// reads the system's tables: a plan decides it once).
pub(crate) fn budget(limit: Option<u128>) -> u128 {
    limit.unwrap_or_else(available_bytes)
}

/// Fails with [`Error::OutOfMemory`] when `needed` bytes exceed `limit` (or, without one,
/// the memory available now).
pub(crate) fn ensure_fits(what: &str, needed: u128, limit: Option<u128>) -> Result<()> {
    ensure_within(what, needed, budget(limit))
}

/// Fails with [`Error::OutOfMemory`] when `needed` bytes exceed `available`.
pub(crate) fn ensure_within(what: &str, needed: u128, available: u128) -> Result<()> {
    if needed > available {
        return Err(Error::OutOfMemory {
            what: what.to_string(),
            needed_bytes: needed,
            available_bytes: available,
        });
    }
    Ok(())
}
