//! The segmented neuron cache of PowerInfer-2: which FFN weight bytes the offloaded engine keeps in memory.
//!
//! [`SegmentedCache`] is the main type. It holds a *fixed* region ([`FixedRegion`]: the resident weights and the
//! plan's pinned neurons, loaded once before decoding, never evicted, read with no lock and no atomic) and, per
//! FFN layer (a partition), a *cold* region: a neuron-level LRU of single neuron bundles (key = neuron
//! position), an [`LruRegion`]. There is no cluster-level LRU region (PowerInfer-2's hot region): under the
//! activation statistics a static pinned set of the same bytes always beats a cluster LRU, and a whole-record
//! layer's records are read cyclically, which thrashes an LRU, so the planner never gave it any memory.
//! An [`LruRegion`] is a fixed number of slots of at most `entry_len` bytes (no rounding, so a 972-byte SmolLM2
//! bundle takes 972 bytes), keys mapped by a direct-indexed table, exact LRU through an intrusive list, and
//! guards ([`EntryRef`]) that keep an entry in place while compute threads read it; an insert never waits for a
//! guard. LRU lists never span partitions: a token visits the layers in order, so one list across layers would
//! evict exactly what the next token needs first. A second [`Policy`], LLM-in-a-Flash's sliding window (keep
//! what the last `k` tokens touched), runs behind the same interface. What each region can allocate at most is
//! computed in one place ([`region_bytes`], [`fixed_region_bytes`]), for the planner to charge.
//!
//! This crate is not an I/O layer and not a planner: it does no I/O, reads no clock (time is the token counter
//! the caller advances), and takes its sizes from the caller. That keeps it deterministic, so regions are
//! property-tested against a reference LRU and fuzzed ([`fuzz::check_ops`]).
//!
//! ```
//! use pinion_cache::{CacheConfig, FixedRegionBuilder, Insert, Policy, RegionConfig, SegmentedCache};
//! // The fixed region: reserved once, filled in place, then immutable.
//! let mut fixed = FixedRegionBuilder::new(4096);
//! let norms = fixed.push(&[1u8; 100])?;
//! let pinned = fixed.push_with(972, |buf| {
//!     buf.fill(7); // Read the pinned bundles from the file here.
//!     Ok::<(), pinion_cache::CacheError>(())
//! })?;
//! // Each layer's neuron-level LRU: up to 64 bundles of 972 bytes, keyed by neuron position.
//! let layer = RegionConfig { entry_len: 972, capacity: 64, n_keys: 128 };
//! let cache = SegmentedCache::new(
//!     fixed.build(),
//!     CacheConfig { policy: Policy::Lru, partitions: vec![layer; 2] },
//! )?;
//! assert_eq!(cache.fixed().get(pinned), &[7u8; 972][..]);
//! assert_eq!(cache.fixed().get(norms).as_ptr() as usize % 64, 0);
//!
//! // Cold neuron 100 of layer 1: a miss, then the engine reads it and inserts it.
//! let cold = cache.cold(1)?;
//! assert!(cold.get(100).is_none());
//! assert_eq!(cold.insert(100, &[9u8; 972])?, Insert::Stored);
//! let bundle = cold.get(100).expect("just inserted"); // Held: not evicted while `bundle` lives.
//! assert_eq!(&*bundle, &[9u8; 972][..]);
//! assert_eq!((cache.stats().cold.hits, cache.stats().cold.misses), (1, 1));
//! assert_eq!(cache.stats().partitions[1].inserts, 1);
//! assert!(cache.cold(2).is_err()); // Two layers: partitions 0 and 1.
//! # Ok::<(), pinion_cache::CacheError>(())
//! ```
#![forbid(unsafe_code)]

mod cache;
mod error;
mod fixed;
pub mod fuzz;
mod region;
#[cfg(test)]
mod tests;

pub use crate::cache::{CacheConfig, CacheStats, SegmentedCache};
pub use crate::error::CacheError;
pub use crate::fixed::{
    FIXED_ALIGN, FixedId, FixedRegion, FixedRegionBuilder, fixed_entry_bytes, fixed_region_bytes,
};
pub use crate::region::{
    EntryRef, Insert, LruRegion, Policy, REGION_BYTES_PER_ENTRY, REGION_BYTES_PER_KEY, RegionConfig,
    RegionStats, region_bytes,
};
