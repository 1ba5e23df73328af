//! Tests of the fixed region and the segmented cache, property tests of the LRU regions against the reference
//! model of `fuzz.rs`, and multi-threaded tests.

use std::sync::Barrier;

use proptest::prelude::*;

use crate::fuzz::{FixedPush, Op, Push, Setup, run};
use crate::*;

fn ok<T>(r: Result<T, CacheError>) -> T {
    match r {
        Ok(v) => v,
        Err(e) => panic!("{e}"),
    }
}

#[test]
fn fixed_entries_are_aligned_contiguous_and_hold_their_bytes() {
    let lens = [972usize, 1, 0, 64, 65, 4096, 3];
    let capacity: usize = lens.iter().map(|&l| fixed_entry_bytes(l)).sum();
    let mut b = FixedRegionBuilder::new(capacity);
    let ids: Vec<FixedId> =
        lens.iter().enumerate().map(|(i, &len)| ok(b.push(&vec![i as u8 + 1; len]))).collect();
    let f = b.build();
    let mut offset = 0;
    for (i, (id, &len)) in ids.iter().zip(&lens).enumerate() {
        // Each entry starts at the first multiple of 64 after the previous one: no other padding.
        assert_eq!((id.offset(), id.len()), (offset, len));
        offset = fixed_entry_bytes(offset + len);
        assert_eq!(f.get(*id), &vec![i as u8 + 1; len][..]);
        assert_eq!(f.get(*id).as_ptr() as usize % FIXED_ALIGN, 0);
    }
    assert_eq!((f.len(), f.n_entries(), f.capacity()), (capacity - (FIXED_ALIGN - 3), lens.len(), capacity));
    // Two 972-byte bundles share a page: 2 * 1024 bytes, not 2 * 4096.
    assert_eq!(ids[3].offset(), 1024 + 64);
}

#[test]
fn fixed_capacity_overflow_is_an_error() {
    let mut b = FixedRegionBuilder::new(100);
    let a = ok(b.push(&[1; 50]));
    assert_eq!(b.push(&[2; 37]), Err(CacheError::FixedFull { len: 37, offset: 64, capacity: 100 }));
    let c = ok(b.push(&[3; 36])); // 64 + 36 = 100: fits exactly
    assert_eq!(b.push(&[]), Err(CacheError::FixedFull { len: 0, offset: 128, capacity: 100 }));
    let huge = b.push_with(usize::MAX, |_| -> Result<(), CacheError> { panic!("not called") });
    assert_eq!(huge, Err(CacheError::FixedFull { len: usize::MAX, offset: 128, capacity: 100 }));
    let f = b.build();
    assert_eq!((f.get(a), f.get(c)), (&[1u8; 50][..], &[3u8; 36][..]));
    let e = FixedRegion::empty();
    assert!(e.is_empty() && e.as_bytes().is_empty());
    let mut z = FixedRegionBuilder::new(0);
    assert!(z.push(&[]).is_ok() && z.push(&[1]).is_err());
}

