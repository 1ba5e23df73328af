//! Fuzzing and property-testing support: runs a sequence of cache operations against a simple reference model
//! and panics on the first disagreement.
//!
//! The model keeps each region as a plain vector in recency order and re-derives every decision (hit, wait,
//! reserve, evict, refuse) the slow, obvious way. After every operation the checker compares key states, LRU
//! order, bytes of every handle, all counters, and the budget invariants (`resident + loading <= budget`,
//! `allocated <= budget`).

use crate::{
    CacheConfig, CacheError, EntryState, Handle, Key, Lookup, Policy, Region, SegmentedCache, Slot, Waiter,
    entry_bytes,
};

/// Decodes `data` into a cache configuration and an operation sequence, runs it against the cache and the
/// reference model, and panics if they ever disagree or a budget is exceeded.
pub fn check_ops(data: &[u8]) {
    let mut it = data.iter().copied();
    let mut next = move || it.next();
    let Some(first) = next() else { return };
    let policy = match first % 3 {
        0 | 1 => Policy::Segmented,
        _ => Policy::SlidingWindow { tokens: u32::from(first / 3 % 4) + 1 },
    };
    let mut ops = Vec::new();
    while let (Some(a), Some(b)) = (next(), next()) {
        ops.push(match a % 10 {
            0..=2 => Op::Reserve { key: key_from(b), odd_len: a >= 250 },
            3 => Op::Complete { slot: b as usize },
            4 => Op::Abort { slot: b as usize },
            5 => Op::Get { key: key_from(b) },
            6 => Op::Hold { key: key_from(b) },
            7 => Op::Release { handle: b as usize },
            8 => Op::Poll { waiter: b as usize },
            _ => Op::Advance,
        });
    }
    run(config(policy), &ops);
}

/// The configuration used by [`check_ops`]: small budgets, so that eviction and refusal happen often.
pub(crate) fn config(policy: Policy) -> CacheConfig {
    CacheConfig { fixed_bytes: 5 * 4096, hot_bytes: 8 * 4096, cold_bytes: 6 * 4096, policy }
}

/// Maps a byte to a key of a small universe: 4 fixed tensors, 2x4 clusters, 2x8 neurons.
pub(crate) fn key_from(b: u8) -> Key {
    match b % 28 {
        i @ 0..4 => Key::Fixed(u64::from(i)),
        i @ 4..12 => Key::Cluster { layer: u32::from(i - 4) / 4, cluster: u32::from(i - 4) % 4 },
        i => Key::Neuron { layer: u32::from(i - 12) / 8, neuron: u32::from(i - 12) % 8 },
    }
}

/// Every key of the universe.
pub(crate) fn all_keys() -> impl Iterator<Item = Key> {
    (0..28u8).map(key_from)
}

/// The length an entry of `key` has (between 1 byte and 3 blocks); `odd` gives a different one, to exercise
/// length mismatches.
pub(crate) fn len_of(key: Key, odd: bool) -> usize {
    let h = match key {
        Key::Fixed(i) => i as usize * 7 + 1,
        Key::Cluster { layer, cluster } => (layer * 5 + cluster * 3) as usize + 2,
        Key::Neuron { layer, neuron } => (layer * 3 + neuron * 11) as usize + 3,
    };
    let len = (h * 2654435761) % (3 * 4096) + 1;
    if odd { len + 1 } else { len }
}

fn content(key: Key, load: u64, len: usize) -> Vec<u8> {
    let seed =
        load.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (len as u64) ^ (region_idx(key.region()) as u64) << 40;
    (0..len as u64)
        .map(|i| ((seed.wrapping_add(i).wrapping_mul(0x2545_f491_4f6c_dd1d)) >> 56) as u8)
        .collect()
}

fn region_idx(r: Region) -> usize {
    match r {
        Region::Fixed => 0,
        Region::Hot => 1,
        Region::Cold => 2,
    }
}

