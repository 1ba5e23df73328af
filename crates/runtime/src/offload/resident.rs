//! What an offloaded run keeps in memory and where: the segmented neuron cache (`pinion_cache`), its fixed
//! region loaded once from the plan (attention weights, the output head's first rows, each layer's pinned gate
//! blocks and bundles, every piece checked against its checksum as it is copied in), and its per-layer
//! neuron-level LRU regions.

use pinion_cache::{
    CacheConfig, FixedId, FixedRegionBuilder, Policy, RegionConfig, SegmentedCache, fixed_entry_bytes,
};
use pinion_exec_cpu::QMatrix;
use pinion_plan::{CachePolicy, Plan};

use crate::error::RuntimeError;
use crate::model::{Model, WeightRef};
use crate::offload::io::Reader;

/// A layer's pinned neurons in the fixed region: per cluster, its gate block and its pinned bundles.
pub(crate) struct PinnedLayer {
    /// Clusters whose gate block is pinned (a prefix).
    pub(crate) n_gate_clusters: usize,
    /// Positions whose bundle is pinned (a prefix).
    pub(crate) n_bundles: usize,
    gates: Vec<FixedId>,
    /// Per cluster holding pinned bundles: those bundles, back to back.
    bundles: Vec<FixedId>,
    bundle_bytes: usize,
    cluster_neurons: usize,
}

/// The resident part of an offloaded run.
pub(crate) struct Resident {
    pub(crate) cache: SegmentedCache,
    /// Attention weights: (file range start, entry), sorted by start.
    tensors: Vec<(usize, FixedId)>,
    /// The first `head_rows` rows of the output head.
    head: Option<FixedId>,
    pub(crate) head_rows: usize,
    pub(crate) layers: Vec<PinnedLayer>,
}

impl Resident {
    /// Loads the fixed region the plan describes through `reader`, checking every piece, and makes the LRU
    /// regions.
    pub(crate) fn load(model: &Model, plan: &Plan, reader: &Reader) -> Result<Resident, RuntimeError> {
        let packed = model.packed_layers().ok_or(RuntimeError::NotPacked)?;
        let sums = model.checksums();
        let mut capacity = 0usize;
        for l in &model.layers {
            for w in l.fixed_weights() {
                capacity += fixed_entry_bytes(w.n_bytes() as usize);
            }
        }
        let head_w = &model.output;
        let rb = head_w.row_bytes();
        capacity += fixed_entry_bytes(plan.head_rows * rb);
        for (pl, lp) in packed.iter().zip(&plan.layers) {
            for k in 0..lp.pinned_gate_clusters {
                capacity += fixed_entry_bytes(pl.cluster_len(k) * pl.gate_row_bytes());
            }
            for k in 0..lp.pinned_bundles.div_ceil(pl.cluster_neurons) {
                let n = pl.cluster_len(k).min(lp.pinned_bundles - k * pl.cluster_neurons);
                capacity += fixed_entry_bytes(n * pl.bundle_bytes());
            }
        }
        let mut fixed = FixedRegionBuilder::new(capacity);

        // Attention weights (and routers), each checked whole.
        let mut tensors = Vec::new();
        for l in &model.layers {
            for w in l.fixed_weights() {
                let id = fixed.push_with(w.n_bytes() as usize, |buf: &mut [u8]| {
                    read_into(reader, w.range.start as u64, buf, "attention weights")?;
                    sums.verify_tensor(&w.name, buf).map_err(|e| reader.corrupt(e))
                })?;
                tensors.push((w.range.start, id));
            }
        }
        tensors.sort_by_key(|t| t.0);

        // The head's first rows, checked row by row.
        let head = match plan.head_rows {
            0 => None,
            n => Some(fixed.push_with(n * rb, |buf: &mut [u8]| {
                read_into(reader, head_w.range.start as u64, buf, "output head rows")?;
                let checked = sums.verify_rows(&head_w.name, 0, buf);
                checked.map_err(|e| reader.corrupt(e))
            })?),
        };

        // Pinned gate blocks and bundles, record by record.
        let mut layers = Vec::with_capacity(packed.len());
        for (pl, lp) in packed.iter().zip(&plan.layers) {
            let c = pl.cluster_neurons;
            let (g, nb) = (lp.pinned_gate_clusters.min(pl.n_clusters()), lp.pinned_bundles.min(pl.n_ff));
            let mut pin = PinnedLayer {
                n_gate_clusters: g,
                n_bundles: nb,
                gates: Vec::with_capacity(g),
                bundles: Vec::new(),
                bundle_bytes: pl.bundle_bytes(),
                cluster_neurons: c,
            };
            let records: Vec<_> = (0..g.max(nb.div_ceil(c))).map(|k| pl.record_range(k)).collect();
            let mut gates = vec![None; g];
            let mut bundles = vec![None; nb.div_ceil(c)];
            reader.read_many(&records, "pinned neurons", &mut |k, rec| {
                let at = |r: std::ops::Range<u64>| {
                    let s = (r.start - rec.offset()) as usize;
                    &rec[s..s + (r.end - r.start) as usize]
                };
                if k < g {
                    let block = at(pl.gate_block_range(k));
                    pl.verify_gate_block(k, block).map_err(|e| reader.corrupt(e))?;
                    gates[k] = Some(fixed.push(block)?);
                }
                let first = k * c;
                if first < nb {
                    let n = pl.cluster_len(k).min(nb - first);
                    for pos in first..first + n {
                        pl.verify_bundle(pos, at(pl.bundle_range(pos))).map_err(|e| reader.corrupt(e))?;
                    }
                    let span = pl.bundle_range(first).start..pl.bundle_range(first + n - 1).end;
                    bundles[k] = Some(fixed.push(at(span))?);
                }
                Ok(())
            })?;
            pin.gates = gates.into_iter().flatten().collect();
            pin.bundles = bundles.into_iter().flatten().collect();
            layers.push(pin);
        }

        let policy = match plan.options.policy {
            CachePolicy::PowerInfer2 => Policy::Lru,
            CachePolicy::LlmFlash { window } => Policy::SlidingWindow { tokens: window.max(1) },
        };
        let partitions = packed
            .iter()
            .zip(&plan.layers)
            .map(|(pl, lp)| RegionConfig {
                entry_len: pl.bundle_bytes(),
                capacity: lp.cold_entries,
                n_keys: pl.n_ff,
            })
            .collect();
        let cache = SegmentedCache::new(fixed.build(), CacheConfig { policy, partitions })?;
        Ok(Resident { cache, tensors, head, head_rows: plan.head_rows, layers })
    }

