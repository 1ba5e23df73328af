//! An LRU region: up to `capacity` entries of at most `entry_len` bytes, keyed by `0..n_keys`, with exact
//! least-recently-used replacement (or LLM-in-a-Flash's sliding window), read by several threads while others
//! insert. Each partition (FFN layer) of the [`SegmentedCache`](crate::SegmentedCache) has one, its cold region:
//! a neuron-level LRU (key = neuron position, one bundle per entry).
//!
//! Bookkeeping sits under one mutex per region, held for O(1) work per call: a direct-indexed table from key to
//! slot (no hashing), and per slot its key, length, last-use token and links of an intrusive doubly linked
//! recency list over slot indices. Two walks are not O(1) but O(what they skip): an insert passes over entries
//! held by guards at the LRU end, and [`LruRegion::advance_token`] visits the entries it drops (and held ones
//! it must keep).
//!
//! Each slot's bytes sit behind their own `RwLock`, which also records the key and length they belong to. An
//! [`EntryRef`] is a read guard on one slot: while it lives the slot cannot be written, so eviction and the
//! window skip it. Writers only `try_write`, under the bookkeeping lock, and copy bytes after releasing it; a
//! thread waits for a slot lock only without the bookkeeping lock, so readers never block writers and nothing
//! can deadlock. A slot's bytes are allocated (exactly `entry_len`) when it is first used, then reused.

use std::fmt;
use std::ops::Deref;
use std::sync::{Mutex, MutexGuard, PoisonError, RwLock, RwLockReadGuard, RwLockWriteGuard, TryLockError};

use crate::error::CacheError;

/// Marks an absent key (in `slot_of_key`), a free slot (in the slot's key) and the end of a list.
const NIL: u32 = u32::MAX;

/// Which entries the LRU (cold) regions keep.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Policy {
    /// PowerInfer-2: keep the most recently used entries that fit (exact LRU per region).
    Lru,
    /// LLM in a Flash: [`advance_token`](crate::SegmentedCache::advance_token) drops the entries that no get or
    /// insert of the last `tokens` tokens touched; LRU decides under capacity pressure.
    SlidingWindow {
        /// Window length in tokens (0 is taken as 1: the current token).
        tokens: u32,
    },
}

impl Policy {
    /// The window in tokens (at least 1), `None` for [`Policy::Lru`].
    pub(crate) fn window(self) -> Option<u64> {
        match self {
            Policy::Lru => None,
            Policy::SlidingWindow { tokens } => Some(u64::from(tokens.max(1))),
        }
    }
}

/// The shape of an [`LruRegion`]. No `Default`: the sizes come from the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RegionConfig {
    /// Bytes of the longest entry (each slot's buffer has this length).
    pub entry_len: usize,
    /// Entries the region can hold.
    pub capacity: usize,
    /// Keys are `0..n_keys`.
    pub n_keys: usize,
}

impl RegionConfig {
    /// Bytes a region of this shape allocates at most; see [`region_bytes`].
    pub const fn max_bytes(&self) -> usize {
        region_bytes(self.entry_len, self.capacity, self.n_keys)
    }
}

/// Bookkeeping bytes a region allocates per entry of its capacity, beside the entry's `entry_len` bytes: its
/// slot record (key, length, links, last-use token) and its slot lock with the entry's key, length and buffer
/// pointer.
pub const REGION_BYTES_PER_ENTRY: usize = size_of::<SlotMeta>() + size_of::<RwLock<SlotData>>();

/// Bookkeeping bytes a region allocates per key: its slot index in the key table.
pub const REGION_BYTES_PER_KEY: usize = size_of::<u32>();

/// Bytes an [`LruRegion`] of `capacity` entries of `entry_len` bytes over `n_keys` keys takes at most: the
/// region value itself, `capacity * (entry_len + REGION_BYTES_PER_ENTRY)` and `n_keys * REGION_BYTES_PER_KEY`.
/// The key table and slot tables are allocated in full when the region is built; entry bytes only as slots are
/// first used. Heap allocator headers (16 bytes per entry buffer with glibc) are not counted.
pub const fn region_bytes(entry_len: usize, capacity: usize, n_keys: usize) -> usize {
    let per_entry = entry_len.saturating_add(REGION_BYTES_PER_ENTRY);
    size_of::<LruRegion>()
        .saturating_add(capacity.saturating_mul(per_entry))
        .saturating_add(n_keys.saturating_mul(REGION_BYTES_PER_KEY))
}