/// One operation of a test sequence. Indices into open slots, held handles and waiters are taken modulo their
/// count (and skipped when there are none).
#[derive(Clone, Copy, Debug)]
pub(crate) enum Op {
    Reserve { key: Key, odd_len: bool },
    Complete { slot: usize },
    Abort { slot: usize },
    Get { key: Key },
    Hold { key: Key },
    Release { handle: usize },
    Poll { waiter: usize },
    Advance,
}

#[derive(Clone, Debug)]
struct MEntry {
    key: Key,
    len: usize,
    load: u64,
    last_token: u64,
}

#[derive(Default, Debug)]
struct MRegion {
    budget: usize,
    /// Present entries, most recently used first.
    lru: Vec<MEntry>,
    /// Loads in flight: key, length, load id.
    loading: Vec<(Key, usize, u64)>,
    hits: u64,
    misses: u64,
    in_flight_hits: u64,
    evictions: u64,
    aborts: u64,
}

impl MRegion {
    fn used(&self) -> usize {
        self.lru.iter().map(|e| entry_bytes(e.len)).sum::<usize>()
            + self.loading.iter().map(|l| entry_bytes(l.1)).sum::<usize>()
    }
}

struct Model {
    regions: [MRegion; 3],
    token: u64,
    policy: Policy,
    next_load: u64,
}

enum MLookup {
    Hit(u64),
    Wait(u64),
    Reserved(u64),
    Err(CacheError),
}

impl Model {
    fn region(&mut self, key: Key) -> &mut MRegion {
        &mut self.regions[region_idx(key.region())]
    }

    fn lookup_or_reserve(&mut self, key: Key, len: usize, pinned: &dyn Fn(Key) -> bool) -> MLookup {
        let token = self.token;
        let load_id = self.next_load;
        let region = key.region();
        let r = self.region(key);
        if let Some(pos) = r.lru.iter().position(|e| e.key == key) {
            if r.lru[pos].len != len {
                return MLookup::Err(CacheError::LengthMismatch { key, expected: r.lru[pos].len, got: len });
            }
            let mut e = r.lru.remove(pos);
            e.last_token = token;
            let load = e.load;
            r.lru.insert(0, e);
            r.hits += 1;
            return MLookup::Hit(load);
        }
        if let Some(&(_, l, load)) = r.loading.iter().find(|l| l.0 == key) {
            if l != len {
                return MLookup::Err(CacheError::LengthMismatch { key, expected: l, got: len });
            }
            r.in_flight_hits += 1;
            return MLookup::Wait(load);
        }
        let bytes = entry_bytes(len);
        if bytes > r.budget {
            return MLookup::Err(CacheError::TooLarge { key, bytes, region, budget: r.budget });
        }
        let used = r.used();
        if used + bytes > r.budget {
            let need = used + bytes - r.budget;
            let mut evictable = 0;
            if region != Region::Fixed {
                for e in r.lru.iter().rev() {
                    if evictable >= need {
                        break;
                    }
                    if !pinned(e.key) {
                        evictable += entry_bytes(e.len);
                    }
                }
            }
            if evictable < need {
                return MLookup::Err(CacheError::RegionFull {
                    key,
                    bytes,
                    region,
                    evictable,
                    budget: r.budget,
                });
            }
            let mut i = r.lru.len();
            while r.used() + bytes > r.budget {
                i -= 1;
                if !pinned(r.lru[i].key) {
                    r.lru.remove(i);
                    r.evictions += 1;
                }
            }
        }
        r.misses += 1;
        r.loading.push((key, len, load_id));
        self.next_load += 1;
        MLookup::Reserved(load_id)
    }

    fn complete(&mut self, key: Key) {
        let token = self.token;
        let r = self.region(key);
        let pos = r.loading.iter().position(|l| l.0 == key).expect("model: completing a load it knows");
        let (key, len, load) = r.loading.remove(pos);
        r.lru.insert(0, MEntry { key, len, load, last_token: token });
    }