#[test]
fn fixed_push_with_fills_in_place_and_takes_back_a_failed_entry() {
    #[derive(Debug, PartialEq)]
    enum ReadError {
        Cache(CacheError),
        Io(&'static str),
    }
    impl From<CacheError> for ReadError {
        fn from(e: CacheError) -> ReadError {
            ReadError::Cache(e)
        }
    }
    let mut b = FixedRegionBuilder::new(256);
    let a = b.push_with(10, |buf| {
        buf.copy_from_slice(b"0123456789");
        Ok::<(), ReadError>(())
    });
    let a = a.unwrap();
    let failed = b.push_with(100, |buf| {
        buf.fill(0xff);
        Err(ReadError::Io("short read"))
    });
    assert_eq!(failed, Err(ReadError::Io("short read")));
    assert_eq!(b.used(), 10, "the failed entry was taken back");
    let c = b.push_with(100, |buf| {
        assert!(buf.iter().all(|&x| x == 0), "a taken-back entry's bytes are zeroed");
        buf.fill(7);
        Ok::<(), ReadError>(())
    });
    let c = c.unwrap();
    assert_eq!(c.offset(), 64);
    let too_big = b.push_with(100, |_| Ok::<(), ReadError>(()));
    assert_eq!(
        too_big,
        Err(ReadError::Cache(CacheError::FixedFull { len: 100, offset: 192, capacity: 256 }))
    );
    let f = b.build();
    assert_eq!((f.get(a), f.get(c)), (&b"0123456789"[..], &[7u8; 100][..]));
    assert!(f.as_bytes()[10..64].iter().all(|&x| x == 0));
}

#[test]
fn fixed_region_bytes_is_its_allocation() {
    for capacity in [0, 1, 63, 64, 65, 1000, 1 << 20] {
        let f = FixedRegionBuilder::new(capacity).build();
        assert_eq!(f.allocated_bytes(), fixed_region_bytes(capacity), "{capacity}");
        assert_eq!(fixed_region_bytes(capacity), capacity + FIXED_ALIGN - 1);
    }
}

/// A large reservation costs no memory until it is written (the allocation is zeroed, so the OS maps pages
/// lazily). Checked on the process's resident size, with a wide margin for other tests' allocations.
#[test]
fn fixed_reservation_is_backed_only_when_written() {
    fn rss_kib() -> Option<u64> {
        let status = std::fs::read_to_string("/proc/self/status").ok()?;
        let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
        line.split_whitespace().nth(1)?.parse().ok()
    }
    let Some(before) = rss_kib() else { return };
    let mut b = FixedRegionBuilder::new(1 << 30);
    ok(b.push(&[1u8; 4096]));
    let f = b.build();
    let after = rss_kib().unwrap_or(before);
    assert!(
        after < before + (256 << 10),
        "1 GiB reserved, {} KiB more resident",
        after.saturating_sub(before)
    );
    assert_eq!(f.len(), 4096);
}

/// A layer's cold region: bundles of 100 bytes, keys 0..64.
fn layer(capacity: usize) -> RegionConfig {
    RegionConfig { entry_len: 100, capacity, n_keys: 64 }
}

#[test]
fn partitions_are_separate_and_summed_in_stats() {
    let mut b = FixedRegionBuilder::new(1000);
    ok(b.push(&[1; 100]));
    ok(b.push(&[2; 10]));
    let config = CacheConfig { policy: Policy::Lru, partitions: vec![layer(4), layer(2), layer(0)] };
    let c = ok(SegmentedCache::new(b.build(), config.clone()));
    assert_eq!((c.n_partitions(), c.policy()), (3, Policy::Lru));
    for k in 0..4 {
        assert!(ok(ok(c.cold(0)).insert(k, &[k as u8; 100])).is_stored());
    }
    // Filling layer 1's cold region evicts only from layer 1.
    for k in 0..10 {
        assert!(ok(ok(c.cold(1)).insert(k, &[k as u8; 100])).is_stored());
    }
    assert_eq!(ok(c.cold(0)).lru_order(), [3, 2, 1, 0]);
    assert_eq!(ok(c.cold(1)).lru_order(), [9, 8]);
    assert_eq!(ok(ok(c.cold(2)).insert(0, &[0; 100])), Insert::NoRoom);
    assert_eq!(ok(ok(c.cold(0)).insert(3, &[0; 50])), Insert::Present);
    assert!(ok(c.cold(0)).get(1).is_some() && ok(c.cold(1)).get(0).is_none());
    assert_eq!(ok(c.cold(0)).lru_order(), [1, 3, 2, 0]);
    let s = c.stats();
    assert_eq!((s.fixed.entries, s.fixed.bytes), (2, 128 + 10));
    assert_eq!(
        s.cold,
        RegionStats { entries: 6, bytes: 600, hits: 1, misses: 1, inserts: 14, evictions: 8, rejections: 2 }
    );
    assert_eq!(s.partitions.len(), 3);
    assert_eq!(
        s.partitions[0],
        RegionStats { entries: 4, bytes: 400, hits: 1, inserts: 4, rejections: 1, ..RegionStats::default() }
    );
    assert_eq!(
        s.partitions[1],
        RegionStats {
            entries: 2,
            bytes: 200,
            misses: 1,
            inserts: 10,
            evictions: 8,
            ..RegionStats::default()
        }
    );
    assert_eq!(s.partitions[2], RegionStats { rejections: 1, ..RegionStats::default() });
    for (p, stats) in s.partitions.iter().enumerate() {
        assert_eq!(*stats, ok(c.cold(p)).stats());
    }
    c.reset_stats();
    let s = c.stats();
    assert_eq!(s.cold, RegionStats { entries: 6, bytes: 600, ..RegionStats::default() });
    assert_eq!(s.partitions[1], RegionStats { entries: 2, bytes: 200, ..RegionStats::default() });
    assert_eq!((s.fixed.entries, s.fixed.bytes), (2, 128 + 10), "the fixed region is not reset");
    // Out-of-range partitions are errors.
    assert_eq!(c.cold(3).unwrap_err(), CacheError::PartitionOutOfRange { partition: 3, n_partitions: 3 });
    assert_eq!(
        c.cold(usize::MAX).unwrap_err().to_string(),
        format!("partition {} out of range 0..3", usize::MAX)
    );
}

/// The planner's charge: each partition's region, plus the partition list; it bounds what the cache's regions
/// allocate, filled or not.
#[test]
fn max_bytes_bounds_the_regions() {
    let partitions =
        vec![layer(4), layer(2), layer(0), RegionConfig { entry_len: 972, capacity: 3, n_keys: 9 }];
    let config = CacheConfig { policy: Policy::Lru, partitions };
    let regions = region_bytes(100, 4, 64) + region_bytes(100, 2, 64) + region_bytes(100, 0, 64);
    assert_eq!(config.max_bytes(), 4 * size_of::<LruRegion>() + regions + region_bytes(972, 3, 9));
    assert_eq!(CacheConfig { policy: Policy::Lru, partitions: vec![] }.max_bytes(), 0);
    let huge = CacheConfig { policy: Policy::Lru, partitions: vec![layer(usize::MAX); 2] };
    assert_eq!(huge.max_bytes(), usize::MAX, "saturates instead of overflowing");
    let c = ok(SegmentedCache::new(FixedRegion::empty(), config.clone()));
    let allocated = |c: &SegmentedCache| -> usize {
        (0..c.n_partitions()).map(|p| ok(c.cold(p)).allocated_bytes()).sum()
    };
    assert!(allocated(&c) <= config.max_bytes());
    for (p, r) in config.partitions.iter().enumerate() {
        for k in 0..r.n_keys as u32 {
            let _ = ok(ok(c.cold(p)).insert(k, &vec![1; r.entry_len]));
        }
    }
    assert_eq!(c.stats().cold.entries, 4 + 2 + 3);
    assert!(allocated(&c) <= config.max_bytes());
    assert_eq!(
        allocated(&c),
        regions + region_bytes(972, 3, 9),
        "every slot in use: each region at its bound"
    );
}

#[test]
fn advance_token_reaches_every_partition() {
    let config = CacheConfig { policy: Policy::SlidingWindow { tokens: 1 }, partitions: vec![layer(1); 3] };
    let c = ok(SegmentedCache::new(FixedRegion::empty(), config));
    for p in 0..3 {
        assert!(ok(ok(c.cold(p)).insert(0, &[1; 100])).is_stored());
    }
    assert_eq!(c.stats().cold.entries, 3);
    assert_eq!(c.advance_token(), 1);
    assert_eq!(c.token(), 1);
    let s = c.stats();
    assert_eq!((s.cold.entries, s.cold.evictions), (0, 3));
    assert!(s.partitions.iter().all(|p| p.evictions == 1), "{s:?}");
    let empty = ok(SegmentedCache::new(
        FixedRegion::empty(),
        CacheConfig { policy: Policy::Lru, partitions: vec![] },
    ));
    assert_eq!((empty.advance_token(), empty.advance_token()), (1, 2));
    assert_eq!(empty.stats(), CacheStats::default());
}

#[test]
fn unrepresentable_config_is_an_error() {
    let mut p = layer(1);
    p.n_keys = usize::MAX;
    let err = SegmentedCache::new(
        FixedRegion::empty(),
        CacheConfig { policy: Policy::Lru, partitions: vec![layer(1), p] },
    );
    assert!(matches!(err, Err(CacheError::ConfigTooLarge { field: "n_keys", .. })), "{err:?}");
}

#[test]
fn fuzz_entry_point_runs() {
    // A hand-picked sequence: fixed pushes of every kind, then every operation (a full region whose least
    // recently used entry is held evicts the next one, a shorter and a too long entry, the out-of-range
    // partition), then pseudo-random ones.
    #[rustfmt::skip]
    let hand_picked: &[u8] = &[
        0, 0xff, 200, 3, 40, 2, 7,
        3, 0, 0, 11, 1, 0, 4, 4, 210, 3, 6, 0, 5, 0, 0, 0, 4, 0, 0, 6, 0, 3, 7, 0,
        0, 0x85, 2, 9, 1, 0, 2, 3, 0, 19, 2, 0, 3, 5, 250, 6, 0, 0, 7, 0, 1, 7, 1, 8,
    ];
    fuzz::check_ops(hand_picked);
    let mut data = vec![0u8; 3001];
    let mut x = 1u32;
    for p in 0..12u8 {
        for b in &mut data {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8;
        }
        data[0] = p;
        fuzz::check_ops(&data);
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    // Partition 2 and keys 8 and 9 are out of range.
    let target = (0..3u8, 0..10u32);
    prop_oneof![
        4 => target.clone().prop_map(|(part, key)| Op::Get { part, key }),
        1 => target.clone().prop_map(|(part, key)| Op::Contains { part, key }),
        5 => (target.clone(), any::<u8>()).prop_map(|((part, key), len)| Op::Insert { part, key, len }),
        1 => target.prop_map(|(part, key)| Op::Hold { part, key }),
        1 => any::<usize>().prop_map(|guard| Op::Release { guard }),
        1 => Just(Op::Advance),
        1 => Just(Op::ResetStats),
    ]
}

fn setup_strategy() -> impl Strategy<Value = Setup> {
    let policy =
        prop_oneof![Just(Policy::Lru), (0..4u32).prop_map(|tokens| Policy::SlidingWindow { tokens })];
    let push = (0..300usize, 0..3u8).prop_map(|(len, how)| FixedPush {
        len,
        how: [Push::Copy, Push::With, Push::WithFailing][usize::from(how)],
    });
    (policy, 0..6usize, 0..1500usize, prop::collection::vec(push, 0..8)).prop_map(
        |(policy, cold_capacity, fixed_capacity, pushes)| Setup {
            policy,
            cold_capacity,
            fixed_capacity,
            pushes,
        },
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Every result, returned byte, held guard, recency order, key presence and counter matches the VecDeque
    /// reference LRU (and sliding window), no region exceeds its capacity, and the fixed region holds exactly
    /// what was pushed, aligned (the checks are in `fuzz::run`).
    #[test]
    fn matches_reference_model(setup in setup_strategy(), ops in prop::collection::vec(op_strategy(), 1..300)) {
        run(&setup, &ops);
    }

    #[test]
    fn arbitrary_bytes_never_break_invariants(data in prop::collection::vec(any::<u8>(), 0..900)) {
        fuzz::check_ops(&data);
    }
}

/// The bytes stored under `key` in the concurrency test: their length and content both derive from the key,
/// so a torn, foreign or stale entry cannot pass.
fn keyed(key: u32) -> Vec<u8> {
    let len = 972 - (key as usize % 5) * 100;
    (0..len).map(|i| (key as usize * 131 + i * 7) as u8).collect()
}

/// Four threads get, hold and insert on partition 0's cold region while two others do the same on partition
/// 1's, on small regions so slots are replaced while others read them (one thread also advancing tokens under
/// the sliding window): every entry read must hold its own key's bytes, held entries never change, no region
/// exceeds its capacity, and the counters add up.
#[test]
fn concurrent_gets_and_inserts_see_only_their_keys_bytes() {
    for policy in [Policy::Lru, Policy::SlidingWindow { tokens: 2 }] {
        let n_keys = 12u32;
        let cold = RegionConfig { entry_len: 972, capacity: 4, n_keys: n_keys as usize };
        let c =
            ok(SegmentedCache::new(FixedRegion::empty(), CacheConfig { policy, partitions: vec![cold; 2] }));
        let expect: Vec<Vec<u8>> = (0..n_keys).map(keyed).collect();
        let n_threads = 6;
        let barrier = Barrier::new(n_threads);
        std::thread::scope(|s| {
            for t in 0..n_threads {
                let (c, expect, barrier) = (&c, &expect, &barrier);
                s.spawn(move || {
                    let p = usize::from(t >= 4);
                    let r = ok(c.cold(p));
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                    let mut held: Option<EntryRef<'_>> = None;
                    barrier.wait();
                    for i in 0..150_000u32 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let key = (x % u64::from(n_keys)) as u32;
                        match (x >> 32) % 16 {
                            0..=7 => {
                                if let Some(e) = r.get(key) {
                                    assert_eq!(e.key(), key);
                                    assert!(*e == expect[key as usize][..], "thread {t} op {i} key {key}");
                                }
                            }
                            8..=13 => {
                                let _ = ok(r.insert(key, &expect[key as usize]));
                            }
                            14 => held = r.get(key), // kept across this thread's next operations
                            _ => {
                                if t == 0 && (x >> 40) % 8 == 0 {
                                    c.advance_token();
                                }
                                held = None;
                            }
                        }
                        if let Some(e) = &held {
                            assert!(**e == expect[e.key() as usize][..], "held entry changed");
                        }
                        assert!(r.len() <= r.capacity());
                    }
                });
            }
        });
        let st = c.stats();
        assert_eq!(st.partitions.len(), 2);
        let mut sum = RegionStats::default();
        for (p, rs) in st.partitions.iter().enumerate() {
            let r = ok(c.cold(p));
            assert_eq!(rs.inserts - rs.evictions, rs.entries as u64, "{policy:?}");
            assert_eq!(rs.entries, r.lru_order().len());
            assert!(rs.entries <= r.capacity());
            assert!(rs.hits > 0 && rs.misses > 0 && rs.evictions > 0, "{rs:?}");
            let bytes: usize = r.lru_order().iter().map(|&k| expect[k as usize].len()).sum();
            assert_eq!(rs.bytes, bytes);
            for k in 0..n_keys {
                if let Some(e) = r.get(k) {
                    assert_eq!(&*e, &expect[k as usize][..]);
                }
            }
            sum.add(rs);
        }
        assert_eq!(st.cold, sum, "{policy:?}");
    }
}

#[test]
fn cache_is_shared_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<SegmentedCache>();
    send_sync::<FixedRegion>();
}
