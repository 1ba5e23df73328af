//! Unit tests of [`LruRegion`]: LRU order, lengths, refusals, guards, the sliding window, errors, and its
//! memory against [`region_bytes`]. The property tests against the reference model are in `crate::tests`.

use super::*;

/// The bytes stored under `key` in these tests: the key's little-endian bytes, then the key's low byte.
fn pattern(key: u32, len: usize) -> Vec<u8> {
    let mut v = vec![key as u8; len];
    let head = key.to_le_bytes();
    let n = head.len().min(len);
    v[..n].copy_from_slice(&head[..n]);
    v
}

fn region(entry_len: usize, capacity: usize, n_keys: usize, policy: Policy) -> LruRegion {
    match LruRegion::new(RegionConfig { entry_len, capacity, n_keys }, policy) {
        Ok(r) => r,
        Err(e) => panic!("{e}"),
    }
}

fn insert(r: &LruRegion, key: u32, len: usize) -> Insert {
    match r.insert(key, &pattern(key, len)) {
        Ok(res) => res,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn evicts_the_least_recently_used() {
    let r = region(972, 3, 100, Policy::Lru);
    for k in [10, 11, 12] {
        assert_eq!(insert(&r, k, 972), Insert::Stored);
    }
    assert_eq!(r.lru_order(), [12, 11, 10]);
    assert!(r.get(10).is_some()); // 10 becomes most recent: 10, 12, 11
    assert!(r.contains(11)); // does not count or touch
    assert_eq!(insert(&r, 13, 972), Insert::Replaced { evicted: 11 });
    assert_eq!(r.lru_order(), [13, 10, 12]);
    assert_eq!(insert(&r, 14, 972), Insert::Replaced { evicted: 12 });
    assert_eq!(insert(&r, 10, 972), Insert::Present, "present: refused, recency unchanged");
    assert_eq!(r.lru_order(), [14, 13, 10]);
    assert!(r.get(11).is_none());
    assert_eq!(&*r.get(13).unwrap(), &pattern(13, 972)[..]);
    let s = r.stats();
    assert_eq!(
        s,
        RegionStats {
            entries: 3,
            bytes: 3 * 972,
            hits: 2,
            misses: 1,
            inserts: 5,
            evictions: 2,
            rejections: 1
        }
    );
    assert_eq!(s.hit_rate(), 2.0 / 3.0);
    r.reset_stats();
    assert_eq!(r.stats(), RegionStats { entries: 3, bytes: 3 * 972, ..RegionStats::default() });
}

#[test]
fn entries_keep_their_own_length() {
    // Entries of at most `entry_len` bytes keep their own length (no rounding up).
    let r = region(4 * 100, 2, 8, Policy::Lru);
    assert_eq!(insert(&r, 7, 250), Insert::Stored);
    assert_eq!(insert(&r, 0, 400), Insert::Stored);
    assert_eq!(r.get(7).unwrap().len(), 250);
    // A full-length entry reuses the slot that held a short one, and the other way round.
    assert_eq!(insert(&r, 1, 400), Insert::Replaced { evicted: 0 });
    assert_eq!(insert(&r, 2, 3), Insert::Replaced { evicted: 7 });
    assert_eq!(&*r.get(1).unwrap(), &pattern(1, 400)[..]);
    assert_eq!(&*r.get(2).unwrap(), &pattern(2, 3)[..]);
    assert_eq!((r.stats().bytes, r.len()), (403, 2));
    assert_eq!(insert(&r, 3, 0), Insert::Replaced { evicted: 1 });
    assert_eq!(r.get(3).unwrap().len(), 0);
}

#[test]
fn bad_input_is_an_error_and_changes_nothing() {
    let r = region(8, 2, 4, Policy::Lru);
    assert_eq!(r.insert(4, &[0; 8]), Err(CacheError::KeyOutOfRange { key: 4, n_keys: 4 }));
    assert_eq!(r.insert(u32::MAX, &[0; 8]), Err(CacheError::KeyOutOfRange { key: u32::MAX, n_keys: 4 }));
    assert_eq!(r.insert(1, &[0; 9]), Err(CacheError::EntryTooLong { key: 1, len: 9, entry_len: 8 }));
    assert!(r.get(4).is_none() && r.get(u32::MAX).is_none() && !r.contains(4));
    assert_eq!(r.stats(), RegionStats::default(), "nothing counted");
    assert_eq!(insert(&r, 1, 8), Insert::Stored);
    let err =
        LruRegion::new(RegionConfig { entry_len: 8, capacity: u32::MAX as usize, n_keys: 4 }, Policy::Lru);
    assert!(matches!(err, Err(CacheError::ConfigTooLarge { field: "capacity", .. })), "{err:?}");
    let err = LruRegion::new(RegionConfig { entry_len: 8, capacity: 4, n_keys: usize::MAX }, Policy::Lru);
    assert!(matches!(err, Err(CacheError::ConfigTooLarge { field: "n_keys", .. })), "{err:?}");
    let long = u32::MAX as usize + 1;
    let err = LruRegion::new(RegionConfig { entry_len: long, capacity: 4, n_keys: 4 }, Policy::Lru);
    assert!(matches!(err, Err(CacheError::ConfigTooLarge { field: "entry_len", .. })), "{err:?}");
    assert!(err.unwrap_err().to_string().contains("entry_len = 4294967296"));
}

#[test]
fn capacity_zero_never_stores() {
    let r = region(8, 0, 4, Policy::Lru);
    assert_eq!(insert(&r, 1, 8), Insert::NoRoom);
    assert!(!r.contains(1) && r.get(1).is_none() && r.is_empty());
    assert_eq!(r.advance_token(), 1);
    assert_eq!(r.stats(), RegionStats { misses: 1, rejections: 1, ..RegionStats::default() });
}

#[test]
fn held_entries_are_skipped_then_everything_held_is_refused() {
    let r = region(32, 3, 100, Policy::Lru);
    assert_eq!(insert(&r, 0, 32), Insert::Stored);
    let a = r.get(0).unwrap();
    // 0 becomes the least recently used entry, but it is held: the next victims are the others.
    for k in 1..50 {
        assert!(insert(&r, k, 32).is_stored());
        assert!(r.contains(0));
    }
    assert_eq!(r.lru_order(), [49, 48, 0]);
    assert_eq!(&*a, &pattern(0, 32)[..]);
    let b = r.get(48).unwrap();
    let c = r.get(49).unwrap();
    assert_eq!(insert(&r, 60, 32), Insert::NoRoom, "every entry held: refused without waiting");
    // A second guard on a held entry is fine.
    assert_eq!(&*r.get(0).unwrap(), &pattern(0, 32)[..]);
    drop(b);
    assert_eq!(insert(&r, 60, 32), Insert::Replaced { evicted: 48 });
    assert_eq!((a.key(), c.key()), (0, 49));
    assert_eq!(r.stats().rejections, 1);
}

#[test]
fn sliding_window_drops_entries_untouched_for_k_tokens() {
    let r = region(4, 4, 8, Policy::SlidingWindow { tokens: 2 });
    assert_eq!(insert(&r, 0, 4), Insert::Stored); // never used again
    assert_eq!(insert(&r, 1, 4), Insert::Stored); // used every token
    assert_eq!(r.advance_token(), 1);
    assert!(r.contains(0), "used one token ago: inside the window");
    assert!(r.get(1).is_some());
    assert_eq!(r.advance_token(), 2);
    assert!(!r.contains(0), "unused for 2 tokens: dropped");
    for t in 3..10 {
        assert!(r.get(1).is_some());
        assert_eq!(r.advance_token(), t);
    }
    assert_eq!((r.lru_order(), r.stats().evictions), (vec![1], 1));
    // The freed slot is reused without evicting anything.
    for k in 2..5 {
        assert_eq!(insert(&r, k, 4), Insert::Stored);
    }
    assert_eq!((r.len(), r.stats().evictions), (4, 1));
    // Held entries outlive the window; the rest of the list behind them is still dropped.
    let g = r.get(2).unwrap();
    r.advance_token();
    r.advance_token();
    assert_eq!(r.lru_order(), [2]);
    assert_eq!(&*g, &pattern(2, 4)[..]);
    drop(g);
    assert_eq!(r.advance_token(), 12, "last used at token 9, dropped at 11 or later");
    assert!(r.is_empty());
    // A window of 0 tokens is taken as 1: only the current token's entries stay.
    let r = region(4, 4, 8, Policy::SlidingWindow { tokens: 0 });
    assert_eq!(insert(&r, 0, 4), Insert::Stored);
    r.advance_token();
    assert!(r.is_empty());
}

#[test]
fn lru_ignores_tokens() {
    let r = region(4, 2, 8, Policy::Lru);
    assert_eq!(insert(&r, 0, 4), Insert::Stored);
    for t in 1..20 {
        assert_eq!(r.advance_token(), t);
    }
    assert!(r.contains(0));
}

/// A reader that finds its entry while the entry's bytes are still being copied in waits for the writer, then
/// reads the new bytes (the slow path of `get`).
#[test]
fn get_waits_for_a_write_in_progress() {
    let r = region(64, 2, 8, Policy::Lru);
    assert_eq!(insert(&r, 3, 64), Insert::Stored);
    let s = r.lock().slot_of_key[3] as usize;
    // Stand in for an insert of key 3 between its bookkeeping and its copy: the slot is write-locked.
    let mut writing = r.slots[s].write().unwrap();
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| r.get(3).map(|e| e.to_vec()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        writing.bytes.copy_from_slice(&[0xAB; 64]);
        drop(writing);
        assert_eq!(reader.join().unwrap(), Some(vec![0xAB; 64]));
    });
    assert_eq!(r.stats().hits, 1);
}

/// The same, but the slot is freed by the window while the reader waits: the reader sees a miss, not the
/// freed slot's bytes.
#[test]
fn get_of_an_entry_dropped_while_waiting_is_a_miss() {
    let r = region(64, 2, 8, Policy::SlidingWindow { tokens: 1 });
    assert_eq!(insert(&r, 3, 64), Insert::Stored);
    let s = r.lock().slot_of_key[3] as usize;
    let writing = r.slots[s].write().unwrap();
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| r.get(3).map(|e| e.to_vec()));
        // Let the reader find the mapping and block on the slot (if it is slower, it finds no mapping: a miss too).
        std::thread::sleep(std::time::Duration::from_millis(20));
        // Free the slot as the window does (it cannot take the write guard we hold, so do it by hand).
        let mut data = writing;
        data.key = NIL;
        r.lock().evict(s as u32);
        drop(data);
        assert_eq!(reader.join().unwrap(), None);
    });
    assert_eq!((r.stats().hits, r.stats().misses), (0, 1));
}