    fn abort(&mut self, key: Key) {
        let r = self.region(key);
        let pos = r.loading.iter().position(|l| l.0 == key).expect("model: aborting a load it knows");
        r.loading.remove(pos);
        r.aborts += 1;
    }

    fn get(&mut self, key: Key) -> Option<u64> {
        let token = self.token;
        let r = self.region(key);
        match r.lru.iter().position(|e| e.key == key) {
            Some(pos) => {
                let mut e = r.lru.remove(pos);
                e.last_token = token;
                let load = e.load;
                r.lru.insert(0, e);
                r.hits += 1;
                Some(load)
            }
            None => {
                r.misses += 1;
                None
            }
        }
    }

    fn advance(&mut self, pinned: &dyn Fn(Key) -> bool) {
        self.token += 1;
        if let Policy::SlidingWindow { tokens } = self.policy {
            let token = self.token;
            for r in &mut self.regions[1..] {
                let before = r.lru.len();
                r.lru.retain(|e| e.last_token + u64::from(tokens) > token || pinned(e.key));
                r.evictions += (before - r.lru.len()) as u64;
            }
        }
    }

    fn state(&self, key: Key) -> (EntryState, Option<u64>) {
        let r = &self.regions[region_idx(key.region())];
        if let Some(e) = r.lru.iter().find(|e| e.key == key) {
            return (EntryState::Present, Some(e.load));
        }
        if let Some(l) = r.loading.iter().find(|l| l.0 == key) {
            return (EntryState::Loading, Some(l.2));
        }
        (EntryState::Absent, None)
    }
}

fn check_handle(h: &Handle, key: Key, load: u64) {
    assert_eq!(h.key(), key);
    assert!(
        h.bytes() == content(key, load, h.len()).as_slice(),
        "bytes of {key:?} differ from what was loaded"
    );
}

