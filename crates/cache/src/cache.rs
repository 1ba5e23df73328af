//! The cache proper: keys, regions, entries and their states, LRU lists, budgets, statistics.
//!
//! One mutex guards all bookkeeping; it is held for O(1) work per call (plus the eviction walk), never while
//! bytes are copied or read. Bytes live in reference-counted 4 KiB-aligned buffers: a [`Handle`] is a counted
//! reference, so reading needs no lock, and an entry with live handles is *pinned* (skipped by eviction). A
//! [`Slot`] owns the buffer of an entry being loaded until it is published.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Deref;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use pinion_io::{ALIGN, AlignedBuf};

use crate::error::CacheError;
use rustc_hash::FxBuildHasher;

/// What a cache entry holds, and so which region it lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Key {
    /// A resident tensor of the fixed region (attention, norms, embeddings, predictor), by caller-chosen id.
    Fixed(u64),
    /// A hot neuron cluster of one FFN layer (hot region, cluster-level LRU).
    Cluster {
        /// Layer (or layer-and-expert) index.
        layer: u32,
        /// Cluster index within the layer.
        cluster: u32,
    },
    /// One cold neuron bundle of one FFN layer (cold region, neuron-level LRU).
    Neuron {
        /// Layer (or layer-and-expert) index.
        layer: u32,
        /// Neuron index within the layer.
        neuron: u32,
    },
}

impl Key {
    /// The region the key belongs to.
    pub fn region(&self) -> Region {
        match self {
            Key::Fixed(_) => Region::Fixed,
            Key::Cluster { .. } => Region::Hot,
            Key::Neuron { .. } => Region::Cold,
        }
    }
}

/// One of the cache's three segments.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Region {
    /// Loaded once, never evicted.
    Fixed,
    /// Neuron clusters, cluster-level LRU.
    Hot,
    /// Single neurons, neuron-level LRU.
    Cold,
}

impl Region {
    /// All regions, in index order.
    pub const ALL: [Region; 3] = [Region::Fixed, Region::Hot, Region::Cold];

    fn idx(self) -> usize {
        self as usize
    }
}

/// Which entries the hot and cold regions keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// PowerInfer-2: keep the most recently used entries that fit (LRU per region).
    Segmented,
    /// LLM in a Flash: keep the entries used by the last `tokens` tokens (counted by
    /// [`SegmentedCache::advance_token`]); drop older ones at each token boundary. LRU still decides under
    /// budget pressure.
    SlidingWindow {
        /// Window length in tokens (at least 1: the current token).
        tokens: u32,
    },
}

/// Budgets and policy. No `Default`: the budgets come from the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheConfig {
    /// Byte budget of the fixed region.
    pub fixed_bytes: usize,
    /// Byte budget of the hot region.
    pub hot_bytes: usize,
    /// Byte budget of the cold region.
    pub cold_bytes: usize,
    /// Replacement policy of the hot and cold regions.
    pub policy: Policy,
}

/// Bytes an entry of `len` bytes takes from its region's budget: its buffer's size, `len` rounded up to 4 KiB
/// (at least one block).
pub fn entry_bytes(len: usize) -> usize {
    len.max(1).div_ceil(ALIGN) * ALIGN
}

/// The state of a key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryState {
    /// Not cached.
    Absent,
    /// Reserved by a loader; its bytes are not there yet.
    Loading,
    /// Cached.
    Present,
}

/// Counters of one region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionStats {
    /// Byte budget.
    pub budget: usize,
    /// Bytes of present entries.
    pub bytes_resident: usize,
    /// Bytes reserved by loads in flight.
    pub bytes_loading: usize,
    /// Bytes of buffers allocated (present, loading and idle for reuse); never above `budget`.
    pub bytes_allocated: usize,
    /// Present entries.
    pub entries: usize,
    /// Lookups that found the entry present.
    pub hits: u64,
    /// Lookups that found the entry absent (each reservation is one).
    pub misses: u64,
    /// Lookups that found the entry loading (the caller waited instead of loading again).
    pub in_flight_hits: u64,
    /// Entries dropped to make room or by the sliding window.
    pub evictions: u64,
    /// Loads abandoned (a [`Slot`] dropped without being completed).
    pub aborts: u64,
    /// Buffers allocated so far (a steady state allocates none).
    pub allocations: u64,
}

