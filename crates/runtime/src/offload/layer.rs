//! One decode token's FFN of one packed layer under a memory budget: PowerInfer-2's five-stage cluster
//! pipeline.
//!
//! *Pred*: the predictor's mask, if one is used (computed by the caller). *GIO*: the cluster's record is read
//! (its gate block, or its gate block and bundles for a layer read whole; with a predictor, the predicted gate
//! rows); with thresholds these reads do not depend on the token and were usually read ahead by the stream
//! while earlier layers computed. *GC*: the cluster's gates are computed as soon as its gate rows are in memory,
//! and each neuron that passes is found in the fixed region (pinned), its record (read whole), the neuron-level
//! LRU region, or else read. *UDIO*: the bundles of the missing ones are read. *UDC*: up rows and down columns
//! are computed when all of a cluster's bundles are in. Every compute thread takes whichever cluster is ready
//! and delivers completions between tasks; it blocks on the completion channel only when nothing is ready and
//! reads are in flight (that wait is the I/O stall). Every read is checked against its checksum when it is
//! delivered. Each cluster adds into its own slot of a `ClusterSums`, reduced in cluster order, with the same
//! kernels as the in-memory path: the result is bit-identical to running from memory.

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use pinion_cache::LruRegion;
use pinion_exec_cpu::SpinPool;
use pinion_exec_cpu::sparse::{self, ClusterGates, ClusterSums, Filter, SparseFfn, TokenActs, UpDown};
use pinion_format::packed::PackedLayer;
use pinion_io::{Completion, ReadRequest};

use crate::error::RuntimeError;
use crate::offload::io::{KIND_BUNDLE, KIND_GATE, Piece, Reader, lock, tag, untag};
use crate::offload::resident::Resident;
use crate::offload::stream::Stream;

/// Checks an idle compute thread spins before it yields its core at each check.
const SPINS_BEFORE_YIELD: u32 = 256;
/// Marks a neuron whose bundle is not in the cluster's LRU copy.
const NONE: u32 = u32::MAX;

/// A cluster's state and lists, kept by the offloaded run between layers so that they are allocated once.
#[derive(Default)]
pub(crate) struct ClBufs {
    gates: ClusterGates,
    /// The cluster's record read: its gate block, or gate block and unpinned bundles (layers read whole).
    record: Option<Piece>,
    /// The record came from the stream (its bytes are released to it once used).
    from_stream: bool,
    /// With a predictor: the gate rows read, by index in the cluster.
    rows: Vec<Option<Piece>>,
    /// Bundles read after the gates, by index in the cluster (the up row alone without bundling).
    got: Vec<Option<Piece>>,
    /// Without bundling: the down columns read, by index in the cluster.
    got_down: Vec<Option<Piece>>,
    /// Bundles served by the neuron-level LRU region, copied (the region may evict them meanwhile).
    lru: Vec<u8>,
    /// Offset of each neuron's bundle in `lru` ([`NONE`] if not there), by index in the cluster.
    lru_at: Vec<u32>,
    /// Indices in the cluster whose bundles `lru` holds (their `lru_at` entries are reset after use).
    lru_idx: Vec<u32>,
    /// Indices in the cluster whose bundles were read this token (inserted into the LRU region after use).
    read: Vec<u32>,
    /// The bundle reads this cluster submits.
    reqs: Vec<ReadRequest>,
    /// A use began and did not finish (an error stopped the layer): the per-neuron lists may hold entries.
    dirty: bool,
}

impl ClBufs {
    /// Makes the per-neuron lists `c` long and empty. A use clears only the entries it set, when it finishes, so
    /// that a layer's set-up costs nothing per neuron (sweeping four lists per cluster was 4% of a 7B token);
    /// the lists are swept only when their length changes or a use ended early.
    fn ready(&mut self, c: usize) {
        if self.dirty || self.got.len() != c {
            self.rows.clear();
            self.rows.resize_with(c, || None);
            self.got.clear();
            self.got.resize_with(c, || None);
            self.got_down.clear();
            self.got_down.resize_with(c, || None);
            self.lru_at.clear();
            self.lru_at.resize(c, NONE);
            self.dirty = false;
        }
    }
}

