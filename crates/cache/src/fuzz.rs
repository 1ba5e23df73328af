//! Fuzzing and property-testing support: builds a fixed region and runs a sequence of cache operations against
//! a simple reference model, panicking on the first disagreement.
//!
//! Operations address a (partition, key) in that partition's cold region (the neuron-level LRU; partitions and
//! keys may be out of range). The model is the obvious, slow version: each LRU region is a `VecDeque` in recency
//! order (searched linearly), held guards are a list of keys, the sliding window is a `retain`, and the fixed
//! region is an offset counter. After every operation the checker compares with the cache: each result
//! (including the evicted key and errors), the bytes of every entry returned and of every guard still held,
//! recency order, presence of every key, all counters (per partition and summed), and that no region holds more
//! entries than its capacity.

use std::collections::VecDeque;

use crate::{
    CacheConfig, CacheError, EntryRef, FIXED_ALIGN, FixedId, FixedRegionBuilder, Insert, LruRegion, Policy,
    RegionConfig, RegionStats, SegmentedCache,
};

/// Partitions of the fuzzed cache (operations also name partition `N_PARTITIONS`, which is out of range).
const N_PARTITIONS: usize = 2;

/// Cold region shape apart from capacity: entries of at most 24 bytes (the engine's are all 24: one bundle),
/// keys 0..8.
const COLD_LEN: usize = 24;
const COLD_KEYS: usize = 8;

/// Decodes `data` into a fixed region, a cache configuration and an operation sequence, runs them against the
/// cache and the reference model, and panics if they ever disagree.
pub fn check_ops(data: &[u8]) {
    let mut it = data.iter().copied();
    let mut next = move || it.next();
    let (Some(policy), Some(capacity), Some(fixed_capacity), Some(n_pushes)) =
        (next(), next(), next(), next())
    else {
        return;
    };
    let mut pushes = Vec::new();
    for _ in 0..n_pushes % 8 {
        let Some(b) = next() else { return };
        let how = match b % 4 {
            0 | 1 => Push::Copy,
            2 => Push::With,
            _ => Push::WithFailing,
        };
        pushes.push(FixedPush { len: usize::from(b / 4) * 3, how });
    }
    let setup = Setup {
        policy: match policy % 3 {
            0 | 1 => Policy::Lru,
            _ => Policy::SlidingWindow { tokens: u32::from(policy / 3 % 4) },
        },
        cold_capacity: usize::from(capacity % 6),
        fixed_capacity: usize::from(fixed_capacity) * 5,
        pushes,
    };
    let mut ops = Vec::new();
    while let (Some(a), Some(b), Some(c)) = (next(), next(), next()) {
        let part = (a >> 3) % (N_PARTITIONS as u8 + 1);
        // Two keys past the end, to exercise range checks.
        let key = u32::from(b) % (COLD_KEYS as u32 + 2);
        ops.push(match a % 8 {
            0 | 1 => Op::Get { part, key },
            2 => Op::Contains { part, key },
            3 | 4 => Op::Insert { part, key, len: c },
            5 => Op::Hold { part, key },
            6 => Op::Release { guard: usize::from(c) },
            _ if c % 8 == 0 => Op::ResetStats,
            _ => Op::Advance,
        });
    }
    run(&setup, &ops);
}

/// How a fixed-region entry is pushed.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Push {
    /// [`FixedRegionBuilder::push`].
    Copy,
    /// [`FixedRegionBuilder::push_with`], filling in place.
    With,
    /// [`FixedRegionBuilder::push_with`] whose fill writes, then fails: the entry is taken back.
    WithFailing,
}

/// One fixed-region push.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FixedPush {
    pub(crate) len: usize,
    pub(crate) how: Push,
}

/// What the cache is built from: the policy, the cold regions' capacity (the shapes are fixed), and the fixed
/// region's capacity and pushes.
#[derive(Clone, Debug)]
pub(crate) struct Setup {
    pub(crate) policy: Policy,
    pub(crate) cold_capacity: usize,
    pub(crate) fixed_capacity: usize,
    pub(crate) pushes: Vec<FixedPush>,
}