/// Counters and contents of one region (or of several, summed).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RegionStats {
    /// Present entries.
    pub entries: usize,
    /// Bytes of the present entries (their lengths, summed).
    pub bytes: usize,
    /// Lookups ([`LruRegion::get`]) that returned the entry.
    pub hits: u64,
    /// Lookups that found the entry absent (or replaced before it could be read).
    pub misses: u64,
    /// Entries stored by [`LruRegion::insert`].
    pub inserts: u64,
    /// Entries dropped: LRU victims of inserts, and entries the sliding window let go.
    pub evictions: u64,
    /// Inserts refused: key already present, capacity 0, or every entry held.
    pub rejections: u64,
}

impl RegionStats {
    /// `hits / (hits + misses)`, 0 when there were no lookups.
    pub fn hit_rate(&self) -> f64 {
        let lookups = self.hits + self.misses;
        if lookups == 0 { 0.0 } else { self.hits as f64 / lookups as f64 }
    }

    /// Adds `other` into `self`.
    pub(crate) fn add(&mut self, other: &RegionStats) {
        self.entries += other.entries;
        self.bytes += other.bytes;
        self.hits += other.hits;
        self.misses += other.misses;
        self.inserts += other.inserts;
        self.evictions += other.evictions;
        self.rejections += other.rejections;
    }
}

/// What [`LruRegion::insert`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[must_use]
pub enum Insert {
    /// Stored in a free slot.
    Stored,
    /// Stored in place of `evicted`, the least recently used entry no guard held.
    Replaced {
        /// The key that was evicted.
        evicted: u32,
    },
    /// Refused: the key is present (nothing changed, not even its recency).
    Present,
    /// Refused: the capacity is 0, or every entry is held by an [`EntryRef`].
    NoRoom,
}

impl Insert {
    /// Whether the bytes were stored.
    pub fn is_stored(&self) -> bool {
        matches!(self, Insert::Stored | Insert::Replaced { .. })
    }
}

/// A slot's bookkeeping, under the region's mutex.
#[derive(Clone, Copy)]
struct SlotMeta {
    /// The entry's key, [`NIL`] when the slot is free.
    key: u32,
    /// The entry's length.
    len: u32,
    /// Recency list links (present entries): `prev` towards the most recently used end. Free slots use `next`
    /// for the free list.
    prev: u32,
    next: u32,
    /// Token of the last get or insert.
    last_use: u64,
}

/// What a slot's lock protects: the key its bytes belong to ([`NIL`] when free), their length, and the buffer,
/// empty until the slot is first used, then `entry_len` bytes.
struct SlotData {
    key: u32,
    len: u32,
    bytes: Box<[u8]>,
}

/// Bookkeeping, all under one mutex.
struct Meta {
    /// Slot of each key, [`NIL`] when absent.
    slot_of_key: Vec<u32>,
    slots: Vec<SlotMeta>,
    /// Most and least recently used present entries.
    head: u32,
    tail: u32,
    /// Slots freed by the sliding window, linked through `next`.
    free: u32,
    /// Slots `n_fresh..capacity` have never been used.
    n_fresh: u32,
    token: u64,
    stats: RegionStats,
}

impl Meta {
    fn unlink(&mut self, s: u32) {
        let SlotMeta { prev, next, .. } = self.slots[s as usize];
        match prev {
            NIL => self.head = next,
            p => self.slots[p as usize].next = next,
        }
        match next {
            NIL => self.tail = prev,
            n => self.slots[n as usize].prev = prev,
        }
    }

    fn push_front(&mut self, s: u32) {
        let head = self.head;
        let m = &mut self.slots[s as usize];
        m.prev = NIL;
        m.next = head;
        match head {
            NIL => self.tail = s,
            h => self.slots[h as usize].prev = s,
        }
        self.head = s;
    }