/// Counters of all regions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CacheStats {
    /// Fixed region.
    pub fixed: RegionStats,
    /// Hot region.
    pub hot: RegionStats,
    /// Cold region.
    pub cold: RegionStats,
    /// Current token (see [`SegmentedCache::advance_token`]).
    pub token: u64,
}

impl CacheStats {
    /// The counters of `region`.
    pub fn region(&self, region: Region) -> &RegionStats {
        match region {
            Region::Fixed => &self.fixed,
            Region::Hot => &self.hot,
            Region::Cold => &self.cold,
        }
    }
}

/// The bytes of an entry: a buffer and how much of it is used.
struct EntryData {
    buf: AlignedBuf,
    len: usize,
}

/// Shared, read-only access to a present entry's bytes. Reading needs no lock. While any handle to an entry is
/// alive the entry is pinned: eviction skips it. Keep handles for the duration of a computation, not longer.
#[derive(Clone)]
pub struct Handle {
    data: Arc<EntryData>,
    key: Key,
}

impl Handle {
    /// The entry's key.
    pub fn key(&self) -> Key {
        self.key
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data.buf[..self.data.len]
    }
}

impl Deref for Handle {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes()
    }
}

impl fmt::Debug for Handle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Handle").field("key", &self.key).field("len", &self.data.len).finish()
    }
}

/// The result of [`SegmentedCache::lookup_or_reserve`].
#[derive(Debug)]
pub enum Lookup {
    /// The bytes are present.
    Hit(Handle),
    /// The bytes are absent and the caller is now their only loader: fill the slot and complete it (or drop it
    /// to abandon the load, which wakes waiters with [`CacheError::Gone`]).
    Reserved(Slot),
    /// Another caller is loading the bytes; wait for them.
    InFlight(Waiter),
}

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Free,
    Loading,
    Present,
}

struct Entry {
    key: Key,
    state: State,
    /// Present entries only (a loading entry's buffer is in its `Slot`).
    data: Option<Arc<EntryData>>,
    len: usize,
    bytes: usize,
    /// LRU links (present entries only); `prev` is towards the most recently used end.
    prev: u32,
    next: u32,
    last_token: u64,
    /// Incremented whenever the entry is freed, so stale slots and waiters can tell.
    generation: u64,
}

struct RegionState {
    stats: RegionStats,
    /// Present entries, most recently used first.
    head: u32,
    tail: u32,
    /// Idle buffers by size, for reuse. Keys are kept when their list empties, so reuse never allocates.
    free: BTreeMap<usize, Vec<Arc<EntryData>>>,
}

impl RegionState {
    fn used(&self) -> usize {
        self.stats.bytes_resident + self.stats.bytes_loading
    }
}

struct Inner {
    map: HashMap<Key, u32, FxBuildHasher>,
    entries: Vec<Entry>,
    free_entries: Vec<u32>,
    regions: [RegionState; 3],
    token: u64,
    policy: Policy,
    /// Threads blocked in [`Waiter::wait`]; the condition variable is signalled only when there are some (a
    /// futex wake is a system call).
    n_waiting: usize,
}

struct Shared {
    inner: Mutex<Inner>,
    loaded: Condvar,
}

