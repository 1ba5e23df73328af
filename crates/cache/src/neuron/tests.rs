//! Tests of [`NeuronCache`]: unit tests, a property test against a plain reference model, and a multi-threaded
//! test of guards and bytes.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Barrier;

use proptest::prelude::*;

use super::*;

/// The bytes stored under `key` in these tests: the key's little-endian bytes, then the key's low byte.
fn pattern(key: u32, len: usize) -> Vec<u8> {
    let mut v = vec![key as u8; len];
    let head = key.to_le_bytes();
    let n = head.len().min(len);
    v[..n].copy_from_slice(&head[..n]);
    v
}

fn stats(hits: u64, misses: u64, inserts: u64, evictions: u64, rejected: u64) -> NeuronCacheStats {
    NeuronCacheStats { hits, misses, inserts, evictions, rejected }
}

/// The panic message of `f`, which must panic.
fn panic_message(f: impl FnOnce()) -> String {
    let payload = catch_unwind(AssertUnwindSafe(f)).expect_err("should have panicked");
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(p) => p.downcast::<&str>().map(|s| s.to_string()).unwrap_or_default(),
    }
}

#[test]
fn get_after_insert_returns_the_bytes() {
    let c = NeuronCache::new(972, 4, 1536, Policy::Lru);
    assert_eq!((c.entry_len(), c.capacity(), c.budget_bytes()), (972, 4, 4 * 972));
    assert!(c.is_empty());
    assert!(c.insert(1234, &pattern(1234, 972)));
    assert!(c.insert(7, &pattern(7, 972)));
    let r = c.get(1234).unwrap();
    assert_eq!(r.key(), 1234);
    assert_eq!(&*r, &pattern(1234, 972)[..]);
    assert_eq!(&*c.get(7).unwrap(), &pattern(7, 972)[..]);
    assert!(c.contains(7) && !c.contains(8));
    assert_eq!(c.len(), 2);
}

#[test]
fn counts_hits_misses_inserts_evictions() {
    let c = NeuronCache::new(16, 2, 10, Policy::Lru);
    assert!(c.get(0).is_none()); // miss
    assert!(c.insert(0, &pattern(0, 16)));
    assert!(c.insert(1, &pattern(1, 16)));
    assert!(!c.insert(1, &pattern(1, 16))); // already present: rejected
    assert!(c.get(0).is_some() && c.get(1).is_some()); // 2 hits
    assert!(!c.contains(2)); // not counted
    assert!(c.insert(2, &pattern(2, 16))); // evicts one
    assert_eq!(c.stats(), stats(2, 1, 3, 1, 1));
    assert_eq!(c.stats().hit_rate(), 2.0 / 3.0);
    assert_eq!(c.len(), 2);
    c.reset_stats();
    assert_eq!(c.stats(), NeuronCacheStats::default());
    assert_eq!(c.stats().hit_rate(), 0.0);
    assert_eq!(c.len(), 2, "resetting counters keeps the entries");
}

#[test]
fn capacity_zero_never_stores() {
    let c = NeuronCache::new(8, 0, 4, Policy::Lru);
    assert_eq!(c.budget_bytes(), 0);
    assert!(!c.insert(1, &[0; 8]));
    assert!(!c.contains(1) && c.get(1).is_none() && c.is_empty());
    assert_eq!(c.advance_token(), 1);
    assert_eq!(c.stats(), stats(0, 1, 0, 0, 1));
}

/// The tidy check forbids `#[should_panic]`, so the panic is caught and its message checked.
#[test]
fn entry_len_mismatch_panics() {
    let c = NeuronCache::new(8, 2, 4, Policy::Lru);
    let msg = panic_message(|| {
        c.insert(1, &[0; 7]);
    });
    assert!(msg.contains("7 bytes for key 1") && msg.contains("entry_len = 8"), "{msg}");
    // Nothing was counted or stored, and the cache still works.
    assert_eq!(c.stats(), NeuronCacheStats::default());
    assert!(c.insert(1, &[1; 8]));
    assert_eq!(&*c.get(1).unwrap(), &[1; 8]);
}

#[test]
fn key_out_of_range_panics() {
    let c = NeuronCache::new(8, 2, 4, Policy::Lru);
    let msg = panic_message(|| {
        c.get(4);
    });
    assert!(msg.contains("key 4 out of range 0..4"), "{msg}");
    assert!(catch_unwind(AssertUnwindSafe(|| c.insert(9, &[0; 8]))).is_err());
    assert!(catch_unwind(AssertUnwindSafe(|| c.contains(u32::MAX))).is_err());
}

