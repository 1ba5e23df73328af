//! The segmented cache: one fixed region, and per partition (one per FFN layer) a neuron-level LRU region (the
//! cold region). There is no cluster-level LRU (hot) region: a static pinned set of the same bytes always beats
//! one under the activation statistics, and a whole-record layer's cyclic reads thrash an LRU, so the planner
//! always sized it 0.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::CacheError;
use crate::fixed::FixedRegion;
use crate::region::{LruRegion, Policy, RegionConfig, RegionStats};

/// The policy and the partitions of a [`SegmentedCache`]. No `Default`: the sizes come from the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Replacement policy of every LRU region.
    pub policy: Policy,
    /// One per FFN layer: that layer's neuron-level LRU region (key = neuron position, entries of `entry_len`
    /// bytes, one bundle). LRU lists never span partitions.
    pub partitions: Vec<RegionConfig>,
}

impl CacheConfig {
    /// Bytes the LRU regions of every partition allocate at most, with the partition list
    /// ([`region_bytes`](crate::region_bytes) per region). The fixed region is counted apart
    /// ([`fixed_region_bytes`](crate::fixed_region_bytes)).
    pub fn max_bytes(&self) -> usize {
        self.partitions
            .iter()
            .fold(size_of::<LruRegion>() * self.partitions.len(), |sum, p| sum.saturating_add(p.max_bytes()))
    }
}

/// Counters of the whole cache: the fixed region, the LRU regions summed over partitions, and each partition's.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// The fixed region: its entries and bytes (the end of its last entry). Its reads take no lock and touch no
    /// counter, so its other fields are 0.
    pub fixed: RegionStats,
    /// Cold (neuron-level LRU) regions, summed over partitions.
    pub cold: RegionStats,
    /// Each partition's cold region, in order.
    pub partitions: Vec<RegionStats>,
}

/// PowerInfer-2's segmented neuron cache; see the crate documentation. Share it between threads by reference
/// or in an `Arc`: every method takes `&self`.
pub struct SegmentedCache {
    fixed: FixedRegion,
    policy: Policy,
    /// The cold region of each partition.
    partitions: Vec<LruRegion>,
    token: AtomicU64,
}

impl fmt::Debug for SegmentedCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentedCache")
            .field("fixed", &self.fixed)
            .field("policy", &self.policy)
            .field("n_partitions", &self.partitions.len())
            .finish()
    }
}

impl SegmentedCache {
    /// A cache around a built fixed region, with empty cold regions shaped by `config`.
    /// [`CacheError::ConfigTooLarge`] if a region's shape cannot be represented.
    pub fn new(fixed: FixedRegion, config: CacheConfig) -> Result<SegmentedCache, CacheError> {
        let policy = config.policy;
        let partitions = config
            .partitions
            .iter()
            .map(|&cold| LruRegion::new(cold, policy))
            .collect::<Result<Vec<_>, CacheError>>()?;
        Ok(SegmentedCache { fixed, policy, partitions, token: AtomicU64::new(0) })
    }

    /// The fixed region.
    #[inline]
    pub fn fixed(&self) -> &FixedRegion {
        &self.fixed
    }

    /// The replacement policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Number of partitions.
    pub fn n_partitions(&self) -> usize {
        self.partitions.len()
    }

    /// The cold region (neuron-level LRU) of `partition`, or [`CacheError::PartitionOutOfRange`].
    pub fn cold(&self, partition: usize) -> Result<&LruRegion, CacheError> {
        self.partitions
            .get(partition)
            .ok_or(CacheError::PartitionOutOfRange { partition, n_partitions: self.partitions.len() })
    }

    /// Ends the current token in every region (see [`LruRegion::advance_token`]) and returns the new token
    /// number. Call it from one thread, between tokens.
    pub fn advance_token(&self) -> u64 {
        for cold in &self.partitions {
            cold.advance_token();
        }
        self.token.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Tokens ended so far by [`advance_token`](Self::advance_token).
    pub fn token(&self) -> u64 {
        self.token.load(Ordering::Relaxed)
    }

    /// Counters and contents of every region.
    pub fn stats(&self) -> CacheStats {
        let mut stats = CacheStats {
            fixed: RegionStats {
                entries: self.fixed.n_entries(),
                bytes: self.fixed.len(),
                ..RegionStats::default()
            },
            partitions: self.partitions.iter().map(LruRegion::stats).collect(),
            ..CacheStats::default()
        };
        for p in &stats.partitions {
            stats.cold.add(p);
        }
        stats
    }

    /// Sets every counter to 0 (entries stay).
    pub fn reset_stats(&self) {
        for cold in &self.partitions {
            cold.reset_stats();
        }
    }
}