    /// Marks present slot `s` used now: most recently used, last use this token.
    fn touch(&mut self, s: u32) {
        if self.head != s {
            self.unlink(s);
            self.push_front(s);
        }
        self.slots[s as usize].last_use = self.token;
    }

    /// Takes present slot `s` out of the mapping and the recency list, counting an eviction.
    fn evict(&mut self, s: u32) -> u32 {
        self.unlink(s);
        let m = &mut self.slots[s as usize];
        let key = m.key;
        m.key = NIL;
        let len = m.len as usize;
        self.slot_of_key[key as usize] = NIL;
        self.stats.entries -= 1;
        self.stats.bytes -= len;
        self.stats.evictions += 1;
        key
    }
}

/// Shared read access to a present entry's bytes. While it lives the entry is neither evicted nor overwritten;
/// inserts that would need its slot pick another victim or are refused, without waiting. Keep it for the
/// duration of a computation, not longer. Like the `RwLock` read guard it wraps, it can be shared between
/// threads (`Sync`) but not sent: the thread that took it drops it.
pub struct EntryRef<'a> {
    guard: RwLockReadGuard<'a, SlotData>,
}

impl EntryRef<'_> {
    /// The entry's key.
    pub fn key(&self) -> u32 {
        self.guard.key
    }
}

impl Deref for EntryRef<'_> {
    type Target = [u8];
    #[inline]
    fn deref(&self) -> &[u8] {
        &self.guard.bytes[..self.guard.len as usize]
    }
}

impl fmt::Debug for EntryRef<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EntryRef").field("key", &self.guard.key).field("len", &self.guard.len).finish()
    }
}

/// A region of entries keyed by `0..n_keys` with exact LRU replacement; see the module documentation. Share
/// it between threads by reference.
pub struct LruRegion {
    entry_len: usize,
    n_keys: usize,
    window: Option<u64>,
    meta: Mutex<Meta>,
    slots: Vec<RwLock<SlotData>>,
}

impl fmt::Debug for LruRegion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LruRegion")
            .field("entry_len", &self.entry_len)
            .field("capacity", &self.capacity())
            .field("n_keys", &self.n_keys)
            .field("window", &self.window)
            .field("stats", &self.stats())
            .finish()
    }
}

impl LruRegion {
    /// An empty region of the given shape. [`CacheError::ConfigTooLarge`] if `capacity` or `n_keys` is
    /// `u32::MAX` or more, or `entry_len` is more than `u32::MAX`.
    pub fn new(config: RegionConfig, policy: Policy) -> Result<LruRegion, CacheError> {
        let RegionConfig { entry_len, capacity, n_keys } = config;
        let max = NIL as usize - 1;
        for (field, value, max) in
            [("capacity", capacity, max), ("n_keys", n_keys, max), ("entry_len", entry_len, max + 1)]
        {
            if value > max {
                return Err(CacheError::ConfigTooLarge { field, value, max });
            }
        }
        let free_slot = SlotMeta { key: NIL, len: 0, prev: NIL, next: NIL, last_use: 0 };
        Ok(LruRegion {
            entry_len,
            n_keys,
            window: policy.window(),
            meta: Mutex::new(Meta {
                slot_of_key: vec![NIL; n_keys],
                slots: vec![free_slot; capacity],
                head: NIL,
                tail: NIL,
                free: NIL,
                n_fresh: 0,
                token: 0,
                stats: RegionStats::default(),
            }),
            slots: (0..capacity)
                .map(|_| RwLock::new(SlotData { key: NIL, len: 0, bytes: Box::default() }))
                .collect(),
        })
    }

    /// Bytes of the longest entry.
    pub fn entry_len(&self) -> usize {
        self.entry_len
    }

    /// Entries the region can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// Keys are `0..n_keys`.
    pub fn n_keys(&self) -> usize {
        self.n_keys
    }

    /// Present entries.
    pub fn len(&self) -> usize {
        self.lock().stats.entries
    }