impl Shared {
    /// Wakes waiters if there are any; consumes the guard so the lock is released first.
    fn wake(&self, inner: MutexGuard<'_, Inner>) {
        let any = inner.n_waiting > 0;
        drop(inner);
        if any {
            self.loaded.notify_all();
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // Every mutation below keeps the bookkeeping consistent at each step where it could panic (allocation
        // failure aside), so a poisoned lock is taken over rather than propagated to every compute thread.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The right to load one absent entry, given to exactly one caller. Fill [`buf_mut`](Self::buf_mut) (or pass
/// bytes to [`SegmentedCache::complete`]) and complete it; dropping it abandons the load.
pub struct Slot {
    shared: Arc<Shared>,
    key: Key,
    idx: u32,
    generation: u64,
    data: Option<Arc<EntryData>>,
}

impl Slot {
    /// The entry being loaded.
    pub fn key(&self) -> Key {
        self.key
    }

    /// Its length in bytes.
    pub fn len(&self) -> usize {
        self.data.as_ref().map_or(0, |d| d.len)
    }

    /// Whether its length is zero.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry's buffer (exactly [`len`](Self::len) bytes, 4 KiB-aligned), to read into directly. It may hold
    /// bytes of an evicted entry until overwritten.
    pub fn buf_mut(&mut self) -> &mut [u8] {
        let data = self.data.as_mut().expect("a live slot holds its buffer");
        let data = Arc::get_mut(data).expect("a slot's buffer is not shared");
        &mut data.buf[..data.len]
    }
}

impl fmt::Debug for Slot {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Slot").field("key", &self.key).field("len", &self.len()).finish()
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        if let Some(data) = self.data.take() {
            let mut inner = self.shared.lock();
            inner.abort(self.idx, self.generation, data);
            self.shared.wake(inner);
        }
    }
}

/// A wait for an entry another caller is loading.
pub struct Waiter {
    shared: Arc<Shared>,
    key: Key,
    idx: u32,
    generation: u64,
}

impl fmt::Debug for Waiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Waiter").field("key", &self.key).finish()
    }
}

impl Waiter {
    /// The entry waited for.
    pub fn key(&self) -> Key {
        self.key
    }

    /// Blocks until the load completes. [`CacheError::Gone`] if it was abandoned (or the entry was evicted
    /// before this waiter woke up): look the key up again, possibly becoming the loader.
    pub fn wait(self) -> Result<Handle, CacheError> {
        let mut inner = self.shared.lock();
        loop {
            match self.poll(&inner) {
                Some(r) => return r,
                None => {
                    inner.n_waiting += 1;
                    inner = self.shared.loaded.wait(inner).unwrap_or_else(|e| e.into_inner());
                    inner.n_waiting -= 1;
                }
            }
        }
    }

    /// The outcome if the load has finished, `None` while it is in flight.
    pub fn try_get(&self) -> Option<Result<Handle, CacheError>> {
        let inner = self.shared.lock();
        self.poll(&inner)
    }

    fn poll(&self, inner: &Inner) -> Option<Result<Handle, CacheError>> {
        let e = &inner.entries[self.idx as usize];
        if e.generation != self.generation {
            return Some(Err(CacheError::Gone { key: self.key }));
        }
        match e.state {
            State::Loading => None,
            State::Present => {
                Some(Ok(Handle { data: e.data.clone().expect("present entries hold data"), key: self.key }))
            }
            State::Free => Some(Err(CacheError::Gone { key: self.key })),
        }
    }
}

/// The segmented neuron cache; see the crate documentation. Cloning gives another handle to the same cache, to
/// share between threads.
#[derive(Clone)]
pub struct SegmentedCache {
    shared: Arc<Shared>,
}

impl fmt::Debug for SegmentedCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SegmentedCache").field("stats", &self.stats()).finish()
    }
}

