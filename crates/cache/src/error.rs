//! The cache's error type.

use crate::cache::{Key, Region};

/// Why a cache operation could not be done. Nothing changed in the cache when one is returned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// The entry is larger than its region's whole budget.
    #[error("entry {key:?} of {bytes} bytes exceeds the {region:?} region's budget of {budget} bytes")]
    TooLarge {
        /// The entry.
        key: Key,
        /// Bytes it needs (rounded up to 4 KiB).
        bytes: usize,
        /// Region it belongs to.
        region: Region,
        /// That region's budget.
        budget: usize,
    },
    /// There is not enough room and nothing more can be evicted: the rest is loading, held by [`Handle`]s, or in
    /// the fixed region.
    ///
    /// [`Handle`]: crate::Handle
    #[error(
        "{region:?} region full: {bytes} more bytes needed for {key:?}, {evictable} evictable of {budget}"
    )]
    RegionFull {
        /// The entry.
        key: Key,
        /// Bytes it needs (rounded up to 4 KiB).
        bytes: usize,
        /// Region it belongs to.
        region: Region,
        /// Bytes that could have been evicted.
        evictable: usize,
        /// The region's budget.
        budget: usize,
    },
    /// The key is cached (or loading) with a different length, or the bytes given do not match the reservation.
    #[error("entry {key:?} has {expected} bytes, not {got}")]
    LengthMismatch {
        /// The entry.
        key: Key,
        /// Length on record.
        expected: usize,
        /// Length given.
        got: usize,
    },
    /// The load being waited for was abandoned, or the entry was evicted before the waiter saw it; look the key
    /// up again.
    #[error("entry {key:?} is gone: its load was aborted or it was evicted; look it up again")]
    Gone {
        /// The entry.
        key: Key,
    },
}