/// A cluster's state during one layer's decode.
pub(crate) struct Cl {
    b: ClBufs,
    /// Whether the predictor marks any of its neurons.
    need: bool,
    /// Reads that must arrive before its gates can be computed.
    gate_pending: u32,
    /// Bundle reads that must arrive before its up/down phase.
    bundle_pending: u32,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Task {
    Gate(usize),
    UpDown(usize),
}

pub(crate) struct Sched {
    pub(crate) queue: VecDeque<Task>,
    done: usize,
    error: Option<RuntimeError>,
}

/// What one layer's decode counted.
#[derive(Default)]
pub(crate) struct Counters {
    pub(crate) active: AtomicUsize,
    pub(crate) gate_bytes: AtomicU64,
    pub(crate) bundle_bytes: AtomicU64,
    pub(crate) pinned: AtomicU64,
    pub(crate) lru: AtomicU64,
    pub(crate) misses: AtomicU64,
    pub(crate) gate_hits: AtomicU64,
    pub(crate) gate_misses: AtomicU64,
    pub(crate) stall_ns: AtomicU64,
    pub(crate) verify_ns: AtomicU64,
}

/// How a layer's records are read.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LayerMode {
    /// Gate and unpinned bundles of a cluster in one read.
    pub(crate) whole: bool,
    /// Up row and down column in one read (off: two unmerged reads).
    pub(crate) bundle: bool,
    /// Read, then compute (no overlap of a layer's reads with its compute).
    pub(crate) serial: bool,
    /// Check every read against its checksum (off only to measure what checking costs).
    pub(crate) verify: bool,
}

/// The file range of cluster `k`'s record read with thresholds, if anything of it is not pinned: its gate block
/// (layers read in two phases), or its gate block and unpinned bundles (layers read whole). A record read whole
/// runs to its padded end, so that the reads of consecutive records touch and the I/O engine merges them.
pub(crate) fn record_request(
    pl: &PackedLayer,
    g: usize,
    nb: usize,
    whole: bool,
    k: usize,
) -> Option<std::ops::Range<u64>> {
    let c = pl.cluster_neurons;
    let (first, n) = (k * c, pl.cluster_len(k));
    let bundles_pinned = first + n <= nb;
    match (k < g, whole && !bundles_pinned) {
        (true, false) => None,
        (false, false) => Some(pl.gate_block_range(k)),
        (gate_pinned, true) => {
            let start = match gate_pinned {
                true => pl.bundle_range(first.max(nb)).start,
                false => pl.gate_block_range(k).start,
            };
            Some(start..pl.record_range(k).end)
        }
    }
}

/// Everything the compute threads share while running one layer.
pub(crate) struct LayerRun<'a> {
    pub(crate) pl: &'a PackedLayer,
    pub(crate) l: usize,
    pub(crate) spec: &'a SparseFfn,
    pub(crate) token: &'a TokenActs<'a>,
    /// The predictor's mask and the rule's per-neuron thresholds, in position order.
    pub(crate) filter: Filter<'a>,
    pub(crate) res: &'a Resident,
    pub(crate) reader: &'a Reader,
    pub(crate) stream: &'a Mutex<Stream>,
    pub(crate) cold: &'a LruRegion,
    pub(crate) cls: &'a [Mutex<Cl>],
    pub(crate) sched: &'a Mutex<Sched>,
    pub(crate) counters: &'a Counters,
    pub(crate) mode: LayerMode,
    /// Per compute thread: a gate block assembled from predicted rows.
    pub(crate) scratch: &'a [Mutex<Vec<u8>>],
    /// Without the pipeline: bundle reads are collected and submitted together.
    pub(crate) deferred: Mutex<Vec<ReadRequest>>,
    /// Reads of this layer submitted and not yet delivered. A thread with nothing to do waits on the
    /// completion channel only while some are: otherwise the rest of the work is on other threads.
    pub(crate) in_flight: AtomicUsize,
    /// Clusters to finish (the needed ones).
    pub(crate) n_need: usize,
}

