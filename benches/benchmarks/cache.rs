//! The segmented cache: cost per operation of a cold-region `get` that hits, one that misses, and an `insert`
//! that evicts the least recently used entry (copying a 972-byte SmolLM2 bundle), from one thread on one
//! partition and from two threads on two partitions (time per pair of operations, one per thread); and a
//! fixed-region read.

use std::hint::black_box;
use std::sync::Barrier;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use pinion_cache::{
    CacheConfig, FixedRegionBuilder, Insert, LruRegion, Policy, RegionConfig, SegmentedCache,
};

/// Bytes of one SmolLM2 neuron bundle (Q8_0 up row and down column).
const BUNDLE: usize = 972;

/// A cache of two partitions whose cold regions hold `n` bundles of keys `0..2n`, filled with keys `0..n`, so
/// that hits find every key and inserts of keys `n..2n` evict.
fn filled(n: usize, policy: Policy) -> SegmentedCache {
    let cold = RegionConfig { entry_len: BUNDLE, capacity: n, n_keys: 2 * n };
    let cache = SegmentedCache::new(
        FixedRegionBuilder::new(0).build(),
        CacheConfig { policy, partitions: vec![cold; 2] },
    )
    .expect("bench shapes are representable");
    let bundle = [0x5au8; BUNDLE];
    for p in 0..2 {
        let cold = cache.cold(p).expect("partition exists");
        for k in 0..n as u32 {
            assert!(cold.insert(k, &bundle).expect("key and length in range").is_stored());
        }
    }
    cache
}

/// One operation of a benchmark on a region, with the caller's running index.
type Step = fn(&LruRegion, usize, &mut usize);

/// A hit: a stride walk over the present keys defeats the CPU cache the way a real neuron set would.
fn get_hit(r: &LruRegion, n: usize, i: &mut usize) {
    *i = (*i + 7919) % n;
    black_box(r.get(black_box(*i as u32)).map(|e| e.len()));
}

/// A miss: keys `n..2n` are absent.
fn get_miss(r: &LruRegion, n: usize, i: &mut usize) {
    *i = (*i + 7919) % n;
    black_box(r.get(black_box((n + *i) as u32)).map(|e| e.len()));
}

/// An insert that evicts: keys cycle over twice as many as fit, so each is absent when inserted and replaces the
/// least recently used one.
fn insert_evict(r: &LruRegion, n: usize, k: &mut usize) {
    static BUNDLE_BYTES: [u8; BUNDLE] = [0xa5; BUNDLE];
    *k = (*k + 1) % (2 * n);
    let res = r.insert(*k as u32, black_box(&BUNDLE_BYTES)).expect("key and length in range");
    assert!(matches!(res, Insert::Replaced { .. }), "every insert evicts: {res:?}");
}

/// `iters` steps on each of partitions 0 and 1 at once, from two threads, continuing from their indices `idx`;
/// the wall time of the pair.
fn two_threads(cache: &SegmentedCache, n: usize, step: Step, idx: &mut [usize; 2], iters: u64) -> Duration {
    let barrier = Barrier::new(3);
    std::thread::scope(|s| {
        for (p, i) in idx.iter_mut().enumerate() {
            let (barrier, r) = (&barrier, cache.cold(p).expect("partition exists"));
            s.spawn(move || {
                barrier.wait();
                for _ in 0..iters {
                    step(r, n, i);
                }
                barrier.wait();
            });
        }
        barrier.wait();
        let t = Instant::now();
        barrier.wait();
        t.elapsed()
    })
}

fn bench_cache(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache");
    for n in [1024usize, 16384] {
        let benches: [(&str, Step, Policy, usize); 4] = [
            ("get_hit", get_hit, Policy::Lru, 0),
            ("get_miss", get_miss, Policy::Lru, 0),
            ("insert_evict", insert_evict, Policy::Lru, n - 1),
            // The window never ends here (no token is advanced): the same as LRU, through the window's code.
            ("insert_evict_window", insert_evict, Policy::SlidingWindow { tokens: 4 }, n - 1),
        ];
        for (name, step, policy, start) in benches {
            let cache = filled(n, policy);
            let cold = cache.cold(0).expect("partition exists");
            g.throughput(Throughput::Elements(1));
            let mut i = start;
            g.bench_function(BenchmarkId::new(name, n), |b| b.iter(|| step(cold, n, &mut i)));
            if name != "insert_evict_window" {
                g.throughput(Throughput::Elements(2));
                let cache = filled(n, policy);
                let mut idx = [start; 2];
                g.bench_function(BenchmarkId::new(format!("{name}_2threads"), n), |b| {
                    b.iter_custom(|iters| two_threads(&cache, n, step, &mut idx, iters))
                });
            }
        }
    }

    // A fixed-region read: slicing, no lock.
    let n = 16384;
    let mut fixed = FixedRegionBuilder::new(n * pinion_cache::fixed_entry_bytes(BUNDLE));
    let ids: Vec<_> = (0..n).map(|_| fixed.push(&[1u8; BUNDLE]).expect("fits")).collect();
    let fixed = fixed.build();
    let mut i = 0;
    g.throughput(Throughput::Elements(1));
    g.bench_function(BenchmarkId::new("fixed_get", n), |b| {
        b.iter(|| {
            i = (i + 7919) % n;
            black_box(fixed.get(black_box(ids[i])).len())
        })
    });
    g.finish();
}

criterion_group!(benches, bench_cache);