/// One operation of a test sequence, on the cold region of partition `part`. `part` may be out of range
/// (`N_PARTITIONS`), and so may `key` (up to `n_keys + 1`); `len` selects an entry length (see
/// [`entry_len_of`]); `guard` is taken modulo the number of held guards (and ignored when there are none).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Get {
        part: u8,
        key: u32,
    },
    Contains {
        part: u8,
        key: u32,
    },
    Insert {
        part: u8,
        key: u32,
        len: u8,
    },
    /// A get whose guard is kept until a `Release`.
    Hold {
        part: u8,
        key: u32,
    },
    Release {
        guard: usize,
    },
    Advance,
    ResetStats,
}

/// The length an insert uses: mostly the entry length (what the engine stores), sometimes a shorter one (0 up to
/// the entry length: the region keeps each entry's own length, and its byte counters must follow), or one
/// more than the entry length, to be refused.
fn entry_len_of(sel: u8) -> usize {
    match sel {
        0..160 => COLD_LEN,
        160..240 => usize::from(sel) % (COLD_LEN + 1),
        _ => COLD_LEN + 1,
    }
}

/// The bytes of the `serial`-th insert (or fixed push) of the run: different for every insert, so a read of an
/// older copy of the same key is caught.
fn content(serial: u64, len: usize) -> Vec<u8> {
    let seed = serial.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ len as u64;
    (0..len as u64).map(|i| (seed.wrapping_add(i).wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8).collect()
}

/// The reference model of one LRU region.
struct Model {
    capacity: usize,
    entry_len: usize,
    n_keys: usize,
    window: Option<u64>,
    token: u64,
    /// Present entries, most recently used first: key, bytes, token of last use.
    lru: VecDeque<(u32, Vec<u8>, u64)>,
    stats: RegionStats,
}

impl Model {
    fn new(config: RegionConfig, policy: Policy) -> Model {
        Model {
            capacity: config.capacity,
            entry_len: config.entry_len,
            n_keys: config.n_keys,
            window: match policy {
                Policy::Lru => None,
                Policy::SlidingWindow { tokens } => Some(u64::from(tokens.max(1))),
            },
            token: 0,
            lru: VecDeque::new(),
            stats: RegionStats::default(),
        }
    }

    fn position(&self, key: u32) -> Option<usize> {
        self.lru.iter().position(|e| e.0 == key)
    }

    fn get(&mut self, key: u32) -> Option<Vec<u8>> {
        if key as usize >= self.n_keys {
            return None;
        }
        match self.position(key) {
            Some(i) => {
                let mut e = self.lru.remove(i)?;
                e.2 = self.token;
                let bytes = e.1.clone();
                self.lru.push_front(e);
                self.stats.hits += 1;
                Some(bytes)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    fn insert(&mut self, key: u32, bytes: &[u8], held: &dyn Fn(u32) -> bool) -> Result<Insert, CacheError> {
        if key as usize >= self.n_keys {
            return Err(CacheError::KeyOutOfRange { key, n_keys: self.n_keys });
        }
        if bytes.len() > self.entry_len {
            return Err(CacheError::EntryTooLong { key, len: bytes.len(), entry_len: self.entry_len });
        }
        if self.position(key).is_some() {
            self.stats.rejections += 1;
            return Ok(Insert::Present);
        }
        let res = if self.lru.len() < self.capacity {
            Insert::Stored
        } else {
            // The least recently used entry no guard holds.
            match self.lru.iter().rposition(|e| !held(e.0)) {
                Some(i) => {
                    let (evicted, old, _) = self.lru.remove(i).unwrap_or_default();
                    self.stats.entries -= 1;
                    self.stats.bytes -= old.len();
                    self.stats.evictions += 1;
                    Insert::Replaced { evicted }
                }
                None => {
                    self.stats.rejections += 1;
                    return Ok(Insert::NoRoom);
                }
            }
        };
        self.lru.push_front((key, bytes.to_vec(), self.token));
        self.stats.entries += 1;
        self.stats.bytes += bytes.len();
        self.stats.inserts += 1;
        Ok(res)
    }

    fn advance(&mut self, held: &dyn Fn(u32) -> bool) {
        self.token += 1;
        if let Some(window) = self.window {
            let token = self.token;
            let before = (self.lru.len(), self.lru.iter().map(|e| e.1.len()).sum::<usize>());
            self.lru.retain(|e| e.2 + window > token || held(e.0));
            let after = (self.lru.len(), self.lru.iter().map(|e| e.1.len()).sum::<usize>());
            self.stats.entries = after.0;
            self.stats.bytes = after.1;
            self.stats.evictions += (before.0 - after.0) as u64;
        }
    }

    fn reset_stats(&mut self) {
        self.stats =
            RegionStats { entries: self.stats.entries, bytes: self.stats.bytes, ..RegionStats::default() };
    }
}

/// Builds the fixed region of `setup`, checking each push against the model and the finished region's
/// contents: every entry's bytes, its 64-byte alignment, and zeros everywhere else.
fn build_fixed(setup: &Setup, serial: &mut u64) -> crate::FixedRegion {
    #[derive(Debug, PartialEq)]
    enum FillError {
        Cache(CacheError),
        Failed,
    }
    impl From<CacheError> for FillError {
        fn from(e: CacheError) -> FillError {
            FillError::Cache(e)
        }
    }

    let mut builder = FixedRegionBuilder::new(setup.fixed_capacity);
    let mut end = 0usize;
    let mut entries: Vec<(FixedId, Vec<u8>)> = Vec::new();
    for (i, push) in setup.pushes.iter().enumerate() {
        let bytes = content(*serial, push.len);
        *serial += 1;
        let offset = end.div_ceil(FIXED_ALIGN) * FIXED_ALIGN;
        let fits = offset + push.len <= setup.fixed_capacity;
        let got = match push.how {
            Push::Copy => builder.push(&bytes).map_err(FillError::Cache),
            Push::With => builder.push_with(push.len, |buf: &mut [u8]| {
                assert!(buf.iter().all(|&b| b == 0), "push {i}: push_with hands out zeroed bytes");
                buf.copy_from_slice(&bytes);
                Ok(())
            }),
            Push::WithFailing => builder.push_with(push.len, |buf: &mut [u8]| {
                buf.fill(0xee);
                Err(FillError::Failed)
            }),
        };
        match (got, fits, push.how) {
            (Ok(id), true, Push::Copy | Push::With) => {
                assert_eq!((id.offset(), id.len()), (offset, push.len), "push {i}");
                end = offset + push.len;
                entries.push((id, bytes));
            }
            (Err(FillError::Failed), true, Push::WithFailing) => {}
            (Err(FillError::Cache(e)), false, _) => assert_eq!(
                e,
                CacheError::FixedFull { len: push.len, offset, capacity: setup.fixed_capacity },
                "push {i}"
            ),
            (got, fits, how) => panic!("push {i} {how:?} of {} bytes: {got:?}, fits {fits}", push.len),
        }
        assert_eq!(builder.used(), end, "push {i}");
    }
    let fixed = builder.build();
    assert_eq!(
        (fixed.len(), fixed.n_entries(), fixed.capacity()),
        (end, entries.len(), setup.fixed_capacity)
    );
    let mut expect = vec![0u8; end];
    for (id, bytes) in &entries {
        let got = fixed.get(*id);
        assert!(got == &bytes[..], "fixed entry at {} differs from what was pushed", id.offset());
        assert_eq!(got.as_ptr() as usize % FIXED_ALIGN, 0, "fixed entry at {} is not aligned", id.offset());
        expect[id.offset()..id.offset() + id.len()].copy_from_slice(bytes);
    }
    assert!(fixed.as_bytes() == &expect[..], "the fixed region holds bytes outside its entries");
    fixed
}

/// Runs `ops` on a cache built from `setup` and on the reference model.
pub(crate) fn run(setup: &Setup, ops: &[Op]) {
    let mut serial = 0u64;
    let fixed = build_fixed(setup, &mut serial);
    let (fixed_entries, fixed_len) = (fixed.n_entries(), fixed.len());
    let cold = RegionConfig { entry_len: COLD_LEN, capacity: setup.cold_capacity, n_keys: COLD_KEYS };
    let config = CacheConfig { policy: setup.policy, partitions: vec![cold; N_PARTITIONS] };
    let cache = match SegmentedCache::new(fixed, config) {
        Ok(cache) => cache,
        Err(e) => panic!("small shapes are representable: {e}"),
    };
    assert_eq!((cache.n_partitions(), cache.policy()), (N_PARTITIONS, setup.policy));
    // One model per partition (its cold region).
    let mut models: Vec<Model> = (0..N_PARTITIONS).map(|_| Model::new(cold, setup.policy)).collect();
    // Held guards: partition, and the bytes they must keep showing.
    let mut guards: Vec<(EntryRef<'_>, usize, Vec<u8>)> = Vec::new();

    for (step, &op) in ops.iter().enumerate() {
        // The region an operation names, or the error for an out-of-range partition.
        let region = |part: u8| -> Option<&LruRegion> {
            let p = usize::from(part);
            match cache.cold(p) {
                Ok(r) => Some(r),
                Err(e) => {
                    assert!(p >= N_PARTITIONS, "step {step}: partition {p}: {e}");
                    assert_eq!(
                        e,
                        CacheError::PartitionOutOfRange { partition: p, n_partitions: N_PARTITIONS }
                    );
                    None
                }
            }
        };
        let held_keys: Vec<(usize, u32)> = guards.iter().map(|g| (g.1, g.0.key())).collect();
        match op {
            Op::Get { part, key } | Op::Hold { part, key } => {
                let Some(r) = region(part) else { continue };
                let p = usize::from(part);
                let want = models[p].get(key);
                match (r.get(key), want) {
                    (Some(got), Some(want)) => {
                        assert_eq!(got.key(), key, "step {step}");
                        assert!(*got == want[..], "step {step}: {op:?} returned other bytes than inserted");
                        if matches!(op, Op::Hold { .. }) {
                            guards.push((got, p, want));
                        }
                    }
                    (None, None) => {}
                    (got, want) => {
                        panic!("step {step}: {op:?}: cache {got:?}, model {:?}", want.map(|w| w.len()))
                    }
                }
            }
            Op::Contains { part, key } => {
                let Some(r) = region(part) else { continue };
                let m = &models[usize::from(part)];
                let want = (key as usize) < m.n_keys && m.position(key).is_some();
                assert_eq!(r.contains(key), want, "step {step}: {op:?}");
            }
            Op::Insert { part, key, len } => {
                let Some(r) = region(part) else { continue };
                let p = usize::from(part);
                let bytes = content(serial, entry_len_of(len));
                serial += 1;
                let held = |k: u32| held_keys.contains(&(p, k));
                let want = models[p].insert(key, &bytes, &held);
                assert_eq!(r.insert(key, &bytes), want, "step {step}: {op:?}");
            }
            Op::Release { guard } => {
                if !guards.is_empty() {
                    guards.swap_remove(guard % guards.len());
                }
            }
            Op::Advance => {
                for (p, m) in models.iter_mut().enumerate() {
                    m.advance(&|k: u32| held_keys.contains(&(p, k)));
                }
                assert_eq!(cache.advance_token(), models[0].token, "step {step}");
                assert_eq!(cache.token(), models[0].token, "step {step}");
            }
            Op::ResetStats => {
                cache.reset_stats();
                models.iter_mut().for_each(Model::reset_stats);
            }
        }
        compare(&cache, &models, step, op);
        for (g, p, bytes) in &guards {
            assert!(**g == bytes[..], "step {step}: a held entry (partition {p}, key {}) changed", g.key());
        }
        let stats = cache.stats();
        assert_eq!((stats.fixed.entries, stats.fixed.bytes), (fixed_entries, fixed_len));
    }
}

fn compare(cache: &SegmentedCache, models: &[Model], step: usize, op: Op) {
    let stats = cache.stats();
    assert_eq!(stats.partitions.len(), models.len(), "step {step}: one stats entry per partition");
    let mut cold = RegionStats::default();
    for (p, m) in models.iter().enumerate() {
        let r = match cache.cold(p) {
            Ok(r) => r,
            Err(e) => panic!("partition {p} exists: {e}"),
        };
        let order: Vec<u32> = m.lru.iter().map(|e| e.0).collect();
        assert_eq!(r.lru_order(), order, "step {step} after {op:?}: recency order of partition {p}");
        assert_eq!(r.stats(), m.stats, "step {step} after {op:?}: counters of partition {p}");
        assert!(r.len() <= r.capacity(), "step {step}: partition {p} holds more than its capacity");
        for key in 0..m.n_keys as u32 + 2 {
            let want = (key as usize) < m.n_keys && m.position(key).is_some();
            assert_eq!(r.contains(key), want, "step {step} after {op:?}: key {key} of partition {p}");
        }
        assert_eq!(stats.partitions[p], m.stats, "step {step}: stats of partition {p}");
        cold.add(&m.stats);
    }
    assert_eq!(stats.cold, cold, "step {step} after {op:?}: summed stats");
}
