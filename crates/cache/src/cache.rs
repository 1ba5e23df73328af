//! The segmented cache: one fixed region, and per partition (one per FFN layer) a hot and a cold LRU region.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::error::CacheError;
use crate::fixed::FixedRegion;
use crate::region::{LruRegion, Policy, RegionConfig, RegionStats};

/// The two LRU regions of one partition.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PartitionConfig {
    /// The hot region: key = cluster index, entries of at most `entry_len` bytes (a cluster's bundles).
    pub hot: RegionConfig,
    /// The cold region: key = neuron position, entries of `entry_len` bytes (one bundle).
    pub cold: RegionConfig,
}

impl PartitionConfig {
    /// Bytes the partition's two regions allocate at most.
    pub const fn max_bytes(&self) -> usize {
        self.hot.max_bytes().saturating_add(self.cold.max_bytes())
    }
}

/// The policy and the partitions of a [`SegmentedCache`]. No `Default`: the sizes come from the plan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Replacement policy of every hot and cold region.
    pub policy: Policy,
    /// One per FFN layer: LRU lists never span partitions.
    pub partitions: Vec<PartitionConfig>,
}

impl CacheConfig {
    /// Bytes the hot and cold regions of every partition allocate at most, with the partition list
    /// ([`region_bytes`](crate::region_bytes) per region). The fixed region is counted apart
    /// ([`fixed_region_bytes`](crate::fixed_region_bytes)).
    pub fn max_bytes(&self) -> usize {
        self.partitions
            .iter()
            .fold(size_of::<Partition>() * self.partitions.len(), |sum, p| sum.saturating_add(p.max_bytes()))
    }
}

/// The hot and cold regions of one partition.
#[derive(Debug)]
pub struct Partition {
    hot: LruRegion,
    cold: LruRegion,
}

impl Partition {
    /// The hot region (cluster-level LRU).
    pub fn hot(&self) -> &LruRegion {
        &self.hot
    }

    /// The cold region (neuron-level LRU).
    pub fn cold(&self) -> &LruRegion {
        &self.cold
    }

    /// The counters of both regions.
    pub fn stats(&self) -> PartitionStats {
        PartitionStats { hot: self.hot.stats(), cold: self.cold.stats() }
    }
}

/// Counters of one partition.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartitionStats {
    /// Hot region.
    pub hot: RegionStats,
    /// Cold region.
    pub cold: RegionStats,
}

/// Counters of the whole cache: per region summed over partitions, and per partition.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// The fixed region: its entries and bytes (the end of its last entry). Its reads take no lock and touch no
    /// counter, so its other fields are 0.
    pub fixed: RegionStats,
    /// Hot regions, summed over partitions.
    pub hot: RegionStats,
    /// Cold regions, summed over partitions.
    pub cold: RegionStats,
    /// Each partition, in order.
    pub partitions: Vec<PartitionStats>,
}

/// PowerInfer-2's segmented neuron cache; see the crate documentation. Share it between threads by reference
/// or in an `Arc`: every method takes `&self`.
pub struct SegmentedCache {
    fixed: FixedRegion,
    policy: Policy,
    partitions: Vec<Partition>,
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
    /// A cache around a built fixed region, with empty hot and cold regions shaped by `config`.
    /// [`CacheError::ConfigTooLarge`] if a region's shape cannot be represented.
    pub fn new(fixed: FixedRegion, config: CacheConfig) -> Result<SegmentedCache, CacheError> {
        let policy = config.policy;
        let partitions = config
            .partitions
            .iter()
            .map(|p| {
                Ok(Partition { hot: LruRegion::new(p.hot, policy)?, cold: LruRegion::new(p.cold, policy)? })
            })
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

    /// Partition `partition`, or [`CacheError::PartitionOutOfRange`].
    pub fn partition(&self, partition: usize) -> Result<&Partition, CacheError> {
        self.partitions
            .get(partition)
            .ok_or(CacheError::PartitionOutOfRange { partition, n_partitions: self.partitions.len() })
    }

    /// The hot region of `partition`.
    pub fn hot(&self, partition: usize) -> Result<&LruRegion, CacheError> {
        self.partition(partition).map(Partition::hot)
    }

    /// The cold region of `partition`.
    pub fn cold(&self, partition: usize) -> Result<&LruRegion, CacheError> {
        self.partition(partition).map(Partition::cold)
    }

    /// Ends the current token in every region (see [`LruRegion::advance_token`]) and returns the new token
    /// number. Call it from one thread, between tokens.
    pub fn advance_token(&self) -> u64 {
        for p in &self.partitions {
            p.hot.advance_token();
            p.cold.advance_token();
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
            partitions: self.partitions.iter().map(Partition::stats).collect(),
            ..CacheStats::default()
        };
        for p in &stats.partitions {
            stats.hot.add(&p.hot);
            stats.cold.add(&p.cold);
        }
        stats
    }

    /// Sets every counter to 0 (entries stay).
    pub fn reset_stats(&self) {
        for p in &self.partitions {
            p.hot.reset_stats();
            p.cold.reset_stats();
        }
    }
}