impl<'a> LayerRun<'a> {
    /// Sets up cluster `k` for this layer: what it needs read before its gates, taken from the stash when the
    /// stream read it ahead. Returns the reads to submit now (none when the stream reads this layer).
    pub(crate) fn start_cluster(
        &self,
        k: usize,
        b: ClBufs,
        streamed: bool,
        reqs: &mut Vec<ReadRequest>,
    ) -> Result<Cl, RuntimeError> {
        let pl = self.pl;
        let c = pl.cluster_neurons;
        let n = pl.cluster_len(k);
        let lo = k * c;
        let need = self.filter.mask.is_none_or(|m| m[lo..lo + n].contains(&true));
        let mut cl = Cl { b, need, gate_pending: 0, bundle_pending: 0 };
        let b = &mut cl.b;
        b.ready(c);
        b.record = None;
        b.from_stream = false;
        if !need {
            return Ok(cl);
        }
        // Cleared by `up_down` when this use finishes.
        b.dirty = true;
        let pin = &self.res.layers[self.l];
        let ctr = self.counters;
        if k < pin.n_gate_clusters {
            ctr.gate_hits.fetch_add(1, Ordering::Relaxed);
        } else {
            ctr.gate_misses.fetch_add(1, Ordering::Relaxed);
        }
        match self.filter.mask {
            None => {
                let Some(r) = record_request(pl, pin.n_gate_clusters, pin.n_bundles, self.mode.whole, k)
                else {
                    return Ok(cl);
                };
                let gate_part = match k < pin.n_gate_clusters {
                    true => 0,
                    false => pl.gate_block_range(k).end - pl.gate_block_range(k).start,
                };
                ctr.gate_bytes.fetch_add(gate_part, Ordering::Relaxed);
                ctr.bundle_bytes.fetch_add(r.end - r.start - gate_part, Ordering::Relaxed);
                let stashed = lock(&self.reader.stash).records[self.l][k].take();
                match stashed {
                    Some(buf) => {
                        self.take_record(k, &mut cl, Piece::Shared(buf))?;
                        cl.b.from_stream = true;
                    }
                    None => {
                        cl.gate_pending = 1;
                        cl.b.from_stream = streamed;
                        if !streamed {
                            let len = (r.end - r.start) as usize;
                            reqs.push(ReadRequest { offset: r.start, len, tag: tag(KIND_GATE, self.l, k) });
                        }
                    }
                }
            }
            Some(m) if k >= pin.n_gate_clusters => {
                // With a predictor: the predicted gate rows only.
                for i in 0..n {
                    if m[lo + i] {
                        let r = pl.gate_row_range(lo + i);
                        let len = (r.end - r.start) as usize;
                        reqs.push(ReadRequest { offset: r.start, len, tag: tag(KIND_GATE, self.l, k) });
                        ctr.gate_bytes.fetch_add(len as u64, Ordering::Relaxed);
                        cl.gate_pending += 1;
                    }
                }
            }
            Some(_) => {}
        }
        Ok(cl)
    }

