//! The mutex library code uses: std's, for short critical sections that never await, with
//! `lock` that does not fail when another thread panicked while holding it (the data is
//! still used: every critical section here leaves it consistent at each step).
//!
//! `clippy.toml` refuses `std::sync::Mutex` elsewhere; a lock held across an `.await` is
//! refused by clippy's `await_holding_lock` (the guard is std's) — use `tokio::sync::Mutex`
//! there.

#![allow(clippy::disallowed_types)]

use std::fmt;
use std::sync::PoisonError;

/// The guard of a [`Mutex`].
pub type MutexGuard<'a, T> = std::sync::MutexGuard<'a, T>;

/// A mutual-exclusion lock whose `lock` always returns the guard.
#[derive(Default)]
pub struct Mutex<T: ?Sized>(std::sync::Mutex<T>);

impl<T> Mutex<T> {
    /// A lock holding `value`.
    pub const fn new(value: T) -> Mutex<T> {
        Mutex(std::sync::Mutex::new(value))
    }

    /// The value, the lock consumed.
    pub fn into_inner(self) -> T {
        self.0.into_inner().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: ?Sized> Mutex<T> {
    /// Waits for the lock and returns its guard (also after a panic of another holder).
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The value, through a unique borrow (no locking).
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(PoisonError::into_inner)
    }
}

impl<T: ?Sized + fmt::Debug> fmt::Debug for Mutex<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Mutex").field(&&*self.lock()).finish()
    }
}

impl<T> From<T> for Mutex<T> {
    fn from(value: T) -> Mutex<T> {
        Mutex::new(value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_while_holding_the_lock_leaves_it_usable() {
        let m = std::sync::Arc::new(Mutex::new(1));
        let held = m.clone();
        let panicked = std::thread::spawn(move || {
            let mut g = held.lock();
            *g = 2;
            panic!("while holding the lock");
        })
        .join();
        assert!(panicked.is_err());
        *m.lock() += 1;
        assert_eq!(*m.lock(), 3);
        let m = std::sync::Arc::into_inner(m).unwrap();
        assert_eq!(m.into_inner(), 3);
    }
}
