//! Running a packed model under a memory budget: the [`Plan`] `pinion-plan` makes for the run decides what stays
//! in memory; the FFN neurons and output-head rows that do not fit are read from storage with O_DIRECT, a
//! cluster at a time, overlapped with compute (PowerInfer-2's decode pipeline).
//!
//! The modules, by job: [`resident`] is what is in memory and where (the segmented neuron cache: the fixed
//! region with the attention weights, the head's first rows and the pinned neurons, loaded once and checked;
//! the per-layer neuron-level LRU regions); [`io`] the reads (one I/O engine, completion tags,
//! the stash of reads that arrive early, typed errors); [`stream`] the read-ahead of a token's reads that do not
//! depend on its activations; [`layer`] one layer's five-stage cluster pipeline; this module the run itself
//! (tokens, embeddings, the output head, prefill's layers); [`stats`] the counters.
//!
//! **Invariant:** the offloaded logits are bit-identical to the in-memory engine's for any budget and switches:
//! the same kernels see the same bytes (every read is checked against its checksum first), each cluster
//! accumulates in neuron order into its own slot, and the slots are reduced in cluster order whatever order the
//! reads complete in.

mod io;
mod layer;
mod resident;
mod stats;
mod stream;

use std::collections::VecDeque;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use pinion_cache::CacheStats;
use pinion_exec_cpu::sparse::{ClusterRows, ClusterSums, Filter, SparseFfn, TokenActs};
use pinion_exec_cpu::{QMatrix, QuantizedActs, SpinPool};
use pinion_format::packed::PackedLayer;
use pinion_format::quant;
use pinion_io::{ReadBuf, ReadRequest};
use pinion_plan::{CHUNK, Plan};

use crate::error::RuntimeError;
use crate::ffn::LayerBytes;
use crate::model::{Model, WeightRef};

use self::io::{KIND_EMBD, KIND_GATE, KIND_HEAD, KIND_STAGE, Reader, Stash, lock, pieces, tag, untag};
use self::layer::{ClBufs, Counters, LayerMode, LayerRun, Sched, Task, record_request};
use self::resident::Resident;
use self::stream::Stream;

pub use self::stats::OffloadStats;

/// The offloaded part of a context: its plan, reads, resident weights and caches, and counters.
pub(crate) struct Offload {
    plan: Plan,
    reader: Reader,
    res: Resident,
    stream: Mutex<Stream>,
    /// Per-cluster lists, reused across layers and tokens.
    bufs: Vec<ClBufs>,
    queue: VecDeque<Task>,
    sums: Option<ClusterSums>,
    /// Per compute thread: a gate block assembled from predicted rows.
    scratch: Vec<Mutex<Vec<u8>>>,
    stats: OffloadStats,
    token_start: Option<Instant>,
    /// Stall and checksum nanoseconds summed over threads in the current token.
    stall_ns: u64,
    verify_ns: u64,
    /// The I/O engine's OS reads and bytes transferred when the current token began.
    io_at_start: (u64, u64),
    /// Prefill: the pieces of the layer being computed, and the layer whose pieces are being read ahead.
    stage: Vec<ReadBuf>,
    stage_ahead: Option<usize>,
    tied: bool,
    broken: bool,
    /// Compute threads (a wait of the main thread idles all of them).
    n_threads: u64,
    /// Check every read against its checksum (on unless switched off to measure its cost).
    verify: bool,
}

/// Output-head rows per streamed chunk.
fn head_chunk_rows(row_bytes: usize) -> usize {
    (CHUNK as usize / row_bytes.max(1)).max(1)
}