/// [`region_bytes`] bounds what the region allocates, at every fill level, and is exact once every slot is
/// used by a full-length entry.
#[test]
fn region_bytes_bounds_the_allocation() {
    for (entry_len, capacity, n_keys) in
        [(972, 100, 1536), (4 * 972, 7, 48), (0, 3, 5), (8, 0, 10), (1, 1, 0)]
    {
        let r = region(entry_len, capacity, n_keys, Policy::Lru);
        let bound = region_bytes(entry_len, capacity, n_keys);
        assert_eq!(bound, RegionConfig { entry_len, capacity, n_keys }.max_bytes());
        let empty = r.allocated_bytes();
        assert_eq!(empty, bound - capacity * entry_len, "tables are allocated in full, entries not yet");
        for k in 0..n_keys as u32 {
            let _ = r.insert(k, &pattern(k, entry_len / 2));
            assert!(r.allocated_bytes() <= bound);
            assert!(r.len() <= capacity);
        }
        if n_keys >= capacity {
            assert_eq!(r.allocated_bytes(), bound, "{entry_len} {capacity} {n_keys}");
        }
    }
    assert_eq!(REGION_BYTES_PER_KEY, 4);
    // Key, length, two links and a token (24 bytes); a futex RwLock with its poison flag (16), the key, length
    // and buffer pointer (24).
    #[cfg(all(target_os = "linux", target_pointer_width = "64"))]
    assert_eq!(REGION_BYTES_PER_ENTRY, 64);
    assert_eq!(region_bytes(usize::MAX, 2, 1), usize::MAX, "saturates instead of overflowing");
}

#[test]
fn memory_grows_as_entries_arrive() {
    let r = region(972, 100, 1000, Policy::Lru);
    let empty = r.allocated_bytes();
    for k in 0..10 {
        let _ = r.insert(k, &pattern(k, 972));
    }
    assert_eq!(r.allocated_bytes(), empty + 10 * 972);
    for k in 10..500 {
        let _ = r.insert(k, &pattern(k, 972));
    }
    assert_eq!(r.allocated_bytes(), empty + 100 * 972, "never more than capacity");
}

#[test]
fn regions_and_guards_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn sync<T: Sync>() {}
    send_sync::<LruRegion>();
    sync::<EntryRef<'static>>();
}
