//! The engine test suite, run once per backend (see `backend_suite!`), plus the fallback tests.
//!
//! Files are created under `$PINION_TEST_DIR`, or the system temporary directory. When that directory refuses
//! O_DIRECT (tmpfs), the suite still runs, with buffered reads, and says so on stderr.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use crate::engine::Fault;
use crate::*;

static FILE_ID: AtomicU64 = AtomicU64::new(0);

/// A file with known contents, removed on drop.
struct TestFile {
    path: PathBuf,
    data: Vec<u8>,
}

impl Drop for TestFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

fn test_dir() -> PathBuf {
    std::env::var_os("PINION_TEST_DIR").map(PathBuf::from).unwrap_or_else(std::env::temp_dir)
}

fn byte_at(i: u64) -> u8 {
    (i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 56) as u8
}

fn make_file_in(dir: &Path, len: usize) -> TestFile {
    std::fs::create_dir_all(dir).unwrap();
    let id = FILE_ID.fetch_add(1, Ordering::Relaxed);
    let path = dir.join(format!("pinion-io-test-{}-{id}.bin", std::process::id()));
    let data: Vec<u8> = (0..len as u64).map(byte_at).collect();
    std::fs::write(&path, &data).unwrap();
    TestFile { path, data }
}

fn make_file(len: usize) -> TestFile {
    make_file_in(&test_dir(), len)
}

#[derive(Clone, Copy, Debug)]
enum Mode {
    Uring,
    Pread,
}

fn engine(mode: Mode, f: &TestFile, tweak: impl FnOnce(IoEngineBuilder) -> IoEngineBuilder) -> IoEngine {
    let choice = match mode {
        Mode::Uring => BackendChoice::IoUring,
        Mode::Pread => BackendChoice::Pread,
    };
    let b = tweak(IoEngineBuilder::new(&f.path).backend(choice).queue_depth(8));
    match b.clone().build() {
        Ok(e) => {
            let want = match mode {
                Mode::Uring => Backend::IoUring,
                Mode::Pread => Backend::Pread,
            };
            assert_eq!(e.backend(), want);
            e
        }
        Err(OpenError::IoUringUnavailable { reason: FallbackReason::DirectIoRefused { .. }, .. }) => {
            eprintln!("O_DIRECT refused under {}; testing buffered reads", test_dir().display());
            b.direct(false).build().unwrap()
        }
        Err(e) => panic!("cannot open engine in {mode:?}: {e}"),
    }
}

/// Collects `n` completions by tag.
fn collect(e: &IoEngine, n: usize) -> HashMap<u64, Result<ReadBuf, ReadError>> {
    let mut out = HashMap::new();
    for _ in 0..n {
        let c = e.completions().recv_timeout(std::time::Duration::from_secs(30)).expect("completion arrives");
        assert!(out.insert(c.tag, c.result).is_none(), "tag {} completed twice", c.tag);
    }
    assert!(e.completions().try_recv().is_err(), "no extra completions");
    out
}

fn check_bytes(f: &TestFile, r: &ReadRequest, buf: &ReadBuf) {
    assert_eq!(buf.offset(), r.offset);
    assert_eq!(buf.len(), r.len, "request {r:?}");
    assert!(
        buf[..] == f.data[r.offset as usize..r.offset as usize + r.len],
        "bytes differ for request {r:?}"
    );
}

