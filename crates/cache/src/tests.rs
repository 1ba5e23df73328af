//! Unit tests, property tests against the reference model of `fuzz.rs`, and multi-threaded tests.

use std::sync::Barrier;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proptest::prelude::*;

use crate::fuzz::{Op, key_from, run};
use crate::*;

const B: usize = 4096;

fn cache(fixed: usize, hot: usize, cold: usize, policy: Policy) -> SegmentedCache {
    SegmentedCache::new(CacheConfig {
        fixed_bytes: fixed * B,
        hot_bytes: hot * B,
        cold_bytes: cold * B,
        policy,
    })
}

fn neuron(n: u32) -> Key {
    Key::Neuron { layer: 0, neuron: n }
}

fn cluster(c: u32) -> Key {
    Key::Cluster { layer: 1, cluster: c }
}

/// Loads `key` with `len` bytes of value `fill` if absent; returns whether it was a hit.
fn load(c: &SegmentedCache, key: Key, len: usize, fill: u8) -> bool {
    match c.lookup_or_reserve(key, len).unwrap() {
        Lookup::Hit(_) => true,
        Lookup::Reserved(s) => {
            c.complete(s, &vec![fill; len]).unwrap();
            false
        }
        Lookup::InFlight(_) => panic!("nothing else is loading"),
    }
}

#[test]
fn cold_region_is_neuron_lru() {
    let c = cache(1, 1, 3, Policy::Segmented);
    for n in 0..3 {
        assert!(!load(&c, neuron(n), 100, n as u8));
    }
    assert!(load(&c, neuron(0), 100, 0)); // 0 becomes most recent: order 0, 2, 1
    assert!(!load(&c, neuron(3), 100, 3)); // evicts 1
    assert_eq!(c.lru_order(Region::Cold), [neuron(3), neuron(0), neuron(2)]);
    assert_eq!(c.state(neuron(1)), EntryState::Absent);
    let s = c.stats().cold;
    assert_eq!((s.hits, s.misses, s.evictions, s.entries), (1, 4, 1, 3));
    assert_eq!((s.bytes_resident, s.bytes_allocated, s.allocations), (3 * B, 3 * B, 3));
    assert_eq!(c.get(neuron(2)).unwrap().bytes(), &[2u8; 100][..]);
    // Other regions are untouched.
    assert_eq!(c.stats().hot, RegionStats { budget: B, ..RegionStats::default() });
}

#[test]
fn hot_region_evicts_whole_clusters() {
    let c = cache(1, 8, 1, Policy::Segmented);
    load(&c, cluster(0), 3 * B, 1);
    load(&c, cluster(1), 3 * B, 2);
    // Two blocks free; a 4-block cluster evicts the least recently used cluster entirely.
    load(&c, cluster(2), 4 * B, 3);
    assert_eq!(c.lru_order(Region::Hot), [cluster(2), cluster(1)]);
    let s = c.stats().hot;
    assert_eq!((s.bytes_resident, s.evictions), (7 * B, 1));
    assert!(s.bytes_allocated <= 8 * B);
}

#[test]
fn fixed_region_never_evicts() {
    let c = cache(2, 1, 1, Policy::Segmented);
    load(&c, Key::Fixed(0), B, 1);
    load(&c, Key::Fixed(1), 10, 2);
    let err = c.lookup_or_reserve(Key::Fixed(2), 1).unwrap_err();
    assert!(matches!(err, CacheError::RegionFull { region: Region::Fixed, evictable: 0, .. }), "{err}");
    assert_eq!(c.stats().fixed.entries, 2);
    let err = c.lookup_or_reserve(neuron(0), 2 * B).unwrap_err();
    assert!(matches!(err, CacheError::TooLarge { region: Region::Cold, bytes, .. } if bytes == 2 * B));
    let err = c.lookup_or_reserve(Key::Fixed(1), 11).unwrap_err();
    assert_eq!(err, CacheError::LengthMismatch { key: Key::Fixed(1), expected: 10, got: 11 });
}

#[test]
fn handles_pin_entries() {
    let c = cache(1, 1, 2, Policy::Segmented);
    load(&c, neuron(0), 10, 0);
    load(&c, neuron(1), 10, 1);
    let pin = c.get(neuron(0)).unwrap();
    c.get(neuron(1)); // 0 is now least recent, but pinned
    load(&c, neuron(2), 10, 2);
    assert_eq!(c.lru_order(Region::Cold), [neuron(2), neuron(0)], "1 was evicted instead of pinned 0");
    let pin2 = c.get(neuron(2)).unwrap();
    let err = c.lookup_or_reserve(neuron(3), 10).unwrap_err();
    assert!(matches!(err, CacheError::RegionFull { evictable: 0, .. }), "{err}");
    drop((pin, pin2));
    assert!(!load(&c, neuron(3), 10, 3));
    assert_eq!(c.lru_order(Region::Cold), [neuron(3), neuron(2)]);
}