    /// Takes cluster `k`'s record after checking it: its gate block, and (read whole) its unpinned bundles.
    fn take_record(&self, k: usize, cl: &mut Cl, buf: Piece) -> Result<(), RuntimeError> {
        let pl = self.pl;
        let pin = &self.res.layers[self.l];
        let t0 = Instant::now();
        let at = |r: std::ops::Range<u64>| -> &[u8] {
            let s = (r.start - buf.offset()) as usize;
            &buf[s..s + (r.end - r.start) as usize]
        };
        let corrupt = |e| self.reader.corrupt(e);
        if !self.mode.verify {
            cl.b.record = Some(buf);
            return Ok(());
        }
        if k >= pin.n_gate_clusters {
            pl.verify_gate_block(k, at(pl.gate_block_range(k))).map_err(corrupt)?;
        }
        if self.mode.whole {
            let first = k * pl.cluster_neurons;
            for pos in first.max(pin.n_bundles)..first + pl.cluster_len(k) {
                pl.verify_bundle(pos, at(pl.bundle_range(pos))).map_err(corrupt)?;
            }
        }
        self.counters.verify_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        cl.b.record = Some(buf);
        Ok(())
    }

    /// Delivers a completion to its cluster (checking it) or, for a later step, to the stash; returns the task
    /// it made ready, if any.
    pub(crate) fn deliver(&self, c: Completion) -> Result<Option<Task>, RuntimeError> {
        let (kind, layer, k) = untag(c.tag);
        if layer != self.l || !(kind == KIND_GATE || kind == KIND_BUNDLE) || k >= self.cls.len() {
            // Read ahead for a later layer or the head.
            self.reader.stash_or_fail(c)?;
            return Ok(None);
        }
        let pl = self.pl;
        let what = || format!("layer {} cluster {k}", self.l);
        // Without the pipeline a layer's reads all arrive before any is used: copies free the pool's buffers.
        let buf = Piece::new(self.reader.bytes(c, &what)?, self.mode.serial);
        let mut guard = lock(&self.cls[k]);
        let cl = &mut *guard;
        self.in_flight.fetch_sub(1, Ordering::AcqRel);
        let c_n = pl.cluster_neurons;
        if kind == KIND_GATE {
            if self.filter.mask.is_none() {
                self.take_record(k, cl, buf)?;
            } else {
                let i = ((buf.offset() - pl.record_range(k).start) / pl.gate_row_bytes() as u64) as usize;
                let t0 = Instant::now();
                if self.mode.verify {
                    pl.verify_gate_row(k * c_n + i, &buf).map_err(|e| self.reader.corrupt(e))?;
                }
                self.counters.verify_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
                cl.b.rows[i] = Some(buf);
            }
            cl.gate_pending -= 1;
            return Ok((cl.gate_pending == 0).then_some(Task::Gate(k)));
        }
        let bb = pl.bundle_bytes() as u64;
        let rel = buf.offset() - pl.gate_block_range(k).end;
        let (i, part) = ((rel / bb) as usize, rel % bb);
        let pos = k * c_n + i;
        let t0 = Instant::now();
        let checked = if self.mode.bundle {
            let r = if self.mode.verify { pl.verify_bundle(pos, &buf) } else { Ok(()) };
            cl.b.got[i] = Some(buf);
            r
        } else {
            if part == 0 {
                cl.b.got[i] = Some(buf);
            } else {
                cl.b.got_down[i] = Some(buf);
            }
            match (&cl.b.got[i], &cl.b.got_down[i]) {
                (Some(up), Some(down)) if self.mode.verify => pl.verify_bundle_parts(pos, up, down),
                _ => Ok(()),
            }
        };
        checked.map_err(|e| self.reader.corrupt(e))?;
        self.counters.verify_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
        cl.bundle_pending -= 1;
        Ok((cl.bundle_pending == 0).then_some(Task::UpDown(k)))
    }

