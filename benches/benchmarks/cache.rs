//! The segmented neuron cache: cost per neuron of a lookup that hits, of a miss that evicts and publishes
//! (with and without copying an 8 KiB bundle), and of `get`. The target is well under a microsecond per lookup.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group};
use pinion_cache::{CacheConfig, Key, Lookup, Policy, SegmentedCache};

/// Bytes of one INT4 7B neuron bundle as packed on flash (gate row, up row, down column, padded).
const BUNDLE: usize = 8192;

fn cache(n_neurons: usize, policy: Policy) -> SegmentedCache {
    SegmentedCache::new(CacheConfig {
        fixed_bytes: 1 << 20,
        hot_bytes: 1 << 20,
        cold_bytes: n_neurons * BUNDLE,
        policy,
    })
}

fn neuron(i: usize) -> Key {
    Key::Neuron { layer: (i / 14336) as u32, neuron: (i % 14336) as u32 }
}

/// Fills the cold region with neurons `0..n`, so that later misses measure the steady state (evict and reuse)
/// rather than first-time buffer allocation.
fn filled(n: usize, policy: Policy) -> SegmentedCache {
    let c = cache(n, policy);
    for i in 0..n {
        if let Lookup::Reserved(s) = c.lookup_or_reserve(neuron(i), BUNDLE).expect("fits") {
            c.complete_in_place(s);
        }
    }
    c
}

fn bench_cache(c: &mut Criterion) {
    let mut g = c.benchmark_group("cache");
    g.throughput(Throughput::Elements(1));
    for n in [1024usize, 65536] {
        // Hits: every key resident; a stride walk defeats the CPU cache the way a real neuron set would.
        let hit_cache = filled(n, Policy::Segmented);
        let mut i = 0;
        g.bench_function(BenchmarkId::new("lookup_hit", n), |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                match hit_cache.lookup_or_reserve(black_box(neuron(i)), BUNDLE) {
                    Ok(Lookup::Hit(h)) => black_box(h.len()),
                    _ => unreachable!("all resident"),
                }
            })
        });
        g.bench_function(BenchmarkId::new("get_hit", n), |b| {
            b.iter(|| {
                i = (i + 7919) % n;
                black_box(hit_cache.get(black_box(neuron(i))).map(|h| h.len()))
            })
        });

        // Misses: keys cycle over twice as many neurons as fit, so every lookup evicts the least recently used
        // neuron and reuses its buffer.
        for (name, policy) in
            [("miss_evict", Policy::Segmented), ("miss_evict_window", Policy::SlidingWindow { tokens: 4 })]
        {
            let miss_cache = filled(n, policy);
            let mut k = n - 1;
            g.bench_function(BenchmarkId::new(name, n), |b| {
                b.iter(|| {
                    k = (k + 1) % (2 * n);
                    match miss_cache.lookup_or_reserve(neuron(k), BUNDLE) {
                        Ok(Lookup::Reserved(s)) => black_box(miss_cache.complete_in_place(s).len()),
                        Ok(Lookup::Hit(h)) => black_box(h.len()),
                        _ => unreachable!("nothing pinned or loading"),
                    }
                })
            });
        }

        let copy_cache = filled(n, Policy::Segmented);
        let bundle = vec![0x5au8; BUNDLE];
        let mut k = n - 1;
        g.bench_function(BenchmarkId::new("miss_evict_copy8k", n), |b| {
            b.iter(|| {
                k = (k + 1) % (2 * n);
                match copy_cache.lookup_or_reserve(neuron(k), BUNDLE) {
                    Ok(Lookup::Reserved(s)) => black_box(copy_cache.complete(s, &bundle).map(|h| h.len())),
                    Ok(Lookup::Hit(h)) => Ok(black_box(h.len())),
                    _ => unreachable!("nothing pinned or loading"),
                }
            })
        });
    }
    g.finish();
}

criterion_group!(benches, bench_cache);