    /// Whether no entry is present.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry's bytes if present (counting a hit and making it the most recently used entry), else `None`
    /// (counting a miss). The returned guard keeps the entry from being evicted or overwritten while it lives.
    /// A key out of range is never present (and not counted).
    pub fn get(&self, key: u32) -> Option<EntryRef<'_>> {
        let k = key as usize;
        if k >= self.n_keys {
            return None;
        }
        let mut meta = self.lock();
        let s = meta.slot_of_key[k];
        if s == NIL {
            meta.stats.misses += 1;
            return None;
        }
        meta.touch(s);
        // Usually no writer holds the slot: take the read guard now, so the entry cannot change before we read it.
        let guard = match self.slots[s as usize].try_read() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        };
        if let Some(guard) = guard {
            debug_assert_eq!(guard.key, key, "a mapped slot whose writer is done holds its key");
            meta.stats.hits += 1;
            return Some(EntryRef { guard });
        }
        // The entry's bytes are being copied in. Wait for the writer without the bookkeeping lock, then check that
        // the slot still holds `key`: another insert may have replaced it after the writer was done.
        drop(meta);
        let guard = self.slots[s as usize].read().unwrap_or_else(PoisonError::into_inner);
        let hit = guard.key == key;
        let mut meta = self.lock();
        if hit {
            meta.stats.hits += 1;
            Some(EntryRef { guard })
        } else {
            meta.stats.misses += 1;
            None
        }
    }

    /// Whether `key` is present, without counting or marking it. A key out of range is never present.
    pub fn contains(&self, key: u32) -> bool {
        let k = key as usize;
        k < self.n_keys && self.lock().slot_of_key[k] != NIL
    }

    /// Stores a copy of `bytes` (at most [`entry_len`](Self::entry_len) of them) under `key`, as the most
    /// recently used entry: in a free slot, or in place of the least recently used entry that no [`EntryRef`]
    /// holds. Refuses (and counts a rejection) when the key is present, the capacity is 0, or every entry is
    /// held; never waits for a guard. A key out of range or too many bytes is an error, and changes nothing.
    pub fn insert(&self, key: u32, bytes: &[u8]) -> Result<Insert, CacheError> {
        let k = key as usize;
        if k >= self.n_keys {
            return Err(CacheError::KeyOutOfRange { key, n_keys: self.n_keys });
        }
        if bytes.len() > self.entry_len {
            return Err(CacheError::EntryTooLong { key, len: bytes.len(), entry_len: self.entry_len });
        }
        let mut meta = self.lock();
        if meta.slot_of_key[k] != NIL {
            meta.stats.rejections += 1;
            return Ok(Insert::Present);
        }
        let Some((s, mut guard)) = self.take_slot(&mut meta) else {
            meta.stats.rejections += 1;
            return Ok(Insert::NoRoom);
        };
        let res = match meta.slots[s as usize].key {
            NIL => Insert::Stored,
            _ => Insert::Replaced { evicted: meta.evict(s) },
        };
        // Lengths fit in u32: `entry_len` does (checked by `new`).
        let len = bytes.len() as u32;
        let token = meta.token;
        let m = &mut meta.slots[s as usize];
        (m.key, m.len, m.last_use) = (key, len, token);
        meta.push_front(s);
        meta.slot_of_key[k] = s;
        meta.stats.entries += 1;
        meta.stats.bytes += bytes.len();
        meta.stats.inserts += 1;
        drop(meta);
        // Readers that find the new mapping wait on the write guard, so they see the key and bytes together.
        if guard.bytes.len() != self.entry_len {
            // The slot's first entry: this is where its memory is allocated.
            guard.bytes = vec![0; self.entry_len].into_boxed_slice();
        }
        guard.bytes[..bytes.len()].copy_from_slice(bytes);
        guard.key = key;
        guard.len = len;
        Ok(res)
    }

    /// Ends the current token and returns the new token number. With [`Policy::SlidingWindow`] `{ tokens }`,
    /// drops the entries last used `tokens` or more tokens ago (so each entry touched during the last `tokens`
    /// tokens stays), except those held by an [`EntryRef`].
    pub fn advance_token(&self) -> u64 {
        let mut meta = self.lock();
        meta.token += 1;
        let token = meta.token;
        if let Some(window) = self.window {
            // The recency list is ordered by last use, so the walk stops at the first entry inside the window.
            let mut s = meta.tail;
            while s != NIL && meta.slots[s as usize].last_use + window <= token {
                let prev = meta.slots[s as usize].prev;
                // A held entry stays until a later token boundary finds it free.
                if let Some(mut guard) = self.try_write(s) {
                    // A reader that found the mapping before this drop must not take the freed slot for its key.
                    guard.key = NIL;
                    meta.evict(s);
                    meta.slots[s as usize].next = meta.free;
                    meta.free = s;
                }
                s = prev;
            }
        }
        token
    }

    /// The counters, and the present entries and their bytes.
    pub fn stats(&self) -> RegionStats {
        self.lock().stats
    }

    /// Sets every counter to 0 (entries stay).
    pub fn reset_stats(&self) {
        let mut meta = self.lock();
        meta.stats =
            RegionStats { entries: meta.stats.entries, bytes: meta.stats.bytes, ..RegionStats::default() };
    }

    /// Keys of the present entries, most recently used first (for tests and debugging; allocates).
    pub fn lru_order(&self) -> Vec<u32> {
        let meta = self.lock();
        let mut out = Vec::with_capacity(meta.stats.entries);
        let mut s = meta.head;
        while s != NIL {
            out.push(meta.slots[s as usize].key);
            s = meta.slots[s as usize].next;
        }
        out
    }

    /// A slot for a new entry, with its write guard: a never used slot, else a freed one that can be written,
    /// else the least recently used entry that can be. `None` if every candidate is held (or the capacity is 0).
    fn take_slot(&self, meta: &mut Meta) -> Option<(u32, RwLockWriteGuard<'_, SlotData>)> {
        if (meta.n_fresh as usize) < self.slots.len() {
            let s = meta.n_fresh;
            // Nobody has seen this slot, so its lock is free.
            if let Some(guard) = self.try_write(s) {
                meta.n_fresh += 1;
                return Some((s, guard));
            }
        }
        // A freed slot can only be held, briefly, by a reader that found it mapped just before it was freed; skip
        // such a slot rather than wait.
        let (mut prev, mut s) = (NIL, meta.free);
        while s != NIL {
            let next = meta.slots[s as usize].next;
            if let Some(guard) = self.try_write(s) {
                match prev {
                    NIL => meta.free = next,
                    p => meta.slots[p as usize].next = next,
                }
                return Some((s, guard));
            }
            (prev, s) = (s, next);
        }
        let mut s = meta.tail;
        while s != NIL {
            if let Some(guard) = self.try_write(s) {
                return Some((s, guard));
            }
            s = meta.slots[s as usize].prev;
        }
        None
    }

    /// The slot's write guard if no reader or writer holds it.
    fn try_write(&self, s: u32) -> Option<RwLockWriteGuard<'_, SlotData>> {
        match self.slots[s as usize].try_write() {
            Ok(guard) => Some(guard),
            Err(TryLockError::Poisoned(e)) => Some(e.into_inner()),
            Err(TryLockError::WouldBlock) => None,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Meta> {
        // Nothing panics between the bookkeeping changes of one call (allocation failure aside), so a poisoned lock
        // is taken over rather than propagated to every compute thread.
        self.meta.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Heap and inline bytes of the region as allocated now (for tests of [`region_bytes`]).
    #[cfg(test)]
    pub(crate) fn allocated_bytes(&self) -> usize {
        let meta = self.lock();
        let entry_bytes: usize =
            self.slots.iter().map(|s| s.read().unwrap_or_else(PoisonError::into_inner).bytes.len()).sum();
        size_of::<LruRegion>()
            + meta.slot_of_key.capacity() * size_of::<u32>()
            + meta.slots.capacity() * size_of::<SlotMeta>()
            + self.slots.capacity() * size_of::<RwLock<SlotData>>()
            + entry_bytes
    }
}

#[cfg(test)]
mod tests;