    /// GC for cluster `k`: gates, then where each passing neuron's bundle comes from. Returns the up/down task
    /// when nothing has to be read.
    fn gate(&self, k: usize, thread: usize) -> Result<Option<Task>, RuntimeError> {
        let (pl, l) = (self.pl, self.l);
        let pin = &self.res.layers[l];
        let c = pl.cluster_neurons;
        let n = pl.cluster_len(k);
        let gr = pl.gate_row_bytes();
        let mut guard = lock(&self.cls[k]);
        let cl = &mut *guard;
        let f = self.filter.slice(k * c..k * c + n);
        let m = f.mask;
        let mut scratch = lock(&self.scratch[thread.min(self.scratch.len() - 1)]);
        let block: &[u8] = if let Some(b) = self.res.gate_block(l, k) {
            b
        } else if m.is_some() {
            // Assemble the predicted rows; the others are not computed (the mask skips them).
            scratch.resize(n * gr, 0);
            for (i, row) in cl.b.rows.iter_mut().enumerate().take(n) {
                if let Some(row) = row.take() {
                    scratch[i * gr..(i + 1) * gr].copy_from_slice(&row);
                }
            }
            &scratch[..n * gr]
        } else {
            let rec = cl.b.record.as_ref().ok_or_else(|| {
                RuntimeError::OffloadStopped(format!(
                    "layer {l} cluster {k}: gates computed before they were read"
                ))
            })?;
            &rec[..n * gr]
        };
        sparse::cluster_gates(self.spec, self.token, block, f, &mut cl.b.gates);
        drop(scratch);
        let b = &mut cl.b;
        b.read.clear();
        b.reqs.clear();
        b.lru.clear();
        b.lru_idx.clear();
        let (mut pinned, mut lru_hits, mut full_reads) = (0u64, 0u64, 0u64);
        let whole = self.mode.whole && b.record.is_some();
        for &i in b.gates.passed() {
            let pos = k * c + i as usize;
            if pos < pin.n_bundles {
                pinned += 1;
                continue;
            }
            if whole {
                full_reads += 1;
                continue;
            }
            if let Some(got) = self.cold.get(pos as u32) {
                b.lru_at[i as usize] = b.lru.len() as u32;
                b.lru_idx.push(i);
                b.lru.extend_from_slice(&got);
                lru_hits += 1;
                continue;
            }
            b.read.push(i);
            let r = pl.bundle_range(pos);
            let t = tag(KIND_BUNDLE, l, k);
            if self.mode.bundle {
                b.reqs.push(ReadRequest { offset: r.start, len: (r.end - r.start) as usize, tag: t });
            } else {
                let mid = r.start + pl.up_row_bytes() as u64;
                b.reqs.push(ReadRequest { offset: r.start, len: pl.up_row_bytes(), tag: t });
                b.reqs.push(ReadRequest { offset: mid, len: pl.down_col_bytes(), tag: t });
            }
        }
        let ctr = self.counters;
        ctr.pinned.fetch_add(pinned, Ordering::Relaxed);
        ctr.lru.fetch_add(lru_hits, Ordering::Relaxed);
        ctr.misses.fetch_add(b.read.len() as u64 + full_reads, Ordering::Relaxed);
        ctr.bundle_bytes.fetch_add(b.reqs.iter().map(|r| r.len as u64).sum(), Ordering::Relaxed);
        if b.reqs.is_empty() {
            return Ok(Some(Task::UpDown(k)));
        }
        cl.bundle_pending = b.reqs.len() as u32;
        // Counted before submitting so that no completion finds the count at zero; this cluster's completions
        // wait for its lock, held until the requests are out.
        self.in_flight.fetch_add(b.reqs.len(), Ordering::AcqRel);
        if self.mode.serial {
            lock(&self.deferred).extend_from_slice(&b.reqs);
            Ok(None)
        } else {
            self.reader.submit(&b.reqs, "bundle reads")?;
            Ok(None)
        }
    }

