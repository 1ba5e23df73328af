//! A compact neuron-level cache for one FFN layer: fixed-size entries of exactly `entry_len` bytes, CLOCK
//! replacement (or LLM-in-a-Flash's sliding window), read concurrently while other threads insert.
//!
//! It predates [`LruRegion`](crate::LruRegion), which does the same with exact LRU and typed errors, and stays
//! until the runtime has moved to [`SegmentedCache`](crate::SegmentedCache). [`NeuronCache`] stores each entry
//! in a boxed slice of exactly `entry_len` bytes, so `capacity` entries cost `capacity * entry_len` bytes plus a
//! few dozen bytes of bookkeeping per slot and four per key.
//!
//! Locking: one mutex guards all bookkeeping (key and slot maps, reference bits, last-use tokens, free list,
//! clock hand, token counter, counters) and is held for O(1) work per call, except the clock sweep of
//! [`NeuronCache::insert`] (at most two turns) and the window scan of [`NeuronCache::advance_token`] (one pass
//! over the slots). Each slot's bytes sit behind their own `RwLock`, which also stores the key they belong to.
//! A [`NeuronRef`] is a read guard on one slot: while it lives the slot cannot be written, so eviction and the
//! window skip it. Writers only ever `try_write`, under the bookkeeping lock, and copy bytes after releasing it;
//! no thread ever waits for a slot lock while holding the bookkeeping lock, so readers never block writers and
//! nothing can deadlock.

use std::fmt;
use std::ops::Deref;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use crate::region::Policy;

/// Marks an absent key (in `slot_of_key`) or a free slot (in `key_of_slot` and [`SlotData::key`]).
const NIL: u32 = u32::MAX;

/// Counters of a [`NeuronCache`] since it was built or since [`NeuronCache::reset_stats`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NeuronCacheStats {
    /// Lookups ([`NeuronCache::get`]) that returned the entry.
    pub hits: u64,
    /// Lookups that found the entry absent (or replaced before it could be read).
    pub misses: u64,
    /// Entries stored by [`NeuronCache::insert`].
    pub inserts: u64,
    /// Entries dropped: CLOCK victims of an insert, and entries the sliding window let go.
    pub evictions: u64,
    /// Inserts refused: key already present, capacity 0, or every entry held by a [`NeuronRef`].
    pub rejected: u64,
}

impl NeuronCacheStats {
    /// `hits / (hits + misses)`, 0 when there were no lookups.
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 { 0.0 } else { self.hits as f64 / lookups as f64 }
    }
}

/// What a slot's lock protects: the key its bytes belong to ([`NIL`] when free) and the bytes. The box is empty
/// until the slot is first used, then exactly `entry_len` bytes; it is reused, never freed, after that.
struct SlotData {
    key: u32,
    bytes: Box<[u8]>,
}

/// Bookkeeping, all under one mutex.
struct Meta {
    /// Slot of each key, [`NIL`] when absent.
    slot_of_key: Vec<u32>,
    /// Key of each slot, [`NIL`] when free.
    key_of_slot: Vec<u32>,
    /// CLOCK reference bits: set by a hit, cleared by the passing hand.
    referenced: Vec<bool>,
    /// Token of each slot's last insert or hit (sliding window).
    last_use: Vec<u64>,
    /// Free slots, used as a stack: slot 0 is used first, then the most recently freed.
    free: Vec<u32>,
    /// Next slot the clock sweep looks at.
    hand: usize,
    token: u64,
    len: usize,
    stats: NeuronCacheStats,
}

/// Shared read access to a present entry's bytes (exactly [`NeuronCache::entry_len`] of them). While it lives the
/// entry is neither evicted nor overwritten; inserts that would need its slot pick another victim or are refused,
/// without waiting. Keep it for the duration of a computation, not longer. Like the `RwLock` read guard it wraps,
/// it can be shared between threads (`Sync`) but not sent: the thread that took it drops it.
pub struct NeuronRef<'a> {
    guard: RwLockReadGuard<'a, SlotData>,
}

impl NeuronRef<'_> {
    /// The entry's key.
    pub fn key(&self) -> u32 {
        self.guard.key
    }
}

impl Deref for NeuronRef<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.guard.bytes
    }
}

impl fmt::Debug for NeuronRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NeuronRef")
            .field("key", &self.guard.key)
            .field("len", &self.guard.bytes.len())
            .finish()
    }
}

/// A cache of fixed-size entries keyed by neuron position, one per FFN layer; see the module documentation.
/// Share it between threads by reference or in an `Arc`.
///
/// Memory grows only as entries arrive: a slot's `entry_len` bytes are allocated the first time an entry is
/// stored in it, and kept for reuse after that. So a cache never holds more than
/// [`budget_bytes`](Self::budget_bytes) of entry bytes, and holds less until it has filled up once.
pub struct NeuronCache {
    entry_len: usize,
    n_keys: usize,
    /// Window length in tokens with [`Policy::SlidingWindow`] (at least 1), `None` with [`Policy::Lru`].
    window: Option<u64>,
    meta: Mutex<Meta>,
    slots: Vec<RwLock<SlotData>>,
}