impl Offload {
    /// Opens the model file for direct reads and loads what `plan` keeps in memory.
    pub(crate) fn new(
        model: &Model,
        plan: Plan,
        predicting: bool,
        n_threads: usize,
        verify: bool,
    ) -> Result<Offload, RuntimeError> {
        let layers = model.packed_layers().ok_or(RuntimeError::NotPacked)?;
        let path = model.file().path().to_path_buf();
        if model.packed_version() < 2 {
            return Err(RuntimeError::NotVerifiable { path, version: model.packed_version() });
        }
        let reader = Reader::open(&path, plan.io_queue_depth, plan.memory.io_buffers, plan.options.bundle)?;
        let res = Resident::load(model, &plan, &reader)?;
        let n_clusters: Vec<usize> = layers.iter().map(|p| p.n_clusters()).collect();
        let rb = model.output.row_bytes();
        let n_head = (model.config().n_vocab - plan.head_rows).div_ceil(head_chunk_rows(rb));
        *lock(&reader.stash) = Stash::new(&n_clusters, n_head);
        let window = if plan.options.pipeline { plan.read_ahead_bytes } else { 0 };
        // Without the pipeline nothing is read ahead.
        let ahead = match plan.options.pipeline {
            true => Offload::ahead_requests(model, &plan, &res, predicting)?,
            false => Vec::new(),
        };
        Ok(Offload {
            stream: Mutex::new(Stream::new(window, ahead)),
            reader,
            res,
            bufs: Vec::new(),
            queue: VecDeque::new(),
            sums: None,
            scratch: (0..n_threads.max(1)).map(|_| Mutex::new(Vec::new())).collect(),
            stats: OffloadStats { neurons_per_layer: vec![0; layers.len()], ..OffloadStats::default() },
            token_start: None,
            stall_ns: 0,
            verify_ns: 0,
            io_at_start: (0, 0),
            stage: Vec::new(),
            stage_ahead: None,
            tied: model.output.range == model.tok_embd.range,
            broken: false,
            n_threads: n_threads as u64,
            verify,
            plan,
        })
    }

    pub(crate) fn plan(&self) -> &Plan {
        &self.plan
    }

    pub(crate) fn stats(&self) -> &OffloadStats {
        &self.stats
    }

    /// The neuron cache's counters per region.
    pub(crate) fn cache_stats(&self) -> CacheStats {
        self.res.cache.stats()
    }

    pub(crate) fn reset_stats(&mut self) {
        let n = self.stats.neurons_per_layer.len();
        self.stats = OffloadStats { neurons_per_layer: vec![0; n], ..OffloadStats::default() };
        self.res.cache.reset_stats();
    }

    /// I/O backend in use, for the banner.
    pub(crate) fn backend(&self) -> String {
        let e = &self.reader.engine;
        match e.fallback_reason() {
            Some(r) => format!("{} ({r})", e.backend()),
            None => format!("{}{}", e.backend(), if e.direct_io() { ", O_DIRECT" } else { "" }),
        }
    }

    fn check(&self) -> Result<(), RuntimeError> {
        match self.broken {
            true => Err(RuntimeError::OffloadStopped("an earlier read failed; make a new context".into())),
            false => Ok(()),
        }
    }

    /// Marks the run broken when `r` is an error (a half-done step leaves reads and state behind).
    fn guard<T>(&mut self, r: Result<T, RuntimeError>) -> Result<T, RuntimeError> {
        if r.is_err() {
            self.broken = true;
        }
        r
    }