fn reads_exact_ranges(mode: Mode) {
    let f = make_file(300_000);
    let e = engine(mode, &f, |b| b.coalesce_limit(0));
    let mut rng = 12345u64;
    let mut reqs = vec![
        ReadRequest { offset: 0, len: 0, tag: 0 },
        ReadRequest { offset: 0, len: 300_000, tag: 1 },
        ReadRequest { offset: 299_999, len: 1, tag: 2 },
        ReadRequest { offset: 4096, len: 4096, tag: 3 },
        ReadRequest { offset: 4095, len: 2, tag: 4 },
    ];
    for tag in 5..200 {
        rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let offset = (rng >> 33) % 300_000;
        let len = ((rng >> 13) % 20_000).min(300_000 - offset) as usize;
        reqs.push(ReadRequest { offset, len, tag });
    }
    for r in &reqs {
        e.submit(*r).unwrap();
    }
    let got = collect(&e, reqs.len());
    for r in &reqs {
        check_bytes(&f, r, got[&r.tag].as_ref().unwrap());
    }
    let s = e.stats();
    assert_eq!(s.requests, reqs.len() as u64);
    assert_eq!(s.reads, reqs.len() as u64, "coalescing is off");
    assert_eq!(s.bytes_requested, reqs.iter().map(|r| r.len as u64).sum::<u64>());
    assert_eq!(s.latency.count(), reqs.len() as u64);
    assert_eq!((s.in_flight, s.errors), (0, 0));
    assert!(s.peak_in_flight >= 1 && s.peak_in_flight <= 8, "{s:?}");
    assert!(s.latency.p50() <= s.latency.p99());
}

fn coalesces_adjacent_requests(mode: Mode) {
    let f = make_file(1 << 20);
    let e = engine(mode, &f, |b| b.coalesce_limit(64 << 10));
    // 32 adjacent 4 KiB bundles (out of order), two overlapping unaligned ranges, and one far away.
    let mut reqs: Vec<ReadRequest> =
        (0..32u64).rev().map(|i| ReadRequest { offset: i * 4096, len: 4096, tag: i }).collect();
    reqs.push(ReadRequest { offset: 200_000, len: 5000, tag: 100 });
    reqs.push(ReadRequest { offset: 203_000, len: 100, tag: 101 });
    reqs.push(ReadRequest { offset: 900_001, len: 7, tag: 102 });
    e.submit_batch(&reqs).unwrap();
    let got = collect(&e, reqs.len());
    for r in &reqs {
        check_bytes(&f, r, got[&r.tag].as_ref().unwrap());
    }
    // 128 KiB of bundles in 64 KiB reads: 2, plus one for the overlapping pair, plus one.
    assert_eq!(e.stats().reads, 4);
}

fn rejects_bad_requests(mode: Mode) {
    let f = make_file(10_000);
    let e = engine(mode, &f, |b| b.pool_bytes(64 << 10));
    let oob = e.submit(ReadRequest { offset: 9_999, len: 2, tag: 0 }).unwrap_err();
    assert_eq!(oob, SubmitError::OutOfBounds { offset: 9_999, len: 2, file_len: 10_000 });
    assert!(matches!(
        e.submit(ReadRequest { offset: u64::MAX, len: 1, tag: 0 }),
        Err(SubmitError::OutOfBounds { .. })
    ));
    let big = make_file(200_000);
    let e = engine(mode, &big, |b| b.pool_bytes(64 << 10));
    assert!(matches!(
        e.submit(ReadRequest { offset: 1, len: 65536, tag: 0 }),
        Err(SubmitError::TooLarge { max: 65536, .. })
    ));
    // A failed batch queues nothing.
    let batch = [ReadRequest { offset: 0, len: 10, tag: 1 }, ReadRequest { offset: 300_000, len: 1, tag: 2 }];
    assert!(e.submit_batch(&batch).is_err());
    assert_eq!(e.stats().requests, 0);
    assert!(e.completions().recv_timeout(std::time::Duration::from_millis(50)).is_err());
}

fn retries_transient_errors_and_short_reads(mode: Mode) {
    let f = make_file(64 << 10);
    let e = engine(mode, &f, |b| b.coalesce_limit(0));
    e.faults().add(Fault::Errno { at: Some(8192), errno: libc::EINTR, times: 3 });
    e.faults().add(Fault::Errno { at: Some(16384), errno: libc::EAGAIN, times: 2 });
    e.faults().add(Fault::Short { at: Some(32768), max: 4096, times: 1 });
    let reqs = [
        ReadRequest { offset: 8192, len: 4096, tag: 0 },
        ReadRequest { offset: 16384 + 10, len: 100, tag: 1 },
        ReadRequest { offset: 32768, len: 12288, tag: 2 },
    ];
    e.submit_batch(&reqs).unwrap();
    let got = collect(&e, 3);
    for r in &reqs {
        check_bytes(&f, r, got[&r.tag].as_ref().unwrap());
    }
    assert_eq!(e.stats().retries, 3 + 2 + 1);
    assert_eq!(e.stats().errors, 0);
}

