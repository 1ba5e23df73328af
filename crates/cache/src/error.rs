//! The cache's error type.

/// Why a cache operation could not be done. Nothing changed in the cache when one is returned.
///
/// An insert the cache merely declines (the key is present, or every entry is held) is not an error: see
/// [`Insert`](crate::Insert).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum CacheError {
    /// A push would go past the fixed region's capacity.
    #[error(
        "fixed region full: an entry of {len} bytes at offset {offset} does not fit in its {capacity} bytes"
    )]
    FixedFull {
        /// Bytes of the entry.
        len: usize,
        /// Where it would have started (the end of the previous entry, rounded up to 64 bytes).
        offset: usize,
        /// The region's capacity in bytes.
        capacity: usize,
    },
    /// An entry is longer than its region's `entry_len`.
    #[error("entry {key} of {len} bytes is longer than the region's entries of at most {entry_len} bytes")]
    EntryTooLong {
        /// The entry's key.
        key: u32,
        /// Bytes given.
        len: usize,
        /// The region's entry length.
        entry_len: usize,
    },
    /// A key is not below the region's `n_keys`.
    #[error("key {key} out of range 0..{n_keys}")]
    KeyOutOfRange {
        /// The key given.
        key: u32,
        /// The region's number of keys.
        n_keys: usize,
    },
    /// A partition index is not below the cache's number of partitions.
    #[error("partition {partition} out of range 0..{n_partitions}")]
    PartitionOutOfRange {
        /// The index given.
        partition: usize,
        /// The cache's number of partitions.
        n_partitions: usize,
    },
    /// A region configuration the cache cannot represent (slots, keys and entry lengths are `u32`, with
    /// `u32::MAX` as a marker).
    #[error("region configuration: {field} = {value} is too large (at most {max})")]
    ConfigTooLarge {
        /// The field of [`RegionConfig`](crate::RegionConfig).
        field: &'static str,
        /// Its value.
        value: usize,
        /// The largest value allowed.
        max: usize,
    },
}