    /// An attention weight matrix, from the fixed region.
    pub(crate) fn matrix(&self, w: &WeightRef) -> QMatrix<'_> {
        self.res.matrix(w)
    }

    /// Packed FFN unit `u` (a layer's FFN, or one expert's: [`crate::ModelConfig::unit`]).
    fn packed(model: &Model, u: usize) -> Result<&PackedLayer, RuntimeError> {
        model.unit(u).ok_or(RuntimeError::NotPacked)
    }

    /// Starts a decode token: its clock, and the read-ahead of its reads that do not depend on its activations
    /// ([`Offload::ahead_requests`]).
    pub(crate) fn begin_token(&mut self) -> Result<(), RuntimeError> {
        self.check()?;
        self.token_start = Some(Instant::now());
        (self.stall_ns, self.verify_ns) = (0, 0);
        let io = self.reader.engine.stats();
        self.io_at_start = (io.reads, io.bytes_read);
        if !self.plan.options.pipeline {
            return Ok(());
        }
        let mut s = lock(&self.stream);
        self.stats.ahead_bytes += s.bytes();
        s.restart();
        let r = s.refill(&self.reader);
        drop(s);
        self.guard(r)
    }

    /// A token's reads that do not depend on its activations, in the order it uses them: with thresholds, every
    /// unpinned gate block (or record, for a layer read whole), layer by layer (not for a mixture of experts,
    /// whose experts are known only after the router); then the output head's rows not in memory. The same
    /// every token.
    fn ahead_requests(
        model: &Model,
        plan: &Plan,
        res: &Resident,
        predicting: bool,
    ) -> Result<Vec<ReadRequest>, RuntimeError> {
        let mut reqs = Vec::new();
        // An expert's reads wait for the router: only a dense model's FFN is read ahead.
        if !predicting && model.config().moe.is_none() {
            for (l, lp) in plan.layers.iter().enumerate() {
                let pl = Offload::packed(model, l)?;
                let pin = &res.layers[l];
                for k in 0..pl.n_clusters() {
                    if let Some(r) = record_request(pl, pin.n_gate_clusters, pin.n_bundles, lp.read_whole, k)
                    {
                        let len = (r.end - r.start) as usize;
                        reqs.push(ReadRequest { offset: r.start, len, tag: tag(KIND_GATE, l, k) });
                    }
                }
            }
        }
        reqs.extend(Offload::head_requests(model, res.head_rows));
        Ok(reqs)
    }

    /// The reads of the output head's rows not in memory (past the first `resident`), in chunks of whole rows.
    fn head_requests(model: &Model, resident: usize) -> Vec<ReadRequest> {
        let w = &model.output;
        let rb = w.row_bytes();
        let rows = (w.range.start + resident * rb) as u64..w.range.end as u64;
        pieces(rows, (head_chunk_rows(rb) * rb) as u64, KIND_HEAD, 0).collect()
    }

    /// Ends a decode token: counts it and advances the caches' token clock.
    pub(crate) fn end_token(&mut self) {
        let n_threads = self.n_threads.max(1);
        if let Some(t0) = self.token_start.take() {
            let dt = t0.elapsed().as_secs_f64();
            let s = &mut self.stats;
            s.tokens += 1;
            s.token_seconds += dt;
            s.latencies.push(dt);
            s.stall_seconds += self.stall_ns as f64 / 1e9 / n_threads as f64;
            s.verify_seconds += self.verify_ns as f64 / 1e9 / n_threads as f64;
            let io = self.reader.engine.stats();
            s.disk_reads += io.reads - self.io_at_start.0;
            s.disk_bytes += io.bytes_read - self.io_at_start.1;
        }
        self.res.cache.advance_token();
    }

    fn decoding(&self) -> bool {
        self.token_start.is_some()
    }

    /// Writes the embedding of `token` into `out`: from the fixed region when its row is among the head's
    /// resident rows of a tied head, else read from storage and checked.
    pub(crate) fn embed(&mut self, model: &Model, token: u32, out: &mut [f32]) -> Result<(), RuntimeError> {
        self.check()?;
        let n_vocab = model.config().n_vocab;
        if token as usize >= n_vocab {
            return Err(RuntimeError::BadToken { id: token, n_vocab });
        }
        let w = &model.tok_embd;
        let rb = w.row_bytes();
        let t = token as usize;
        if self.tied && t < self.res.head_rows {
            quant::dequantize_row(w.ty, &self.res.head()[t * rb..(t + 1) * rb], out)?;
            return Ok(());
        }
        let start = (w.range.start + t * rb) as u64;
        let t0 = Instant::now();
        let want = tag(KIND_EMBD, 0, t);
        let r = self.reader.submit(&[ReadRequest { offset: start, len: rb, tag: want }], "embedding row");
        self.guard(r)?;
        let row = self.reader.wait_for(want, &|| format!("embedding row {t}"));
        let row = self.guard(row)?;
        if self.verify {
            let checked = model.checksums().verify_rows(&w.name, t, &row).map_err(|e| self.reader.corrupt(e));
            self.guard(checked)?;
        }
        if self.decoding() {
            self.stall_ns += t0.elapsed().as_nanos() as u64 * self.n_threads;
            self.stats.embd_bytes += rb as u64;
        }
        quant::dequantize_row(w.ty, &row, out)?;
        Ok(())
    }

    /// Reads FFN unit `l`'s records that are not wholly pinned (prefill: every neuron is needed by some
    /// token), checking each gate block and bundle, and returns the unit's bytes: pinned ones from the fixed
    /// region, the rest from the reads. The records of `next` (the unit the pass runs next, when known) are read
    /// ahead, as far as the I/O pool allows.
    pub(crate) fn stage_layer<'s>(
        &'s mut self,
        model: &'s Model,
        l: usize,
        next: Option<usize>,
    ) -> Result<Staged<'s>, RuntimeError> {
        self.check()?;
        let r = self.stage_reads(model, l, next);
        let pieces = self.guard(r)?;
        self.stage = pieces;
        Ok(Staged { res: &self.res, l, pieces: &self.stage })
    }

    fn stage_reads(
        &mut self,
        model: &Model,
        l: usize,
        next: Option<usize>,
    ) -> Result<Vec<ReadBuf>, RuntimeError> {
        let pl = Offload::packed(model, l)?;
        self.stage.clear();
        // The layer's reads are held together: they get buffers of their own sizes, not idle larger ones.
        if self.stage_ahead != Some(l) {
            self.reader.engine.pool().release_idle();
        }
        // The pieces read ahead for this layer (while the previous one computed), then the rest.
        let mut got: Vec<ReadBuf> = {
            let mut st = lock(&self.reader.stash);
            let ahead = st.stage_layer == Some(l);
            st.stage_layer = None;
            if ahead { std::mem::take(&mut st.stage) } else { Vec::new() }
        };
        let reqs = self.stage_requests(model, l)?;
        let mut left: Vec<usize> =
            (0..reqs.len()).filter(|&i| !got.iter().any(|b| b.offset() == reqs[i].offset)).collect();
        if self.stage_ahead != Some(l) {
            let submit: Vec<ReadRequest> = left.iter().map(|&i| reqs[i]).collect();
            self.reader.submit(&submit, "prefill layer")?;
        }
        while !left.is_empty() {
            let c = self.reader.recv()?;
            let (kind, layer, i) = untag(c.tag);
            if kind == KIND_STAGE && layer == l {
                let b = self.reader.bytes(c, &|| format!("layer {l} records"))?;
                left.retain(|&j| j != i);
                got.push(b);
            } else {
                self.reader.stash_or_fail(c)?;
            }
        }
        self.stage_ahead = None;
        self.stats.staged_bytes += got.iter().map(|b| b.len() as u64).sum::<u64>();
        // Check every gate block and bundle read.
        let pin = &self.res.layers[l];
        for b in got.iter().filter(|_| self.verify) {
            for k in (0..pl.n_clusters()).filter(|&k| {
                let r = pl.record_range(k);
                r.start >= b.offset() && r.start < b.offset() + b.len() as u64
            }) {
                let at = |r: std::ops::Range<u64>| {
                    let s = (r.start - b.offset()) as usize;
                    &b[s..s + (r.end - r.start) as usize]
                };
                if k >= pin.n_gate_clusters {
                    pl.verify_gate_block(k, at(pl.gate_block_range(k)))
                        .map_err(|e| self.reader.corrupt(e))?;
                }
                let first = k * pl.cluster_neurons;
                for pos in first.max(pin.n_bundles)..first + pl.cluster_len(k) {
                    pl.verify_bundle(pos, at(pl.bundle_range(pos))).map_err(|e| self.reader.corrupt(e))?;
                }
            }
        }
        got.sort_by_key(|b| b.offset());
        // Read the next unit ahead while this one computes.
        if let Some(u) = next {
            let reqs = self.stage_requests(model, u)?;
            lock(&self.reader.stash).stage_layer = Some(u);
            self.reader.submit(&reqs, "prefill read-ahead")?;
            self.stage_ahead = Some(u);
        }
        Ok(got)
    }

    /// Prefill's reads of layer `l`: runs of records not wholly pinned, each at most a piece, cut at record
    /// boundaries (so that every gate block and bundle lies in one read).
    fn stage_requests(&self, model: &Model, l: usize) -> Result<Vec<ReadRequest>, RuntimeError> {
        let pl = Offload::packed(model, l)?;
        let pin = &self.res.layers[l];
        let c = pl.cluster_neurons;
        let piece = self.reader.piece().max(pl.stride());
        let mut reqs: Vec<ReadRequest> = Vec::new();
        for k in 0..pl.n_clusters() {
            let pinned = k < pin.n_gate_clusters && k * c + pl.cluster_len(k) <= pin.n_bundles;
            if pinned {
                continue;
            }
            let r = pl.record_range(k);
            match reqs.last_mut() {
                Some(last)
                    if last.offset + last.len as u64 == r.start
                        && last.len as u64 + (r.end - r.start) <= piece =>
                {
                    last.len += (r.end - r.start) as usize;
                }
                _ => {
                    let i = reqs.len();
                    reqs.push(ReadRequest {
                        offset: r.start,
                        len: (r.end - r.start) as usize,
                        tag: tag(KIND_STAGE, l, i),
                    });
                }
            }
        }
        Ok(reqs)
    }

    /// The output head for the `n` rows of `acts` (quantized for the head's type): the resident rows through
    /// `matmul` from the fixed region, the rest from storage in chunks (read ahead when decoding), each checked
    /// and multiplied as it arrives. `out` is token-major (`n x n_vocab`).
    pub(crate) fn head(
        &mut self,
        model: &Model,
        matmul: &dyn Fn(&QMatrix<'_>, &QuantizedActs, &mut [f32]),
        acts: &QuantizedActs,
        out: &mut [f32],
        tmp: &mut Vec<f32>,
    ) -> Result<(), RuntimeError> {
        self.check()?;
        let r = self.head_inner(model, matmul, acts, out, tmp);
        self.guard(r)
    }

    fn head_inner(
        &mut self,
        model: &Model,
        matmul: &dyn Fn(&QMatrix<'_>, &QuantizedActs, &mut [f32]),
        acts: &QuantizedActs,
        out: &mut [f32],
        tmp: &mut Vec<f32>,
    ) -> Result<(), RuntimeError> {
        // Prefill's last layer is done: its reads go back to the pool before the head's come in.
        self.stage.clear();
        let w = &model.output;
        let n_vocab = w.n_rows;
        let n = acts.n_rows();
        let rb = w.row_bytes();
        let resident = self.res.head_rows;
        let rows_into = |data: &[u8], row0: usize, rows: usize, out: &mut [f32], tmp: &mut Vec<f32>| {
            let m = QMatrix { ty: w.ty, n_rows: rows, n_cols: w.n_cols, data };
            if n == 1 {
                matmul(&m, acts, &mut out[row0..row0 + rows]);
            } else {
                tmp.resize(n * rows, 0.0);
                matmul(&m, acts, tmp);
                for t in 0..n {
                    out[t * n_vocab + row0..t * n_vocab + row0 + rows]
                        .copy_from_slice(&tmp[t * rows..(t + 1) * rows]);
                }
            }
        };
        if resident > 0 {
            rows_into(&self.res.head()[..resident * rb], 0, resident, out, tmp);
        }
        if resident == n_vocab {
            return Ok(());
        }
        let chunk_rows = head_chunk_rows(rb);
        let reqs = Offload::head_requests(model, resident);
        // Read ahead by the stream when decoding with the pipeline; otherwise read now.
        let streamed = { lock(&self.stream).has(tag(KIND_HEAD, 0, 0)) } && self.decoding();
        if !streamed {
            self.reader.submit(&reqs, "output head rows")?;
        }
        let mut done = vec![false; reqs.len()];
        let mut left = reqs.len();
        while left > 0 {
            // Chunks that already arrived, then wait for the next.
            let ready: Vec<(usize, ReadBuf)> = {
                let mut st = lock(&self.reader.stash);
                st.head.iter_mut().enumerate().filter_map(|(i, b)| b.take().map(|b| (i, b))).collect()
            };
            let mut bufs = ready;
            if bufs.is_empty() {
                let t0 = Instant::now();
                let c = self.reader.recv()?;
                let waited = t0.elapsed().as_nanos() as u64;
                if self.decoding() {
                    // The main thread waited while the pool's other threads idled too.
                    self.stall_ns += waited * self.n_threads;
                }
                let (kind, _, i) = untag(c.tag);
                if kind != KIND_HEAD {
                    self.reader.stash_or_fail(c)?;
                    continue;
                }
                bufs.push((i, self.reader.bytes(c, &|| format!("output head chunk {i}"))?));
            }
            for (i, buf) in bufs {
                if i >= done.len() || done[i] {
                    return Err(RuntimeError::OffloadStopped(format!("output head chunk {i} arrived twice")));
                }
                let r0 = resident + i * chunk_rows;
                let t0 = Instant::now();
                if self.verify {
                    model.checksums().verify_rows(&w.name, r0, &buf).map_err(|e| self.reader.corrupt(e))?;
                }
                self.verify_ns += t0.elapsed().as_nanos() as u64;
                rows_into(&buf, r0, buf.len() / rb, out, tmp);
                if self.decoding() {
                    self.stats.head_bytes += buf.len() as u64;
                }
                if streamed {
                    let mut s = lock(&self.stream);
                    s.consumed(buf.offset(), buf.len());
                    drop(buf);
                    s.refill(&self.reader)?;
                }
                done[i] = true;
                left -= 1;
            }
        }
        Ok(())
    }

    /// One decode token's FFN of packed layer `l`: the five-stage pipeline (or, without `pipeline`, its
    /// stages one after another). Returns the number of active neurons.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn decode_ffn(
        &mut self,
        model: &Model,
        l: usize,
        spec: &SparseFfn,
        token: &TokenActs<'_>,
        filter: Filter<'_>,
        pool: &SpinPool,
        out: &mut [f32],
    ) -> Result<usize, RuntimeError> {
        self.check()?;
        let r = self.decode_ffn_inner(model, l, spec, token, filter, pool, out);
        self.guard(r)
    }

    #[allow(clippy::too_many_arguments)]
    fn decode_ffn_inner(
        &mut self,
        model: &Model,
        l: usize,
        spec: &SparseFfn,
        token: &TokenActs<'_>,
        filter: Filter<'_>,
        pool: &SpinPool,
        out: &mut [f32],
    ) -> Result<usize, RuntimeError> {
        let mask = filter.mask;
        let pl = Offload::packed(model, l)?;
        let nc = pl.n_clusters();
        if self.sums.as_ref().is_none_or(|s| s.n_clusters() != nc || s.d_model() != pl.d_model) {
            self.sums = Some(ClusterSums::new(nc, pl.d_model));
        }
        self.bufs.resize_with(nc.max(self.bufs.len()), ClBufs::default);
        let opts = &self.plan.options;
        let mode = LayerMode {
            whole: self.plan.layers[l].read_whole && mask.is_none(),
            bundle: opts.bundle,
            serial: !opts.pipeline,
            verify: self.verify,
        };
        let streamed = opts.pipeline && mask.is_none() && model.config().moe.is_none();
        let counters = Counters::default();
        let mut queue = std::mem::take(&mut self.queue);
        queue.clear();
        let sched = Mutex::new(Sched::new(queue));
        let cold = self.res.cache.cold(l)?;
        let mut run = LayerRun {
            pl,
            l,
            spec,
            token,
            filter,
            res: &self.res,
            reader: &self.reader,
            stream: &self.stream,
            cold,
            cls: &[],
            sched: &sched,
            counters: &counters,
            mode,
            scratch: &self.scratch,
            deferred: Mutex::new(Vec::new()),
            in_flight: AtomicUsize::new(0),
            n_need: 0,
        };
        // GIO: set up each cluster; what the stream read ahead is taken from the stash, the rest is submitted.
        let mut reqs = Vec::new();
        let mut cls = Vec::with_capacity(nc);
        for (k, b) in self.bufs.iter_mut().take(nc).enumerate() {
            cls.push(Mutex::new(run.start_cluster(k, std::mem::take(b), streamed, &mut reqs)?));
        }
        let outstanding: usize = cls.iter().map(|c| lock(c).gate_pending() as usize).sum();
        run.n_need = cls.iter().filter(|c| lock(c).need()).count();
        for (k, c) in cls.iter().enumerate() {
            let c = lock(c);
            if c.need() && c.gate_pending() == 0 {
                lock(&sched).queue.push_back(Task::Gate(k));
            }
        }
        run.in_flight.store(outstanding, Ordering::Release);
        run.cls = &cls;
        let result = (|| {
            self.reader.submit(&reqs, "gate reads")?;
            if streamed {
                lock(&self.stream).refill(&self.reader)?;
            }
            let sums =
                self.sums.as_mut().ok_or_else(|| RuntimeError::OffloadStopped("no cluster sums".into()))?;
            sums.reset();
            if opts.pipeline {
                let slots = sums.shared();
                pool.run(&|thread, _| run.worker(&slots, thread));
                run.take_error().map_or(Ok(()), Err)
            } else {
                run.staged(pool, sums, outstanding)
            }
        })();
        let active = counters.active.load(Ordering::Relaxed);
        drop(run);
        LayerRun::into_bufs(cls, &mut self.bufs);
        self.queue = sched.into_inner().unwrap_or_else(|e| e.into_inner()).into_queue();
        result?;
        if let Some(sums) = &self.sums {
            sums.reduce_into(out);
        }
        let decoding = self.decoding();
        let s = &mut self.stats;
        s.gate_bytes += counters.gate_bytes.load(Ordering::Relaxed);
        s.bundle_bytes += counters.bundle_bytes.load(Ordering::Relaxed);
        s.pinned_hits += counters.pinned.load(Ordering::Relaxed);
        s.lru_hits += counters.lru.load(Ordering::Relaxed);
        s.misses += counters.misses.load(Ordering::Relaxed);
        s.gate_hits += counters.gate_hits.load(Ordering::Relaxed);
        s.gate_misses += counters.gate_misses.load(Ordering::Relaxed);
        s.neurons_per_layer[l] += active as u64;
        if decoding {
            s.unit_uses += 1;
            let read =
                counters.gate_bytes.load(Ordering::Relaxed) + counters.bundle_bytes.load(Ordering::Relaxed);
            s.unit_hits += u64::from(read == 0);
        }
        self.stall_ns += counters.stall_ns.load(Ordering::Relaxed);
        self.verify_ns += counters.verify_ns.load(Ordering::Relaxed);
        Ok(active)
    }
}