impl fmt::Debug for NeuronCache {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("NeuronCache")
            .field("entry_len", &self.entry_len)
            .field("capacity", &self.capacity())
            .field("n_keys", &self.n_keys)
            .field("window", &self.window)
            .field("len", &self.len())
            .field("stats", &self.stats())
            .finish()
    }
}

impl NeuronCache {
    /// An empty cache of `capacity` entries of exactly `entry_len` bytes, for keys `0..n_keys` (the neuron
    /// positions of one layer).
    ///
    /// [`Policy::Lru`] replaces with CLOCK, a second-chance approximation of LRU: a hit sets the entry's
    /// reference bit, and an insert into a full cache sweeps a hand over the slots, clearing set bits and taking
    /// the first entry whose bit is clear. A new entry starts with its bit clear. [`Policy::SlidingWindow`] is
    /// LLM in a Flash's policy: [`advance_token`](Self::advance_token) drops the entries that no insert or hit of
    /// the last `tokens` tokens touched (`tokens` is at least 1), and CLOCK decides under capacity pressure.
    ///
    /// Panics if `capacity` or `n_keys` is `u32::MAX` or more (keys and slots are `u32`, with `u32::MAX` as a
    /// marker).
    pub fn new(entry_len: usize, capacity: usize, n_keys: usize, policy: Policy) -> NeuronCache {
        assert!(
            capacity < NIL as usize,
            "NeuronCache capacity {capacity} is too large (at most u32::MAX - 1)"
        );
        assert!(n_keys < NIL as usize, "NeuronCache n_keys {n_keys} is too large (at most u32::MAX - 1)");
        let window = match policy {
            Policy::Lru => None,
            Policy::SlidingWindow { tokens } => Some(u64::from(tokens.max(1))),
        };
        NeuronCache {
            entry_len,
            n_keys,
            window,
            meta: Mutex::new(Meta {
                slot_of_key: vec![NIL; n_keys],
                key_of_slot: vec![NIL; capacity],
                referenced: vec![false; capacity],
                last_use: vec![0; capacity],
                free: (0..capacity as u32).rev().collect(),
                hand: 0,
                token: 0,
                len: 0,
                stats: NeuronCacheStats::default(),
            }),
            slots: (0..capacity).map(|_| RwLock::new(SlotData { key: NIL, bytes: Box::default() })).collect(),
        }
    }

    /// Bytes of each entry.
    pub fn entry_len(&self) -> usize {
        self.entry_len
    }

    /// Entries the cache can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Present entries.
    pub fn len(&self) -> usize {
        self.lock().len
    }

    /// Whether no entry is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of entries the cache may hold at most, `capacity * entry_len`: what a memory budget must reserve
    /// for it (bookkeeping aside).
    pub fn budget_bytes(&self) -> usize {
        self.capacity() * self.entry_len
    }