    /// UDC for cluster `k` into its slot; then the LRU region takes the bundles that were read, and the
    /// cluster's reads are released.
    fn up_down(&self, k: usize, slot: &mut [f32]) -> Result<(), RuntimeError> {
        let (pl, spec, l) = (self.pl, self.spec, self.l);
        let res = self.res;
        let c = pl.cluster_neurons;
        let (ub, bb) = (pl.up_row_bytes(), pl.bundle_bytes());
        let mut guard = lock(&self.cls[k]);
        let cl = &mut *guard;
        let b = &mut cl.b;
        let (record, got, got_down, lru, lru_at) = (&b.record, &b.got, &b.got_down, &b.lru, &b.lru_at);
        let whole = self.mode.whole;
        let bundle = |i: u32| {
            let pos = k * c + i as usize;
            let bytes: &[u8] = if let Some(p) = res.bundle(l, pos) {
                p
            } else if let (true, Some(rec)) = (whole, record) {
                let r = pl.bundle_range(pos);
                let s = (r.start - rec.offset()) as usize;
                &rec[s..s + bb]
            } else if lru_at[i as usize] != NONE {
                let s = lru_at[i as usize] as usize;
                &lru[s..s + bb]
            } else if let (Some(up), Some(down)) = (&got[i as usize], &got_down[i as usize]) {
                return UpDown { up: &up[..], down: &down[..] };
            } else {
                got[i as usize].as_deref().unwrap_or(&[])
            };
            UpDown { up: &bytes[..ub.min(bytes.len())], down: &bytes[ub.min(bytes.len())..] }
        };
        let active = sparse::cluster_up_down_by(spec, self.token, &mut b.gates, &bundle, slot);
        self.counters.active.fetch_add(active, Ordering::Relaxed);
        let mut joined = Vec::new();
        for &i in &b.read {
            let pos = k * c + i as usize;
            let bytes: &[u8] = match (&b.got[i as usize], &b.got_down[i as usize]) {
                (Some(up), Some(down)) => {
                    joined.clear();
                    joined.extend_from_slice(up);
                    joined.extend_from_slice(down);
                    &joined
                }
                (Some(both), None) => both,
                _ => continue,
            };
            // A refusal (every entry held by a reader) is counted by the region; the bundle is simply not kept.
            let _ = self.cold.insert(pos as u32, bytes)?;
        }
        for &i in &b.read {
            (b.got[i as usize], b.got_down[i as usize]) = (None, None);
        }
        for &i in &b.lru_idx {
            b.lru_at[i as usize] = NONE;
        }
        b.dirty = false;
        if let Some(rec) = b.record.take() {
            if b.from_stream {
                let (offset, len) = (rec.offset(), rec.len());
                drop(rec);
                let mut s = lock(self.stream);
                s.consumed(offset, len);
                s.refill(self.reader)?;
            }
        }
        Ok(())
    }

    fn finish(&self) {
        lock(self.sched).done += 1;
    }

    fn run(&self, task: Task, slots: &sparse::SharedSlots<'_>, thread: usize) -> Result<(), RuntimeError> {
        let mut next = Some(task);
        while let Some(t) = next.take() {
            match t {
                Task::Gate(k) => next = self.gate(k, thread)?,
                Task::UpDown(k) => {
                    self.up_down(k, slots.claim(k))?;
                    self.finish();
                }
            }
        }
        Ok(())
    }

    /// A compute thread of the pipeline: takes ready clusters, delivers completions, waits only when idle.
    pub(crate) fn worker(&self, slots: &sparse::SharedSlots<'_>, thread: usize) {
        let fail = |e: RuntimeError| {
            let mut s = lock(self.sched);
            s.error.get_or_insert(e);
        };
        let mut idle = 0u32;
        loop {
            // Completions first: they start more reads sooner.
            while let Ok(c) = self.reader.engine.completions().try_recv() {
                match self.deliver(c) {
                    Ok(Some(t)) => lock(self.sched).queue.push_back(t),
                    Ok(None) => {}
                    Err(e) => return fail(e),
                }
            }
            let task = {
                let mut s = lock(self.sched);
                if s.error.is_some() || s.done == self.n_need {
                    return;
                }
                s.queue.pop_front()
            };
            if let Some(t) = task {
                if let Err(e) = self.run(t, slots, thread) {
                    return fail(e);
                }
                continue;
            }
            if self.in_flight.load(Ordering::Acquire) == 0 {
                // No read to wait for: other threads hold the last clusters (or are about to submit reads).
                idle = idle.saturating_add(1);
                if idle < SPINS_BEFORE_YIELD {
                    std::hint::spin_loop();
                } else {
                    std::thread::yield_now();
                }
                continue;
            }
            idle = 0;
            let t0 = Instant::now();
            let got = self.reader.recv_timeout(Duration::from_micros(100));
            self.counters.stall_ns.fetch_add(t0.elapsed().as_nanos() as u64, Ordering::Relaxed);
            match got {
                Ok(Some(c)) => match self.deliver(c) {
                    Ok(Some(t)) => {
                        if let Err(e) = self.run(t, slots, thread) {
                            return fail(e);
                        }
                    }
                    Ok(None) => {}
                    Err(e) => return fail(e),
                },
                Ok(None) => {}
                Err(e) => return fail(e),
            }
        }
    }