fn reports_eio_with_offset(mode: Mode) {
    let f = make_file(64 << 10);
    let e = engine(mode, &f, |b| b.coalesce_limit(64 << 10));
    e.faults().add(Fault::Errno { at: Some(40960), errno: libc::EIO, times: 1 });
    // Tags 0 and 1 share one coalesced read that fails; tag 2 is separate and fine.
    e.submit_batch(&[
        ReadRequest { offset: 40960 + 5, len: 10, tag: 0 },
        ReadRequest { offset: 45056, len: 4096, tag: 1 },
    ])
    .unwrap();
    e.submit(ReadRequest { offset: 0, len: 4096, tag: 2 }).unwrap();
    let got = collect(&e, 3);
    for tag in [0, 1] {
        let err = got[&tag].as_ref().unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::EIO));
        assert_eq!(err.failed_at, 40960);
        assert!(err.to_string().contains("40960"), "{err}");
    }
    assert_eq!(got[&0].as_ref().unwrap_err().offset, 40965);
    check_bytes(&f, &ReadRequest { offset: 0, len: 4096, tag: 2 }, got[&2].as_ref().unwrap());
    assert_eq!(e.stats().errors, 2);
    // Persistent EINTR gives up rather than spinning forever.
    e.faults().add(Fault::Errno { at: Some(0), errno: libc::EINTR, times: u32::MAX });
    e.submit(ReadRequest { offset: 0, len: 1, tag: 3 }).unwrap();
    let err = collect(&e, 1).remove(&3).unwrap().unwrap_err();
    assert!(matches!(err.kind, ReadErrorKind::RetriesExhausted { .. }), "{err}");
}

fn truncated_file_is_an_error_not_stale_bytes(mode: Mode) {
    let f = make_file(100_000);
    let e = engine(mode, &f, |b| b.coalesce_limit(0));
    std::fs::OpenOptions::new().write(true).open(&f.path).unwrap().set_len(50_000).unwrap();
    e.submit_batch(&[
        ReadRequest { offset: 60_000, len: 100, tag: 0 },
        ReadRequest { offset: 49_000, len: 2000, tag: 1 },
        ReadRequest { offset: 40_000, len: 1000, tag: 2 },
    ])
    .unwrap();
    let got = collect(&e, 3);
    assert!(matches!(got[&0].as_ref().unwrap_err().kind, ReadErrorKind::UnexpectedEof { got: 0 }));
    let err = got[&1].as_ref().unwrap_err();
    assert_eq!(err.kind, ReadErrorKind::UnexpectedEof { got: 1000 }, "{err}");
    check_bytes(&f, &ReadRequest { offset: 40_000, len: 1000, tag: 2 }, got[&2].as_ref().unwrap());
}

fn pool_budget_bounds_memory(mode: Mode) {
    let f = make_file(1 << 20);
    let e = engine(mode, &f, |b| b.pool_bytes(64 << 10).coalesce_limit(0));
    let reqs: Vec<ReadRequest> =
        (0..256u64).map(|i| ReadRequest { offset: (i * 16384) % (1 << 20), len: 16384, tag: i }).collect();
    e.submit_batch(&reqs).unwrap();
    for _ in 0..reqs.len() {
        let c = e.completions().recv_timeout(std::time::Duration::from_secs(30)).expect("completion arrives");
        let r = &reqs[c.tag as usize];
        check_bytes(&f, r, &c.result.unwrap());
        let p = e.pool().stats();
        assert!(p.allocated <= p.budget, "{p:?}");
    }
    let p = e.pool().stats();
    assert!(p.peak_allocated <= 64 << 10, "{p:?}");
    assert!(p.n_allocations <= 4, "buffers are reused: {p:?}");
}