impl SegmentedCache {
    /// An empty cache with the given budgets and policy.
    pub fn new(config: CacheConfig) -> SegmentedCache {
        let region = |budget: usize| RegionState {
            stats: RegionStats { budget, ..RegionStats::default() },
            head: NIL,
            tail: NIL,
            free: BTreeMap::new(),
        };
        let policy = match config.policy {
            Policy::SlidingWindow { tokens } => Policy::SlidingWindow { tokens: tokens.max(1) },
            p => p,
        };
        SegmentedCache {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    map: HashMap::default(),
                    entries: Vec::new(),
                    free_entries: Vec::new(),
                    regions: [
                        region(config.fixed_bytes),
                        region(config.hot_bytes),
                        region(config.cold_bytes),
                    ],
                    token: 0,
                    policy,
                    n_waiting: 0,
                }),
                loaded: Condvar::new(),
            }),
        }
    }

    /// Returns the entry if present (marking it most recently used), or reserves it for the caller to load
    /// (evicting least recently used, unpinned entries of its region as needed), or returns a [`Waiter`] if
    /// another caller is loading it. `len` is the entry's length in bytes.
    pub fn lookup_or_reserve(&self, key: Key, len: usize) -> Result<Lookup, CacheError> {
        let mut inner = self.shared.lock();
        if let Some(&idx) = inner.map.get(&key) {
            return inner.found(idx, key, Some(len)).map(|found| match found {
                Found::Present(data) => Lookup::Hit(Handle { data, key }),
                Found::Loading(generation) => {
                    Lookup::InFlight(Waiter { shared: self.shared.clone(), key, idx, generation })
                }
            });
        }
        let (idx, generation, data) = inner.reserve(key, len)?;
        drop(inner);
        Ok(Lookup::Reserved(Slot { shared: self.shared.clone(), key, idx, generation, data: Some(data) }))
    }

    /// Returns the entry if present (marking it most recently used and counting a hit), without reserving;
    /// counts a miss otherwise (also when it is loading).
    pub fn get(&self, key: Key) -> Option<Handle> {
        let mut inner = self.shared.lock();
        let region = key.region().idx();
        match inner.map.get(&key) {
            Some(&idx) if inner.entries[idx as usize].state == State::Present => {
                match inner.found(idx, key, None) {
                    Ok(Found::Present(data)) => Some(Handle { data, key }),
                    _ => None,
                }
            }
            _ => {
                inner.regions[region].stats.misses += 1;
                None
            }
        }
    }

    /// The state of `key`, without touching LRU order or counters.
    pub fn state(&self, key: Key) -> EntryState {
        let inner = self.shared.lock();
        match inner.map.get(&key).map(|&i| inner.entries[i as usize].state) {
            Some(State::Present) => EntryState::Present,
            Some(State::Loading) => EntryState::Loading,
            _ => EntryState::Absent,
        }
    }

    /// Copies `bytes` into the slot and publishes the entry; returns a handle to it and wakes its waiters. Bytes
    /// of the wrong length are refused with [`CacheError::LengthMismatch`], and the load is abandoned.
    pub fn complete(&self, mut slot: Slot, bytes: &[u8]) -> Result<Handle, CacheError> {
        if bytes.len() != slot.len() {
            return Err(CacheError::LengthMismatch { key: slot.key, expected: slot.len(), got: bytes.len() });
        }
        slot.buf_mut().copy_from_slice(bytes);
        Ok(self.complete_in_place(slot))
    }

    /// Publishes an entry whose bytes were written through [`Slot::buf_mut`]; returns a handle to it and wakes
    /// its waiters.
    pub fn complete_in_place(&self, mut slot: Slot) -> Handle {
        let data = slot.data.take().expect("a live slot holds its buffer");
        let mut inner = slot.shared.lock();
        inner.publish(slot.idx, data.clone());
        slot.shared.wake(inner);
        Handle { data, key: slot.key }
    }

    /// Starts the next token. With [`Policy::SlidingWindow`], drops the unpinned hot and cold entries that no
    /// lookup of the last `tokens` tokens touched. Returns the new token number.
    pub fn advance_token(&self) -> u64 {
        let mut inner = self.shared.lock();
        inner.token += 1;
        if let Policy::SlidingWindow { tokens } = inner.policy {
            let token = inner.token;
            for region in [Region::Hot, Region::Cold] {
                inner.evict_older_than(region, token, u64::from(tokens));
            }
        }
        inner.token
    }

    /// Counters of every region.
    pub fn stats(&self) -> CacheStats {
        let inner = self.shared.lock();
        CacheStats {
            fixed: inner.regions[0].stats,
            hot: inner.regions[1].stats,
            cold: inner.regions[2].stats,
            token: inner.token,
        }
    }

    /// Keys of the present entries of `region`, most recently used first (for tests and debugging; allocates).
    pub fn lru_order(&self, region: Region) -> Vec<Key> {
        let inner = self.shared.lock();
        let mut out = Vec::new();
        let mut i = inner.regions[region.idx()].head;
        while i != NIL {
            let e = &inner.entries[i as usize];
            out.push(e.key);
            i = e.next;
        }
        out
    }
}