#[test]
fn steady_state_reuses_buffers() {
    let c = cache(1, 1, 4, Policy::Segmented);
    for n in 0..1000 {
        load(&c, neuron(n % 37), 8000 - (n as usize % 3), n as u8);
    }
    let s = c.stats().cold;
    assert_eq!(s.allocations, 2, "two 8 KiB buffers fill the region, and are then reused");
    assert!(s.evictions > 900);
    // Mixed sizes still stay within budget: idle buffers of other sizes are freed first.
    for n in 0..100 {
        load(&c, neuron(1000 + n), 1 + (n as usize * 1237) % (4 * B - 1), 0);
        let s = c.stats().cold;
        assert!(s.bytes_allocated <= s.budget, "{s:?}");
    }
}

#[test]
fn slot_drop_aborts_and_wakes_waiters() {
    let c = cache(1, 1, 2, Policy::Segmented);
    let Lookup::Reserved(slot) = c.lookup_or_reserve(neuron(0), 10).unwrap() else { panic!() };
    let Lookup::InFlight(w) = c.lookup_or_reserve(neuron(0), 10).unwrap() else { panic!() };
    assert!(w.try_get().is_none());
    assert_eq!(c.state(neuron(0)), EntryState::Loading);
    drop(slot);
    assert_eq!(w.try_get().unwrap().unwrap_err(), CacheError::Gone { key: neuron(0) });
    assert_eq!(c.state(neuron(0)), EntryState::Absent);
    let s = c.stats().cold;
    assert_eq!((s.aborts, s.in_flight_hits, s.bytes_loading, s.bytes_allocated), (1, 1, 0, B));
    // The aborted load's buffer is reused by the next load.
    assert!(!load(&c, neuron(0), 10, 5));
    assert_eq!(c.stats().cold.allocations, 1);
}

#[test]
fn sliding_window_keeps_last_k_tokens() {
    let c = cache(1, 4, 8, Policy::SlidingWindow { tokens: 2 });
    load(&c, neuron(0), 10, 0);
    load(&c, cluster(0), 10, 0);
    c.advance_token(); // token 1
    load(&c, neuron(1), 10, 1);
    c.advance_token(); // token 2: neuron 0 and cluster 0 (token 0) fall out of the window
    assert_eq!(c.lru_order(Region::Cold), [neuron(1)]);
    assert_eq!(c.lru_order(Region::Hot), []);
    c.get(neuron(1)); // used at token 2
    load(&c, neuron(2), 10, 2);
    let pin = c.get(neuron(2)).unwrap();
    c.advance_token();
    c.advance_token(); // token 4: neuron 1 dropped, neuron 2 pinned so kept
    assert_eq!(c.lru_order(Region::Cold), [neuron(2)]);
    drop(pin);
    c.advance_token();
    assert_eq!(c.lru_order(Region::Cold), []);
    assert_eq!(c.stats().cold.evictions, 3);
    assert_eq!(c.stats().token, 5);
    // The segmented policy ignores tokens.
    let c = cache(1, 1, 2, Policy::Segmented);
    load(&c, neuron(0), 10, 0);
    for _ in 0..10 {
        c.advance_token();
    }
    assert_eq!(c.state(neuron(0)), EntryState::Present);
}

#[test]
fn slot_buf_mut_fills_in_place() {
    let c = cache(1, 1, 2, Policy::Segmented);
    let Lookup::Reserved(mut slot) = c.lookup_or_reserve(neuron(9), 5000).unwrap() else { panic!() };
    assert_eq!((slot.key(), slot.len(), slot.buf_mut().len()), (neuron(9), 5000, 5000));
    assert_eq!(slot.buf_mut().as_ptr() as usize % 4096, 0, "aligned for O_DIRECT");
    slot.buf_mut().fill(0xab);
    let h = c.complete_in_place(slot);
    assert!(h.iter().all(|&b| b == 0xab) && h.len() == 5000);
    let err = match c.lookup_or_reserve(neuron(8), 1).unwrap_err() {
        e @ CacheError::RegionFull { .. } => e,
        e => panic!("{e}"),
    };
    assert!(err.to_string().contains("Cold"), "{err}");
}