#[test]
fn clock_gives_used_entries_a_second_chance() {
    let c = NeuronCache::new(4, 2, 8, Policy::Lru);
    assert!(c.insert(0, &pattern(0, 4))); // a
    assert!(c.insert(1, &pattern(1, 4))); // b
    assert!(c.get(0).is_some());
    assert!(c.insert(2, &pattern(2, 4))); // c evicts b, not a
    assert!(c.contains(0) && !c.contains(1) && c.contains(2));
    assert_eq!(&*c.get(2).unwrap(), &pattern(2, 4)[..]);
    // a's bit was cleared by the sweep and c's is now set: d evicts a.
    assert!(c.insert(3, &pattern(3, 4)));
    assert!(!c.contains(0) && c.contains(2) && c.contains(3));
    assert_eq!(c.stats().evictions, 2);
}

#[test]
fn sliding_window_drops_unused_entries() {
    let c = NeuronCache::new(4, 4, 8, Policy::SlidingWindow { tokens: 2 });
    assert!(c.insert(0, &pattern(0, 4))); // never used again
    assert!(c.insert(1, &pattern(1, 4))); // used every token
    assert_eq!(c.advance_token(), 1);
    assert!(c.contains(0), "used one token ago: inside the window");
    assert!(c.get(1).is_some());
    assert_eq!(c.advance_token(), 2);
    assert!(!c.contains(0), "unused for 2 tokens: dropped");
    assert!(c.get(1).is_some());
    for t in 3..10 {
        assert_eq!(c.advance_token(), t);
        assert!(c.get(1).is_some());
    }
    assert!(c.contains(1));
    assert_eq!((c.len(), c.stats().evictions), (1, 1));
    // The freed slot is reused without evicting anything.
    for k in 2..5 {
        assert!(c.insert(k, &pattern(k, 4)));
    }
    assert_eq!((c.len(), c.stats().evictions), (4, 1));
}

#[test]
fn window_of_one_token_keeps_only_the_current_token() {
    let c = NeuronCache::new(4, 4, 8, Policy::SlidingWindow { tokens: 0 }); // raised to 1
    assert!(c.insert(0, &pattern(0, 4)));
    c.advance_token();
    assert!(c.is_empty());
}

#[test]
fn held_guard_is_never_evicted() {
    let c = NeuronCache::new(32, 3, 100, Policy::Lru);
    assert!(c.insert(0, &pattern(0, 32)));
    let a = c.get(0).unwrap();
    for k in 1..50 {
        assert!(c.insert(k, &pattern(k, 32)), "a free or unheld slot is always found");
        assert!(c.contains(0));
    }
    assert_eq!(&*a, &pattern(0, 32)[..]);
    assert_eq!(c.len(), 3);
    // Hold every entry: inserts are refused, without waiting.
    let present: Vec<u32> = (0..50).filter(|&k| c.contains(k)).collect();
    let guards: Vec<_> = present.iter().filter(|&&k| k != 0).map(|&k| c.get(k).unwrap()).collect();
    let rejected = c.stats().rejected;
    assert!(!c.insert(60, &pattern(60, 32)));
    assert_eq!(c.stats().rejected, rejected + 1);
    assert!(present.iter().all(|&k| c.contains(k)));
    // A second guard on a held entry is fine.
    assert_eq!(&*c.get(0).unwrap(), &pattern(0, 32)[..]);
    drop(guards);
    assert!(c.insert(60, &pattern(60, 32)));
    assert!(c.contains(0), "still held");
    drop(a);
}

#[test]
fn held_guard_survives_the_window() {
    let c = NeuronCache::new(4, 2, 8, Policy::SlidingWindow { tokens: 1 });
    assert!(c.insert(0, &pattern(0, 4)));
    assert!(c.insert(1, &pattern(1, 4)));
    let g = c.get(0).unwrap();
    c.advance_token();
    c.advance_token();
    assert!(c.contains(0) && !c.contains(1));
    assert_eq!(&*g, &pattern(0, 4)[..]);
    drop(g);
    c.advance_token();
    assert!(c.is_empty());
}

#[test]
fn memory_grows_as_entries_arrive() {
    let c = NeuronCache::new(972, 100, 1000, Policy::Lru);
    assert_eq!(c.allocated_slots(), 0);
    for k in 0..10 {
        c.insert(k, &pattern(k, 972));
    }
    assert_eq!(c.allocated_slots(), 10);
    for k in 10..500 {
        c.insert(k, &pattern(k, 972));
    }
    assert_eq!(c.allocated_slots(), 100, "never more than capacity");
}