    /// Waits for `n` completions on this thread (everything else idle: all of it is stall).
    fn wait_for(&self, n: usize, stall_threads: u64) -> Result<(), RuntimeError> {
        let mut left = n;
        while left > 0 {
            let t0 = Instant::now();
            let c = self.reader.recv()?;
            self.counters
                .stall_ns
                .fetch_add(t0.elapsed().as_nanos() as u64 * stall_threads, Ordering::Relaxed);
            let (kind, layer, _) = untag(c.tag);
            let mine = layer == self.l && (kind == KIND_GATE || kind == KIND_BUNDLE);
            self.deliver(c)?;
            if mine {
                left -= 1;
            }
        }
        Ok(())
    }

    /// Without the pipeline: read the gates, compute them, read the bundles, compute them.
    pub(crate) fn staged(
        &self,
        pool: &SpinPool,
        sums: &mut ClusterSums,
        outstanding: usize,
    ) -> Result<(), RuntimeError> {
        let threads = pool.n_threads() as u64;
        self.wait_for(outstanding, threads)?;
        let needed: Vec<usize> = (0..self.cls.len()).filter(|&k| lock(&self.cls[k]).need).collect();
        let next = AtomicUsize::new(0);
        let err = Mutex::new(None);
        pool.run(&|thread, _| {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&k) = needed.get(i) else { break };
                if let Err(e) = self.gate(k, thread) {
                    lock(&err).get_or_insert(e);
                }
            }
        });
        if let Some(e) = lock(&err).take() {
            return Err(e);
        }
        let reqs = std::mem::take(&mut *lock(&self.deferred));
        self.reader.submit(&reqs, "bundle reads")?;
        self.wait_for(reqs.len(), threads)?;
        let slots = sums.shared();
        let next = AtomicUsize::new(0);
        pool.run(&|_, _| {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(&k) = needed.get(i) else { break };
                if let Err(e) = self.up_down(k, slots.claim(k)) {
                    lock(&err).get_or_insert(e);
                }
            }
        });
        lock(&err).take().map_or(Ok(()), Err)
    }

    /// The error a worker recorded, if any.
    pub(crate) fn take_error(&self) -> Option<RuntimeError> {
        lock(self.sched).error.take()
    }

    /// Returns the clusters' lists for the next layer.
    pub(crate) fn into_bufs(cls: Vec<Mutex<Cl>>, bufs: &mut [ClBufs]) {
        for (b, cl) in bufs.iter_mut().zip(cls) {
            *b = cl.into_inner().unwrap_or_else(|e| e.into_inner()).b;
        }
    }
}

impl Sched {
    pub(crate) fn new(queue: VecDeque<Task>) -> Sched {
        Sched { queue, done: 0, error: None }
    }

    pub(crate) fn into_queue(self) -> VecDeque<Task> {
        self.queue
    }
}

impl Cl {
    /// Whether the cluster takes part in this token.
    pub(crate) fn need(&self) -> bool {
        self.need
    }

    /// Reads that must arrive before its gates.
    pub(crate) fn gate_pending(&self) -> u32 {
        self.gate_pending
    }
}
