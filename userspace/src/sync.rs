//! Locks that outlive a panic elsewhere.
//!
//! Every lock in the daemon guards plain data that each critical section leaves consistent
//! (counters, tables replaced whole, ring indices moved in push/pop pairs), so a thread that
//! panicked while holding one leaves nothing half-done behind. Poisoning would only turn one
//! failed port into a daemon that fails everywhere; these helpers take the guard regardless.

use std::sync::{Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// Locks `m`, ignoring poisoning (see the module docs).
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// Read-locks `l`, ignoring poisoning (see the module docs).
pub fn read<T: ?Sized>(l: &RwLock<T>) -> RwLockReadGuard<'_, T> {
    l.read().unwrap_or_else(|p| p.into_inner())
}

/// Write-locks `l`, ignoring poisoning (see the module docs).
pub fn write<T: ?Sized>(l: &RwLock<T>) -> RwLockWriteGuard<'_, T> {
    l.write().unwrap_or_else(|p| p.into_inner())
}