/// A reader that finds its entry while the entry's bytes are still being copied in waits for the writer, then
/// reads the new bytes (the slow path of `get`).
#[test]
fn get_waits_for_a_write_in_progress() {
    let c = NeuronCache::new(64, 2, 8, Policy::Lru);
    assert!(c.insert(3, &pattern(3, 64)));
    let s = c.lock().slot_of_key[3] as usize;
    // Stand in for an insert of key 3 between its bookkeeping and its copy: the slot is write-locked.
    let mut writing = c.slots[s].write().unwrap();
    std::thread::scope(|scope| {
        let reader = scope.spawn(|| c.get(3).map(|r| r.to_vec()));
        std::thread::sleep(std::time::Duration::from_millis(20));
        writing.bytes.copy_from_slice(&[0xAB; 64]);
        drop(writing);
        assert_eq!(reader.join().unwrap(), Some(vec![0xAB; 64]));
    });
    assert_eq!(c.stats(), stats(1, 0, 1, 0, 0));
}

#[test]
fn cache_and_guards_cross_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn sync<T: Sync>() {}
    send_sync::<NeuronCache>();
    // A guard can be shared with scoped threads by reference; it is released by the thread that took it.
    sync::<NeuronRef<'static>>();
}

/// A plain CLOCK cache: a vector of slots, a hand, and a stack of free slots (slot 0 first, then the most recently
/// freed), with guards as counts per slot.
struct Model {
    slots: Vec<Option<ModelSlot>>,
    held: Vec<u32>,
    free: Vec<usize>,
    hand: usize,
    token: u64,
    window: Option<u64>,
    stats: NeuronCacheStats,
}

struct ModelSlot {
    key: u32,
    referenced: bool,
    last_use: u64,
}

impl Model {
    fn new(capacity: usize, policy: Policy) -> Model {
        Model {
            slots: (0..capacity).map(|_| None).collect(),
            held: vec![0; capacity],
            free: (0..capacity).rev().collect(),
            hand: 0,
            token: 0,
            window: match policy {
                Policy::Lru => None,
                Policy::SlidingWindow { tokens } => Some(u64::from(tokens.max(1))),
            },
            stats: NeuronCacheStats::default(),
        }
    }

    fn find(&self, key: u32) -> Option<usize> {
        self.slots.iter().position(|s| s.as_ref().is_some_and(|s| s.key == key))
    }

    fn get(&mut self, key: u32) -> Option<usize> {
        match self.find(key) {
            Some(i) => {
                self.stats.hits += 1;
                let s = self.slots[i].as_mut().unwrap();
                s.referenced = true;
                s.last_use = self.token;
                Some(i)
            }
            None => {
                self.stats.misses += 1;
                None
            }
        }
    }

    fn insert(&mut self, key: u32) -> bool {
        if self.find(key).is_some() || self.slots.is_empty() {
            self.stats.rejected += 1;
            return false;
        }
        let victim = match self.free.pop() {
            Some(i) => Some(i),
            None => {
                let n = self.slots.len();
                let mut found = None;
                for _ in 0..2 * n {
                    let i = self.hand;
                    self.hand = (self.hand + 1) % n;
                    let Some(s) = self.slots[i].as_mut() else { continue };
                    if s.referenced {
                        s.referenced = false;
                    } else if self.held[i] == 0 {
                        found = Some(i);
                        break;
                    }
                }
                found
            }
        };
        let Some(i) = victim else {
            self.stats.rejected += 1;
            return false;
        };
        if self.slots[i].is_some() {
            self.stats.evictions += 1;
        }
        self.slots[i] = Some(ModelSlot { key, referenced: false, last_use: self.token });
        self.stats.inserts += 1;
        true
    }

    fn advance(&mut self) -> u64 {
        self.token += 1;
        if let Some(w) = self.window {
            for i in 0..self.slots.len() {
                let old = self.slots[i].as_ref().is_some_and(|s| s.last_use + w <= self.token);
                if old && self.held[i] == 0 {
                    self.slots[i] = None;
                    self.free.push(i);
                    self.stats.evictions += 1;
                }
            }
        }
        self.token
    }
}

#[derive(Clone, Copy, Debug)]
enum Op {
    Get(u32),
    Insert(u32),
    /// A get whose guard is kept until a `Release`.
    Hold(u32),
    /// Drops the held guard at this index (modulo their number).
    Release(usize),
    Advance,
}

fn op_strategy(n_keys: u32) -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..n_keys).prop_map(Op::Get),
        4 => (0..n_keys).prop_map(Op::Insert),
        1 => (0..n_keys).prop_map(Op::Hold),
        1 => any::<usize>().prop_map(Op::Release),
        1 => Just(Op::Advance),
    ]
}

fn policy_strategy() -> impl Strategy<Value = Policy> {
    prop_oneof![Just(Policy::Lru), (0..4u32).prop_map(|tokens| Policy::SlidingWindow { tokens })]
}

