//! Locking that survives a panicked holder.

use std::sync::{Mutex, MutexGuard};

/// Locks `m`, taking the guard even when a previous holder panicked (the lock is poisoned).
///
/// Poisoning is ignored on purpose: a reactor, connection or librbd callback thread that
/// panics must not take the control plane (RPCs, teardown, `App::shutdown`) down with it by
/// making every later `lock()` panic too. The state behind these mutexes stays usable:
/// critical sections are short and change it by single inserts, removals or replacements of
/// maps, queues and `Option`s, so a panic leaves either the old or the new value, never a
/// half-written one.
pub fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