    /// The entry's bytes if present (counting a hit and marking it used this token), else `None` (counting a
    /// miss). The returned guard keeps the entry from being evicted or overwritten while it lives. Panics if
    /// `key` is not below `n_keys`.
    pub fn get(&self, key: u32) -> Option<NeuronRef<'_>> {
        let k = self.key_idx(key);
        let mut meta = self.lock();
        let slot = meta.slot_of_key[k];
        if slot == NIL {
            meta.stats.misses += 1;
            return None;
        }
        let s = slot as usize;
        meta.referenced[s] = true;
        meta.last_use[s] = meta.token;
        // Usually no writer holds the slot: take the read guard now, so the entry cannot change before we read it.
        let guard = match self.slots[s].try_read() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(guard) = guard {
            debug_assert_eq!(guard.key, key, "a mapped slot whose writer is done holds its key");
            meta.stats.hits += 1;
            return Some(NeuronRef { guard });
        }
        // The entry's bytes are being copied in. Wait for the writer without the bookkeeping lock, then check that
        // the slot still holds `key`: another insert may have replaced it after the writer was done.
        drop(meta);
        let guard = self.slots[s].read().unwrap_or_else(PoisonError::into_inner);
        let hit = guard.key == key;
        let mut meta = self.lock();
        if hit {
            meta.stats.hits += 1;
            Some(NeuronRef { guard })
        } else {
            meta.stats.misses += 1;
            None
        }
    }

    /// Whether `key` is present, without counting or marking it. Panics if `key` is not below `n_keys`.
    pub fn contains(&self, key: u32) -> bool {
        let k = self.key_idx(key);
        self.lock().slot_of_key[k] != NIL
    }

    /// Stores a copy of `bytes` under `key`, evicting a CLOCK victim if the cache is full. Returns `false` (and
    /// counts a rejection) when the key is already present, the capacity is 0, or every entry is held by a
    /// [`NeuronRef`]. Never waits for a guard.
    ///
    /// Panics if `bytes` is not exactly [`entry_len`](Self::entry_len) long or `key` is not below `n_keys`.
    pub fn insert(&self, key: u32, bytes: &[u8]) -> bool {
        assert!(
            bytes.len() == self.entry_len,
            "NeuronCache::insert: {} bytes for key {key}, but entries are entry_len = {} bytes",
            bytes.len(),
            self.entry_len
        );
        let k = self.key_idx(key);
        let mut meta = self.lock();
        if meta.slot_of_key[k] != NIL {
            meta.stats.rejected += 1;
            return false;
        }
        let Some((s, mut guard)) = self.take_slot(&mut meta) else {
            meta.stats.rejected += 1;
            return false;
        };
        let old = meta.key_of_slot[s];
        if old != NIL {
            meta.slot_of_key[old as usize] = NIL;
            meta.len -= 1;
            meta.stats.evictions += 1;
        }
        meta.key_of_slot[s] = key;
        meta.slot_of_key[k] = s as u32;
        meta.referenced[s] = false;
        meta.last_use[s] = meta.token;
        meta.len += 1;
        meta.stats.inserts += 1;
        drop(meta);
        // Readers that find the new mapping wait on the write guard, so they see the key and bytes together.
        guard.key = key;
        if guard.bytes.len() == self.entry_len {
            guard.bytes.copy_from_slice(bytes);
        } else {
            // The slot's first entry: this is where its memory is allocated.
            guard.bytes = bytes.into();
        }
        true
    }

    /// Ends the current token. With [`Policy::SlidingWindow`] `{ tokens }`, drops the entries last used `tokens`
    /// or more tokens ago (so each entry used during the last `tokens` tokens stays), except those held by a
    /// [`NeuronRef`]. Returns the new token number.
    pub fn advance_token(&self) -> u64 {
        let mut meta = self.lock();
        meta.token += 1;
        let token = meta.token;
        if let Some(window) = self.window {
            for s in 0..self.slots.len() {
                let key = meta.key_of_slot[s];
                if key == NIL || meta.last_use[s] + window > token {
                    continue;
                }
                // A held entry stays until a later token boundary finds it free.
                if let Some(mut guard) = self.try_write(s) {
                    // A reader that found the mapping before this drop must not take the freed slot for `key`.
                    guard.key = NIL;
                    meta.key_of_slot[s] = NIL;
                    meta.slot_of_key[key as usize] = NIL;
                    meta.referenced[s] = false;
                    meta.free.push(s as u32);
                    meta.len -= 1;
                    meta.stats.evictions += 1;
                }
            }
        }
        token
    }

    /// The counters.
    pub fn stats(&self) -> NeuronCacheStats {
        self.lock().stats
    }

    /// Sets every counter to 0.
    pub fn reset_stats(&self) {
        self.lock().stats = NeuronCacheStats::default();
    }

    /// A slot for a new entry, with its write guard: a free slot if one can be written, else a CLOCK victim.
    /// `None` if every candidate is held by a guard (or the capacity is 0).
    fn take_slot(&self, meta: &mut Meta) -> Option<(usize, RwLockWriteGuard<'_, SlotData>)> {
        // A free slot can only be held, briefly, by a reader that found it mapped just before it was freed; skip
        // such a slot rather than wait.
        for i in (0..meta.free.len()).rev() {
            let s = meta.free[i] as usize;
            if let Some(guard) = self.try_write(s) {
                meta.free.remove(i);
                return Some((s, guard));
            }
        }
        // Two turns: the first clears every reference bit it passes, so the second finds any entry not held.
        let capacity = self.slots.len();
        for _ in 0..2 * capacity {
            let s = meta.hand;
            meta.hand = if s + 1 == capacity { 0 } else { s + 1 };
            if meta.key_of_slot[s] == NIL {
                continue;
            }
            if meta.referenced[s] {
                meta.referenced[s] = false;
                continue;
            }
            if let Some(guard) = self.try_write(s) {
                return Some((s, guard));
            }
        }
        None
    }

    /// The slot's write guard if no reader or writer holds it.
    fn try_write(&self, s: usize) -> Option<RwLockWriteGuard<'_, SlotData>> {
        match self.slots[s].try_write() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    fn key_idx(&self, key: u32) -> usize {
        let k = key as usize;
        assert!(k < self.n_keys, "NeuronCache: key {key} out of range 0..{}", self.n_keys);
        k
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        // Nothing panics between the bookkeeping changes of one call (allocation failure aside), so a poisoned lock
        // is taken over rather than propagated to every compute thread.
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Slots whose bytes have been allocated (for tests of lazy allocation).
    #[cfg(test)]
    fn allocated_slots(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| !s.read().unwrap_or_else(PoisonError::into_inner).bytes.is_empty())
            .count()
    }
}

#[cfg(test)]
mod tests;