/// Runs `ops` against a fresh cache with `config` and the reference model.
pub(crate) fn run(config: CacheConfig, ops: &[Op]) {
    let cache = SegmentedCache::new(config);
    let mut model = Model {
        regions: [
            MRegion { budget: config.fixed_bytes, ..MRegion::default() },
            MRegion { budget: config.hot_bytes, ..MRegion::default() },
            MRegion { budget: config.cold_bytes, ..MRegion::default() },
        ],
        token: 0,
        policy: match config.policy {
            Policy::SlidingWindow { tokens } => Policy::SlidingWindow { tokens: tokens.max(1) },
            p => p,
        },
        next_load: 0,
    };
    let mut slots: Vec<(Slot, u64)> = Vec::new();
    let mut held: Vec<(Handle, u64)> = Vec::new();
    let mut waiters: Vec<(Waiter, u64)> = Vec::new();

    for (step, &op) in ops.iter().enumerate() {
        let held_keys: Vec<Key> = held.iter().map(|(h, _)| h.key()).collect();
        let pinned = |k: Key| held_keys.contains(&k);
        match op {
            Op::Reserve { key, odd_len } => {
                let len = len_of(key, odd_len);
                let want = model.lookup_or_reserve(key, len, &pinned);
                match (cache.lookup_or_reserve(key, len), want) {
                    (Ok(Lookup::Hit(h)), MLookup::Hit(load)) => check_handle(&h, key, load),
                    (Ok(Lookup::InFlight(w)), MLookup::Wait(load)) => waiters.push((w, load)),
                    (Ok(Lookup::Reserved(mut s)), MLookup::Reserved(load)) => {
                        assert_eq!((s.key(), s.len()), (key, len));
                        s.buf_mut().copy_from_slice(&content(key, load, len));
                        slots.push((s, load));
                    }
                    (Err(e), MLookup::Err(want)) => assert_eq!(e, want, "step {step}: {op:?}"),
                    (got, _) => panic!("step {step}: {op:?}: cache said {got:?}, model disagrees"),
                }
            }
            Op::Complete { slot } if !slots.is_empty() => {
                let (s, load) = slots.remove(slot % slots.len());
                let key = s.key();
                if slot % 4 == 3 {
                    // A wrong length is refused, and abandons the load.
                    let err = cache.complete(s, &[0u8; 3 * 4096 + 2]).unwrap_err();
                    assert!(matches!(err, CacheError::LengthMismatch { .. }), "{err}");
                    model.abort(key);
                    compare(&cache, &model, step, op);
                    continue;
                }
                model.complete(key);
                let h = if slot % 2 == 0 {
                    cache.complete_in_place(s)
                } else {
                    let bytes = content(key, load, s.len());
                    cache.complete(s, &bytes).unwrap()
                };
                check_handle(&h, key, load);
            }
            Op::Abort { slot } if !slots.is_empty() => {
                let (s, _) = slots.remove(slot % slots.len());
                model.abort(s.key());
                drop(s);
            }
            Op::Get { key } => {
                let want = model.get(key);
                match (cache.get(key), want) {
                    (Some(h), Some(load)) => check_handle(&h, key, load),
                    (None, None) => {}
                    (got, want) => panic!("step {step}: get {key:?}: cache {got:?}, model {want:?}"),
                }
            }
            Op::Hold { key } => {
                if let (Some(h), Some(load)) = (cache.get(key), model.get(key)) {
                    check_handle(&h, key, load);
                    held.push((h, load));
                }
            }
            Op::Release { handle } if !held.is_empty() => {
                held.swap_remove(handle % held.len());
            }
            Op::Poll { waiter } if !waiters.is_empty() => {
                let i = waiter % waiters.len();
                let (w, load) = &waiters[i];
                let key = w.key();
                let (state, cur) = model.state(key);
                match (w.try_get(), state, cur == Some(*load)) {
                    (None, EntryState::Loading, true) => {}
                    (Some(Ok(h)), EntryState::Present, true) => {
                        check_handle(&h, key, *load);
                        waiters.swap_remove(i);
                    }
                    (Some(Err(CacheError::Gone { .. })), _, false) => {
                        waiters.swap_remove(i);
                    }
                    (got, state, same) => {
                        panic!("step {step}: poll {key:?}: {got:?}, model {state:?} {same}")
                    }
                }
            }
            Op::Advance => {
                model.advance(&pinned);
                assert_eq!(cache.advance_token(), model.token);
            }
            _ => {}
        }
        compare(&cache, &model, step, op);
    }
}

fn compare(cache: &SegmentedCache, model: &Model, step: usize, op: Op) {
    for key in all_keys() {
        assert_eq!(cache.state(key), model.state(key).0, "step {step} after {op:?}: state of {key:?}");
    }
    let stats = cache.stats();
    for region in Region::ALL {
        let m = &model.regions[region_idx(region)];
        let order: Vec<Key> = m.lru.iter().map(|e| e.key).collect();
        assert_eq!(cache.lru_order(region), order, "step {step} after {op:?}: LRU order of {region:?}");
        let s = stats.region(region);
        let resident: usize = m.lru.iter().map(|e| entry_bytes(e.len)).sum();
        let loading: usize = m.loading.iter().map(|l| entry_bytes(l.1)).sum();
        assert_eq!(
            (s.bytes_resident, s.bytes_loading, s.entries),
            (resident, loading, m.lru.len()),
            "{region:?}"
        );
        assert_eq!(
            (s.hits, s.misses, s.in_flight_hits, s.evictions, s.aborts),
            (m.hits, m.misses, m.in_flight_hits, m.evictions, m.aborts),
            "step {step} after {op:?}: counters of {region:?}"
        );
        assert!(s.bytes_resident + s.bytes_loading <= s.budget, "{region:?} over budget: {s:?}");
        assert!(s.bytes_allocated <= s.budget, "{region:?} allocated over budget: {s:?}");
        assert!(s.bytes_allocated >= s.bytes_resident + s.bytes_loading, "{region:?}: {s:?}");
    }
}