#[test]
fn one_loader_many_waiters_across_threads() {
    let c = cache(1, 1, 64, Policy::Segmented);
    let loads = AtomicUsize::new(0);
    let n_threads = 4;
    let barrier = Barrier::new(n_threads);
    std::thread::scope(|s| {
        for t in 0..n_threads {
            let (c, loads, barrier) = (&c, &loads, &barrier);
            s.spawn(move || {
                barrier.wait();
                for round in 0..200u32 {
                    let key = neuron(round % 50);
                    let h = match c.lookup_or_reserve(key, 3000).unwrap() {
                        Lookup::Hit(h) => h,
                        Lookup::Reserved(slot) => {
                            loads.fetch_add(1, Ordering::Relaxed);
                            std::thread::yield_now();
                            c.complete(slot, &[(round % 50) as u8; 3000]).unwrap()
                        }
                        Lookup::InFlight(w) => w.wait().unwrap(),
                    };
                    assert!(h.iter().all(|&b| b == (round % 50) as u8), "thread {t} round {round}");
                }
            });
        }
    });
    // 50 keys fit (64 blocks), so each was loaded exactly once.
    assert_eq!(loads.load(Ordering::Relaxed), 50);
    let s = c.stats().cold;
    assert_eq!(s.misses, 50);
    assert_eq!(s.hits + s.in_flight_hits + s.misses, 4 * 200);
}

#[test]
fn concurrent_churn_keeps_budget_and_bytes() {
    let c = cache(1, 1, 8, Policy::Segmented);
    std::thread::scope(|s| {
        for t in 0..4u32 {
            let c = &c;
            s.spawn(move || {
                let mut x = t + 1;
                for _ in 0..2000 {
                    x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
                    let n = (x >> 16) % 40;
                    let res = c.lookup_or_reserve(neuron(n), 100 + n as usize);
                    let h = match res {
                        Ok(Lookup::Hit(h)) => h,
                        Ok(Lookup::Reserved(slot)) => {
                            c.complete(slot, &vec![n as u8; 100 + n as usize]).unwrap()
                        }
                        Ok(Lookup::InFlight(w)) => match w.wait() {
                            Ok(h) => h,
                            Err(CacheError::Gone { .. }) => continue,
                            Err(e) => panic!("{e}"),
                        },
                        // Everything pinned by the other threads at this instant.
                        Err(CacheError::RegionFull { .. }) => continue,
                        Err(e) => panic!("{e}"),
                    };
                    assert_eq!(h.len(), 100 + n as usize);
                    assert!(h.iter().all(|&b| b == n as u8));
                    let st = c.stats().cold;
                    assert!(st.bytes_allocated <= st.budget && st.bytes_resident <= st.budget, "{st:?}");
                }
            });
        }
    });
    assert_eq!(c.stats().cold.bytes_loading, 0);
}

#[test]
fn fuzz_entry_point_runs() {
    // A hand-picked sequence touching every operation, then a pseudo-random one per policy byte.
    fuzz::check_ops(&[0, 0, 12, 0, 13, 3, 0, 3, 1, 6, 12, 5, 13, 9, 0, 8, 0, 7, 0, 4, 0]);
    let mut data = vec![0u8; 4001];
    let mut x = 1u32;
    for p in 0..6u8 {
        data[0] = p;
        for b in &mut data[1..] {
            x = x.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            *b = (x >> 24) as u8;
        }
        fuzz::check_ops(&data);
    }
}

fn op_strategy() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (any::<u8>(), prop::bool::weighted(0.05)).prop_map(|(k, odd_len)| Op::Reserve { key: key_from(k), odd_len }),
        3 => any::<usize>().prop_map(|slot| Op::Complete { slot }),
        1 => any::<usize>().prop_map(|slot| Op::Abort { slot }),
        2 => any::<u8>().prop_map(|k| Op::Get { key: key_from(k) }),
        1 => any::<u8>().prop_map(|k| Op::Hold { key: key_from(k) }),
        1 => any::<usize>().prop_map(|handle| Op::Release { handle }),
        1 => any::<usize>().prop_map(|waiter| Op::Poll { waiter }),
        1 => Just(Op::Advance),
    ]
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    prop_oneof![Just(Policy::Segmented), (1u32..4).prop_map(|tokens| Policy::SlidingWindow { tokens })]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Budgets hold, present bytes equal what was loaded, and states, LRU order and counters match the
    /// reference model after every operation (the checks are in `fuzz::run`).
    #[test]
    fn matches_reference_model(policy in policy_strategy(), ops in prop::collection::vec(op_strategy(), 1..300)) {
        run(fuzz::config(policy), &ops);
    }

    #[test]
    fn arbitrary_bytes_never_break_invariants(data in prop::collection::vec(any::<u8>(), 0..600)) {
        fuzz::check_ops(&data);
    }
}