fn concurrent_submitters(mode: Mode) {
    let f = make_file(512 << 10);
    let e = engine(mode, &f, |b| b);
    std::thread::scope(|s| {
        for t in 0..4u64 {
            let e = &e;
            s.spawn(move || {
                for i in 0..50u64 {
                    let offset = (t * 50 + i) * 1000;
                    e.submit(ReadRequest { offset, len: 1000 + i as usize, tag: t * 1000 + i }).unwrap();
                }
            });
        }
    });
    let got = collect(&e, 200);
    for (&tag, res) in &got {
        let (t, i) = (tag / 1000, tag % 1000);
        let r = ReadRequest { offset: (t * 50 + i) * 1000, len: 1000 + i as usize, tag };
        check_bytes(&f, &r, res.as_ref().unwrap());
    }
}

fn drop_with_reads_in_flight(mode: Mode) {
    let f = make_file(1 << 20);
    let e = engine(mode, &f, |b| b);
    let rx = e.completions().clone();
    for i in 0..64u64 {
        e.submit(ReadRequest { offset: i * 16384, len: 16384, tag: i }).unwrap();
    }
    drop(e);
    // Whatever completed is intact; the channel then closes.
    let mut n = 0;
    while let Ok(c) = rx.recv() {
        let r = ReadRequest { offset: c.tag * 16384, len: 16384, tag: c.tag };
        check_bytes(&f, &r, &c.result.unwrap());
        n += 1;
    }
    assert!(n <= 64);
}