/// A prefill layer's bytes: pinned gate blocks and bundles from the fixed region, the rest from its reads.
pub(crate) struct Staged<'a> {
    res: &'a Resident,
    l: usize,
    pieces: &'a [ReadBuf],
}

impl<'a> Staged<'a> {
    fn get(&self, r: std::ops::Range<u64>) -> &'a [u8] {
        let i = self.pieces.partition_point(|b| b.offset() <= r.start).saturating_sub(1);
        let b = &self.pieces[i];
        let s = (r.start - b.offset()) as usize;
        &b[s..s + (r.end - r.start) as usize]
    }
}

impl<'a> Staged<'a> {
    /// Cluster `k`'s gate block and bundles: from the fixed region when the cluster is wholly pinned (its
    /// pinned bundles are one entry, back to back), else from the read of its whole record.
    pub(crate) fn cluster_rows(&self, pl: &PackedLayer, k: usize) -> ClusterRows<'a> {
        let (c, len) = (pl.cluster_neurons, pl.cluster_len(k));
        let last = k * c + len - 1;
        let (gate, bundles) = match (self.res.gate_block(self.l, k), self.res.cluster_bundles(self.l, k, len))
        {
            (Some(gate), Some(bundles)) => (gate, bundles),
            _ => {
                let first = pl.bundle_range(k * c).start;
                (self.get(pl.gate_block_range(k)), self.get(first..pl.bundle_range(last).end))
            }
        };
        ClusterRows { gate, bundles, bundle_stride: pl.bundle_bytes() }
    }
}

impl LayerBytes for Staged<'_> {
    fn gate_block(&self, pl: &PackedLayer, k: usize) -> &[u8] {
        self.res.gate_block(self.l, k).unwrap_or_else(|| self.get(pl.gate_block_range(k)))
    }

    fn bundle(&self, pl: &PackedLayer, pos: usize) -> &[u8] {
        self.res.bundle(self.l, pos).unwrap_or_else(|| self.get(pl.bundle_range(pos)))
    }
}