const N_KEYS: u32 = 10;
const LEN: usize = 6;

/// Runs `ops` on a cache and the model and checks after each one that they agree on results, present keys and
/// counters, and that every returned entry holds its own bytes.
fn check_against_model(capacity: usize, policy: Policy, ops: &[Op]) {
    let c = NeuronCache::new(LEN, capacity, N_KEYS as usize, policy);
    let mut m = Model::new(capacity, policy);
    let mut guards: Vec<(NeuronRef<'_>, usize)> = Vec::new();
    for (step, &op) in ops.iter().enumerate() {
        match op {
            Op::Get(k) | Op::Hold(k) => {
                let got = c.get(k);
                let want = m.get(k);
                assert_eq!(got.is_some(), want.is_some(), "step {step}: {op:?}");
                if let (Some(r), Some(i)) = (got, want) {
                    assert_eq!((r.key(), &*r), (k, &pattern(k, LEN)[..]), "step {step}");
                    if matches!(op, Op::Hold(_)) {
                        m.held[i] += 1;
                        guards.push((r, i));
                    }
                }
            }
            Op::Insert(k) => assert_eq!(c.insert(k, &pattern(k, LEN)), m.insert(k), "step {step}: {op:?}"),
            Op::Release(j) => {
                if !guards.is_empty() {
                    let (_, i) = guards.swap_remove(j % guards.len());
                    m.held[i] -= 1;
                }
            }
            Op::Advance => assert_eq!(c.advance_token(), m.advance()),
        }
        for k in 0..N_KEYS {
            assert_eq!(c.contains(k), m.find(k).is_some(), "step {step}: {op:?}, key {k}");
        }
        assert_eq!(c.len(), m.slots.iter().flatten().count(), "step {step}");
        assert_eq!(c.stats(), m.stats, "step {step}: {op:?}");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Same results, present keys and counters as the reference model, for both policies, with guards held
    /// across operations.
    #[test]
    fn matches_reference_clock(
        capacity in 0..6usize,
        policy in policy_strategy(),
        ops in prop::collection::vec(op_strategy(N_KEYS), 1..200),
    ) {
        check_against_model(capacity, policy, &ops);
    }
}

/// Four threads get, hold and insert on a small cache (a million operations per policy, one thread also advancing
/// tokens), so slots are replaced while others read them: every entry read must hold its own key's bytes. (With
/// two CPUs, about a hundred thousand operations rarely catch a reader between the bookkeeping and the slot lock;
/// a million do, and take about 0.1 s.)
#[test]
fn concurrent_reads_never_see_torn_or_foreign_bytes() {
    for policy in [Policy::Lru, Policy::SlidingWindow { tokens: 2 }] {
        let n_keys = 12u32;
        let c = NeuronCache::new(972, 4, n_keys as usize, policy);
        let patterns: Vec<Vec<u8>> = (0..n_keys).map(|k| pattern(k, 972)).collect();
        let n_threads = 4;
        let barrier = Barrier::new(n_threads);
        std::thread::scope(|s| {
            for t in 0..n_threads {
                let (c, patterns, barrier) = (&c, &patterns, &barrier);
                s.spawn(move || {
                    let mut x = 0x9e37_79b9_7f4a_7c15u64 ^ (t as u64 + 1);
                    let mut held: Option<NeuronRef<'_>> = None;
                    barrier.wait();
                    for i in 0..250_000u32 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                        let key = (x % u64::from(n_keys)) as u32;
                        match (x >> 32) % 16 {
                            0..=7 => {
                                if let Some(r) = c.get(key) {
                                    assert_eq!(r.key(), key);
                                    assert!(*r == patterns[key as usize][..], "thread {t} op {i} key {key}");
                                }
                            }
                            8..=13 => {
                                c.insert(key, &patterns[key as usize]);
                            }
                            14 => {
                                // Keep a guard across the next operations, inserts of this thread included.
                                held = c.get(key);
                            }
                            _ => {
                                if t == 0 && (x >> 40) % 8 == 0 {
                                    c.advance_token();
                                }
                                held = None;
                            }
                        }
                        if let Some(r) = &held {
                            assert!(**r == patterns[r.key() as usize][..], "held entry changed");
                        }
                    }
                });
            }
        });
        let st = c.stats();
        assert_eq!(st.inserts - st.evictions, c.len() as u64, "{policy:?}");
        assert!(c.len() <= c.capacity());
        assert!(st.hits > 0 && st.misses > 0 && st.evictions > 0, "{st:?}");
        for k in 0..n_keys {
            if let Some(r) = c.get(k) {
                assert_eq!(&*r, &patterns[k as usize][..]);
            }
        }
    }
}