#[test]
fn handles_and_slots_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<SegmentedCache>();
    send_sync::<Handle>();
    send::<Slot>();
    send::<Waiter>();
}

/// The intended use: compute threads look neurons up, and misses go to one I/O thread that reads them with
/// `pinion-io` and completes the slots; concurrent lookups of a neuron being read wait instead of reading again.
#[test]
fn io_thread_fills_slots_from_a_file() {
    use pinion_io::{IoEngineBuilder, ReadRequest};

    const BUNDLE: usize = 8192;
    let n_neurons = 64u32;
    let path = std::env::temp_dir().join(format!("pinion-cache-io-{}.bin", std::process::id()));
    let data: Vec<u8> =
        (0..n_neurons as usize * BUNDLE).map(|i| (i / BUNDLE) as u8 ^ (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    let engine = IoEngineBuilder::new(&path).queue_depth(8).build().unwrap();
    let c = cache(1, 1, 16 * 2, Policy::Segmented); // room for 16 bundles of 8 KiB
    let (to_io, io_rx) = std::sync::mpsc::channel::<Slot>();
    let n_reads = AtomicUsize::new(0);
    std::thread::scope(|s| {
        let (c2, engine, n_reads) = (&c, &engine, &n_reads);
        s.spawn(move || {
            // The I/O thread: submit each slot's bundle, complete slots as reads finish.
            let mut waiting: std::collections::HashMap<u64, Slot> = std::collections::HashMap::new();
            let mut next_tag = 0;
            loop {
                // New slots first (blocking only when no read is outstanding), then completions.
                let slot = if waiting.is_empty() {
                    match io_rx.recv() {
                        Ok(slot) => Some(slot),
                        Err(_) => return,
                    }
                } else {
                    io_rx.try_recv().ok()
                };
                if let Some(slot) = slot {
                    let Key::Neuron { neuron, .. } = slot.key() else { unreachable!() };
                    let offset = u64::from(neuron) * BUNDLE as u64;
                    engine.submit(ReadRequest { offset, len: BUNDLE, tag: next_tag }).unwrap();
                    waiting.insert(next_tag, slot);
                    next_tag += 1;
                    n_reads.fetch_add(1, Ordering::Relaxed);
                    continue;
                }
                if let Ok(done) = engine.completions().recv_timeout(Duration::from_millis(1)) {
                    let slot = waiting.remove(&done.tag).unwrap();
                    c2.complete(slot, &done.result.unwrap()).unwrap();
                }
            }
        });
        let workers: Vec<_> = (0..3u32)
            .map(|t| {
                let (c, to_io, data) = (&c, to_io.clone(), &data);
                s.spawn(move || {
                    for step in 0..300u32 {
                        let neuron = (step * 7 + t * 13) % n_neurons;
                        let key = Key::Neuron { layer: 0, neuron };
                        let h = loop {
                            match c.lookup_or_reserve(key, BUNDLE) {
                                Ok(Lookup::Hit(h)) => break h,
                                Ok(Lookup::Reserved(slot)) => {
                                    to_io.send(slot).unwrap();
                                }
                                Ok(Lookup::InFlight(w)) => {
                                    if let Ok(h) = w.wait() {
                                        break h;
                                    }
                                }
                                Err(CacheError::RegionFull { .. }) => std::thread::yield_now(),
                                Err(e) => panic!("{e}"),
                            }
                        };
                        let off = neuron as usize * BUNDLE;
                        assert!(h.bytes() == &data[off..off + BUNDLE], "neuron {neuron}");
                    }
                })
            })
            .collect();
        drop(to_io);
        for w in workers {
            w.join().unwrap();
        }
    });
    let s = c.stats().cold;
    assert_eq!(
        s.misses as usize,
        n_reads.load(Ordering::Relaxed),
        "every miss read once, no duplicate reads"
    );
    assert!(s.bytes_allocated <= s.budget);
    std::fs::remove_file(&path).unwrap();
}