enum Found {
    Present(Arc<EntryData>),
    Loading(u64),
}

impl Inner {
    /// A lookup found `idx`: count it and, if present, touch it.
    fn found(&mut self, idx: u32, key: Key, len: Option<usize>) -> Result<Found, CacheError> {
        let e = &self.entries[idx as usize];
        if let Some(len) = len.filter(|&l| l != e.len) {
            return Err(CacheError::LengthMismatch { key, expected: e.len, got: len });
        }
        let region = key.region().idx();
        match e.state {
            State::Present => {
                let data = e.data.clone().expect("present entries hold data");
                self.regions[region].stats.hits += 1;
                self.unlink(idx);
                self.link_front(idx);
                let token = self.token;
                self.entries[idx as usize].last_token = token;
                Ok(Found::Present(data))
            }
            State::Loading => {
                self.regions[region].stats.in_flight_hits += 1;
                Ok(Found::Loading(e.generation))
            }
            State::Free => unreachable!("mapped entries are never free"),
        }
    }

    /// Makes room for and reserves an absent entry.
    fn reserve(&mut self, key: Key, len: usize) -> Result<(u32, u64, Arc<EntryData>), CacheError> {
        let region = key.region();
        let r = region.idx();
        let bytes = entry_bytes(len);
        let budget = self.regions[r].stats.budget;
        if bytes > budget {
            return Err(CacheError::TooLarge { key, bytes, region, budget });
        }
        let used = self.regions[r].used();
        if used + bytes > budget {
            let need = used + bytes - budget;
            let evictable = if region == Region::Fixed { 0 } else { self.evictable_bytes(r, need) };
            if evictable < need {
                return Err(CacheError::RegionFull { key, bytes, region, evictable, budget });
            }
            // Evict least recently used, unpinned entries until the new one fits.
            let mut i = self.regions[r].tail;
            while self.regions[r].used() + bytes > budget {
                let prev = self.entries[i as usize].prev;
                if !self.pinned(i) {
                    self.evict(i);
                }
                i = prev;
            }
        }
        self.regions[r].stats.misses += 1;
        let data = self.take_buffer(r, len, bytes);
        let rs = &mut self.regions[r];
        rs.stats.bytes_loading += bytes;

        let generation;
        let idx = match self.free_entries.pop() {
            Some(idx) => {
                let e = &mut self.entries[idx as usize];
                generation = e.generation;
                *e = Entry {
                    key,
                    state: State::Loading,
                    data: None,
                    len,
                    bytes,
                    prev: NIL,
                    next: NIL,
                    last_token: 0,
                    generation,
                };
                idx
            }
            None => {
                let idx = self.entries.len() as u32;
                generation = 0;
                self.entries.push(Entry {
                    key,
                    state: State::Loading,
                    data: None,
                    len,
                    bytes,
                    prev: NIL,
                    next: NIL,
                    last_token: 0,
                    generation,
                });
                idx
            }
        };
        self.map.insert(key, idx);
        Ok((idx, generation, data))
    }

    /// Bytes of unpinned present entries in region `r`, counted from the LRU end, stopping once `need` is reached.
    fn evictable_bytes(&self, r: usize, need: usize) -> usize {
        let mut sum = 0;
        let mut i = self.regions[r].tail;
        while i != NIL && sum < need {
            if !self.pinned(i) {
                sum += self.entries[i as usize].bytes;
            }
            i = self.entries[i as usize].prev;
        }
        sum
    }

    /// A present entry is pinned while a [`Handle`] to it exists. Handles are only created under the lock, so
    /// a count of one (the cache's own reference) observed under the lock cannot grow behind our back.
    fn pinned(&self, idx: u32) -> bool {
        self.entries[idx as usize].data.as_ref().is_some_and(|d| Arc::strong_count(d) > 1)
    }