macro_rules! backend_suite {
    ($($name:ident),* $(,)?) => {
        mod uring {
            $( #[test] fn $name() { super::$name(super::Mode::Uring) } )*
        }
        mod pread {
            $( #[test] fn $name() { super::$name(super::Mode::Pread) } )*
        }
    };
}

backend_suite!(
    reads_exact_ranges,
    coalesces_adjacent_requests,
    rejects_bad_requests,
    retries_transient_errors_and_short_reads,
    reports_eio_with_offset,
    truncated_file_is_an_error_not_stale_bytes,
    pool_budget_bounds_memory,
    concurrent_submitters,
    drop_with_reads_in_flight,
);

#[test]
fn auto_prefers_io_uring_with_direct_io() {
    let f = make_file(8192);
    let e = IoEngine::open(&f.path).unwrap();
    match e.fallback_reason() {
        None => {
            assert_eq!(e.backend(), Backend::IoUring);
            assert!(e.direct_io());
        }
        // Allowed on machines without io_uring or on tmpfs, but then it must say so.
        Some(r) => {
            assert_eq!(e.backend(), Backend::Pread, "{r}");
            eprintln!("auto chose pread: {r}");
        }
    }
}

#[test]
fn forced_setup_failure_falls_back_to_pread() {
    let f = make_file(20_000);
    let e = IoEngineBuilder::new(&f.path).simulate_io_uring_setup_failure(libc::ENOSYS).build().unwrap();
    assert_eq!(e.backend(), Backend::Pread);
    assert_eq!(e.fallback_reason(), Some(&FallbackReason::IoUringSetup { errno: libc::ENOSYS }));
    assert!(e.fallback_reason().unwrap().to_string().contains("io_uring setup failed"));
    e.submit(ReadRequest { offset: 5, len: 10_000, tag: 9 }).unwrap();
    check_bytes(&f, &ReadRequest { offset: 5, len: 10_000, tag: 9 }, &collect(&e, 1)[&9].clone().unwrap());

    // Requiring io_uring turns the same failure into an error instead.
    let err = IoEngineBuilder::new(&f.path)
        .backend(BackendChoice::IoUring)
        .simulate_io_uring_setup_failure(libc::EPERM)
        .build()
        .unwrap_err();
    assert!(matches!(err, OpenError::IoUringUnavailable { .. }), "{err}");
    let err = IoEngineBuilder::new(&f.path).queue_depth(0).build().unwrap_err();
    assert!(matches!(err, OpenError::Config { .. }));
    let err = IoEngine::open(f.path.with_extension("missing")).unwrap_err();
    assert!(matches!(err, OpenError::Open { .. }), "{err}");
}

#[test]
fn refused_direct_io_falls_back_to_buffered_pread() {
    let f = make_file(10_000);
    let e = IoEngineBuilder::new(&f.path).simulate_direct_io_refused().build().unwrap();
    assert_eq!(e.backend(), Backend::Pread);
    assert_eq!(e.fallback_reason(), Some(&FallbackReason::DirectIoRefused { errno: libc::EINVAL }));
    assert!(e.fallback_reason().unwrap().to_string().contains("O_DIRECT refused"));
    assert!(!e.direct_io());
    e.submit(ReadRequest { offset: 1, len: 9_999, tag: 4 }).unwrap();
    check_bytes(&f, &ReadRequest { offset: 1, len: 9_999, tag: 4 }, &collect(&e, 1)[&4].clone().unwrap());
    let err = IoEngineBuilder::new(&f.path)
        .backend(BackendChoice::IoUring)
        .simulate_direct_io_refused()
        .build()
        .unwrap_err();
    assert!(
        matches!(err, OpenError::IoUringUnavailable { reason: FallbackReason::DirectIoRefused { .. }, .. }),
        "{err}"
    );
}

#[test]
fn tmpfs_refuses_direct_io_and_falls_back() {
    let shm = Path::new("/dev/shm");
    if !shm.is_dir() {
        eprintln!("no /dev/shm; skipping the tmpfs fallback test");
        return;
    }
    let f = make_file_in(shm, 10_000);
    let e = IoEngine::open(&f.path).unwrap();
    if e.fallback_reason().is_none() {
        eprintln!("/dev/shm accepted O_DIRECT; nothing to fall back from");
        return;
    }
    assert_eq!(e.backend(), Backend::Pread);
    assert_eq!(e.fallback_reason(), Some(&FallbackReason::DirectIoRefused { errno: libc::EINVAL }));
    assert!(!e.direct_io());
    e.submit(ReadRequest { offset: 123, len: 4567, tag: 1 }).unwrap();
    check_bytes(&f, &ReadRequest { offset: 123, len: 4567, tag: 1 }, &collect(&e, 1)[&1].clone().unwrap());
}

#[test]
fn bench_runs_both_patterns() {
    let f = make_file(1 << 20);
    for (pattern, backend) in
        [(bench::Pattern::Random, BackendChoice::Auto), (bench::Pattern::Sequential, BackendChoice::Pread)]
    {
        let cfg = bench::BenchConfig {
            path: f.path.clone(),
            read_size: 16384,
            queue_depth: 4,
            backend,
            pattern,
            limit: bench::Limit::Bytes(2 << 20),
            pool_bytes: 1 << 20,
            direct: true,
            seed: 7,
        };
        let r = bench::run(&cfg).unwrap();
        assert_eq!(r.bytes, 2 << 20);
        assert_eq!(r.reads, 128);
        assert!(r.iops() > 0.0 && r.mb_per_s() > 0.0);
        assert!(r.stats.peak_in_flight <= 4);
        assert!(r.to_string().contains("bs=16384"));
    }
    let cfg = bench::BenchConfig {
        path: f.path.clone(),
        read_size: 2 << 20,
        queue_depth: 1,
        backend: BackendChoice::Auto,
        pattern: bench::Pattern::Random,
        limit: bench::Limit::Bytes(1),
        pool_bytes: 4 << 20,
        direct: true,
        seed: 1,
    };
    assert!(matches!(bench::run(&cfg), Err(BenchError::Config { .. })));
}