    /// An attention weight matrix, from the fixed region.
    pub(crate) fn matrix(&self, w: &WeightRef) -> QMatrix<'_> {
        let i = self.tensors.partition_point(|t| t.0 < w.range.start);
        let id = self.tensors[i].1;
        QMatrix { ty: w.ty, n_rows: w.n_rows, n_cols: w.n_cols, data: self.cache.fixed().get(id) }
    }

    /// The output head's resident rows (`head_rows` of them, back to back).
    pub(crate) fn head(&self) -> &[u8] {
        self.head.map_or(&[], |id| self.cache.fixed().get(id))
    }

    /// Cluster `k` of layer `l`'s gate block, if pinned.
    pub(crate) fn gate_block(&self, l: usize, k: usize) -> Option<&[u8]> {
        self.layers[l].gates.get(k).map(|&id| self.cache.fixed().get(id))
    }

    /// Cluster `k` of layer `l`'s `len` bundles back to back, if all of them are pinned.
    pub(crate) fn cluster_bundles(&self, l: usize, k: usize, len: usize) -> Option<&[u8]> {
        let p = &self.layers[l];
        let whole = k * p.cluster_neurons + len <= p.n_bundles;
        whole.then(|| &self.cache.fixed().get(p.bundles[k])[..len * p.bundle_bytes])
    }

    /// The bundle at position `pos` of layer `l`, if pinned.
    pub(crate) fn bundle(&self, l: usize, pos: usize) -> Option<&[u8]> {
        let p = &self.layers[l];
        if pos >= p.n_bundles {
            return None;
        }
        let (k, j) = (pos / p.cluster_neurons, pos % p.cluster_neurons);
        let bytes = self.cache.fixed().get(p.bundles[k]);
        Some(&bytes[j * p.bundle_bytes..(j + 1) * p.bundle_bytes])
    }
}

/// Reads file bytes from `offset` into `buf` (all of it) in pieces.
pub(crate) fn read_into(
    reader: &Reader,
    offset: u64,
    buf: &mut [u8],
    what: &str,
) -> Result<(), RuntimeError> {
    let r = offset..offset + buf.len() as u64;
    reader.read_range(r, reader.piece(), what, &mut |piece| {
        let at = (piece.offset() - offset) as usize;
        buf[at..at + piece.len()].copy_from_slice(&piece);
        Ok(())
    })
}