    /// A buffer of `bytes` capacity for an entry of `len` bytes: an idle one of that size, or a new one after
    /// freeing idle buffers of other sizes as needed to stay within the budget.
    fn take_buffer(&mut self, r: usize, len: usize, bytes: usize) -> Arc<EntryData> {
        let rs = &mut self.regions[r];
        while let Some(mut data) = rs.free.get_mut(&bytes).and_then(Vec::pop) {
            if let Some(d) = Arc::get_mut(&mut data) {
                d.len = len;
                return data;
            }
            // Unreachable in practice (idle buffers have no handles); drop it and account for it.
            rs.stats.bytes_allocated -= bytes;
        }
        let budget = rs.stats.budget;
        while rs.stats.bytes_allocated + bytes > budget {
            let (&size, list) = rs.free.iter_mut().rev().find(|(_, l)| !l.is_empty()).expect(
                "resident + loading + new <= budget, so idle buffers cover any excess of allocated over budget",
            );
            list.pop();
            rs.stats.bytes_allocated -= size;
        }
        rs.stats.bytes_allocated += bytes;
        rs.stats.allocations += 1;
        let buf = AlignedBuf::new(bytes).expect("allocation of a cache buffer failed");
        Arc::new(EntryData { buf, len })
    }

    fn publish(&mut self, idx: u32, data: Arc<EntryData>) {
        let token = self.token;
        let e = &mut self.entries[idx as usize];
        debug_assert_eq!(e.state, State::Loading);
        e.state = State::Present;
        e.data = Some(data);
        e.last_token = token;
        let (r, bytes) = (e.key.region().idx(), e.bytes);
        let rs = &mut self.regions[r].stats;
        rs.bytes_loading -= bytes;
        rs.bytes_resident += bytes;
        rs.entries += 1;
        self.link_front(idx);
    }

    fn abort(&mut self, idx: u32, generation: u64, data: Arc<EntryData>) {
        let e = &self.entries[idx as usize];
        debug_assert!(e.generation == generation && e.state == State::Loading);
        let (key, bytes) = (e.key, e.bytes);
        let rs = &mut self.regions[key.region().idx()];
        rs.stats.bytes_loading -= bytes;
        rs.stats.aborts += 1;
        rs.free.entry(bytes).or_default().push(data);
        self.release(idx);
    }

    fn evict(&mut self, idx: u32) {
        self.unlink(idx);
        let e = &mut self.entries[idx as usize];
        let data = e.data.take().expect("present entries hold data");
        let (key, bytes) = (e.key, e.bytes);
        let rs = &mut self.regions[key.region().idx()];
        rs.stats.bytes_resident -= bytes;
        rs.stats.entries -= 1;
        rs.stats.evictions += 1;
        rs.free.entry(bytes).or_default().push(data);
        self.release(idx);
    }

    /// Returns an entry to the free list.
    fn release(&mut self, idx: u32) {
        let e = &mut self.entries[idx as usize];
        self.map.remove(&e.key);
        e.state = State::Free;
        e.generation += 1;
        self.free_entries.push(idx);
    }

    fn evict_older_than(&mut self, region: Region, token: u64, window: u64) {
        let r = region.idx();
        let mut i = self.regions[r].tail;
        // The list is ordered by last use, so the walk can stop at the first entry inside the window.
        while i != NIL && self.entries[i as usize].last_token + window <= token {
            let prev = self.entries[i as usize].prev;
            if !self.pinned(i) {
                self.evict(i);
            }
            i = prev;
        }
    }

    fn unlink(&mut self, idx: u32) {
        let (prev, next, r) = {
            let e = &self.entries[idx as usize];
            (e.prev, e.next, e.key.region().idx())
        };
        match prev {
            NIL => self.regions[r].head = next,
            p => self.entries[p as usize].next = next,
        }
        match next {
            NIL => self.regions[r].tail = prev,
            n => self.entries[n as usize].prev = prev,
        }
        let e = &mut self.entries[idx as usize];
        e.prev = NIL;
        e.next = NIL;
    }

    fn link_front(&mut self, idx: u32) {
        let r = self.entries[idx as usize].key.region().idx();
        let head = self.regions[r].head;
        {
            let e = &mut self.entries[idx as usize];
            e.prev = NIL;
            e.next = head;
        }
        match head {
            NIL => self.regions[r].tail = idx,
            h => self.entries[h as usize].prev = idx,
        }
        self.regions[r].head = idx;
    }
}
