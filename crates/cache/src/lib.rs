//! The segmented neuron cache of PowerInfer-2: which weight bytes stay in memory, under a byte budget per
//! region.
//!
//! [`SegmentedCache`] is the main type. It has three regions, chosen by the kind of [`Key`]:
//! a *fixed* region (attention weights, norms, embeddings, predictors: loaded once, never evicted), a *hot*
//! region of neuron clusters with cluster-level LRU, and a *cold* region of single neurons with neuron-level
//! LRU. Each region has a byte budget that is never exceeded; eviction is a drop (weights are read-only, there is
//! no write-back), and evicted buffers are reused for later loads, so a steady state allocates nothing. A second
//! [`Policy`], LLM-in-a-Flash's sliding window (keep what the last `k` tokens used), runs behind the same
//! interface for comparisons.
//!
//! Entries are absent, loading or present. [`SegmentedCache::lookup_or_reserve`] returns a [`Handle`] to
//! present bytes, a [`Slot`] that makes the caller the one loader of absent bytes, or a [`Waiter`] for bytes
//! another thread is loading, so that several compute threads and an I/O thread never load the same bytes twice.
//!
//! [`NeuronCache`] is the compact alternative for single neurons of one FFN layer: entries of exactly
//! `entry_len` bytes (a 972-byte bundle takes 972 bytes, not a 4 KiB buffer), CLOCK or sliding-window
//! replacement, and guards that keep an entry in place while compute threads read it.
//!
//! This crate is not an I/O layer and not a planner: it does no I/O, reads no clock (time is the token counter
//! the caller advances), and takes its budgets from the caller. That keeps it deterministic, so policies can be
//! property-tested against a reference model and fuzzed ([`fuzz::check_ops`]).
//!
//! ```
//! use pinion_cache::{CacheConfig, Key, Lookup, Policy, SegmentedCache};
//! let cache = SegmentedCache::new(CacheConfig {
//!     fixed_bytes: 1 << 20,
//!     hot_bytes: 1 << 20,
//!     cold_bytes: 64 << 10,
//!     policy: Policy::Segmented,
//! });
//! let key = Key::Neuron { layer: 3, neuron: 1234 };
//! let bytes = match cache.lookup_or_reserve(key, 8192)? {
//!     Lookup::Hit(h) => h,
//!     // We are the loader: read the bundle (here, pretend) and publish it.
//!     Lookup::Reserved(slot) => cache.complete(slot, &[7u8; 8192])?,
//!     // Someone else is loading it: wait for them.
//!     Lookup::InFlight(waiter) => waiter.wait()?,
//! };
//! assert_eq!(bytes.len(), 8192);
//! assert!(matches!(cache.lookup_or_reserve(key, 8192)?, Lookup::Hit(_)));
//! # Ok::<(), pinion_cache::CacheError>(())
//! ```
#![forbid(unsafe_code)]

mod cache;
mod error;
pub mod fuzz;
mod neuron;
#[cfg(test)]
mod tests;

pub use crate::cache::{
    CacheConfig, CacheStats, EntryState, Handle, Key, Lookup, Policy, Region, RegionStats, SegmentedCache,
    Slot, Waiter, entry_bytes,
};
pub use crate::error::CacheError;
pub use crate::neuron::{NeuronCache, NeuronCacheStats, NeuronRef};
