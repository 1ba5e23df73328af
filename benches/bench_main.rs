//! Criterion entry point: one binary running every benchmark module (`cargo bench -p pinion-benches`).

mod benchmarks;

criterion::criterion_main!(
    benchmarks::kernels::benches,
    benchmarks::cache::benches,
    benchmarks::io::benches,
    benchmarks::sparse::benches,
    benchmarks::dense::benches,
    benchmarks::offload::benches
);
