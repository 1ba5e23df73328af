//! Kernel selection: which instruction-set path runs, detected once per process.
//!
//! The path is chosen on first use from `is_x86_feature_detected!` and cached in a `OnceLock`; the environment
//! variable `PINION_KERNELS` (`scalar`, `avx2` or `avx512`) can force a lower path for debugging. Every SIMD
//! function is an `unsafe fn` with `#[target_feature]`, and the only calls to them are in `match` arms on a
//! [`KernelPath`] that [`KernelPath::is_supported`] has confirmed, which is what makes those calls sound.
//!
//! aarch64 currently runs the scalar path: NEON kernels cannot be tested on the x86 machines pinion is built
//! on today, and an untested kernel is worse than a slow one.

use std::sync::OnceLock;

use half::{bf16, f16};
use pinion_format::quant::{
    BlockQ2K, BlockQ3K, BlockQ4K, BlockQ5K, BlockQ6K, BlockQ8_0, BlockQ8_1, BlockQ8K,
};

pub(crate) mod scalar;

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx2;
#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512;
#[cfg(target_arch = "x86_64")]
pub(crate) mod kquants;

/// Software prefetch for one-activation (decode) tiles. A matrix-vector product walks its rows in tiles of
/// consecutive rows, each tile reading its rows block by block in step: several interleaved streams that the
/// hardware prefetchers follow poorly (Gemma 3's 262,144 x 640 Q8_0 head ran at 11 GB/s of about 30). Each block
/// step of a tile prefetches as many bytes of the next tile (which starts where the tile's last row ends) as the
/// step consumes of this one, so the next tile is in L1 when it starts.
#[cfg(target_arch = "x86_64")]
#[derive(Clone, Copy)]
pub(crate) struct NextTile {
    next: *const u8,
    step: usize,
}

#[cfg(target_arch = "x86_64")]
impl NextTile {
    /// The plan of a tile of `rows` rows of `nb` blocks of type `B`, whose last row is `last`.
    #[inline]
    pub(crate) fn after<B>(last: &[B], rows: usize, nb: usize) -> NextTile {
        NextTile { next: last.as_ptr().wrapping_add(nb).cast(), step: rows * size_of::<B>() }
    }

    /// Prefetches the next tile's share for block step `b` into L1. A prefetch is a hint: an address past
    /// the end of the weights does not fault, and no memory is read through a pointer here.
    #[inline]
    pub(crate) fn prefetch(self, b: usize) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let start = self.next.wrapping_add(b * self.step);
        let s = start as usize;
        let mut line = s & !63;
        while line < s + self.step {
            // SAFETY: a prefetch only hints the cache: it does not access memory architecturally and cannot
            // fault, whatever the address (SSE is part of x86_64).
            #[allow(unused_unsafe)]
            unsafe {
                _mm_prefetch::<_MM_HINT_T0>(start.wrapping_add(line.wrapping_sub(s)).cast())
            };
            line += 64;
        }
    }
}

/// An instruction-set path of the kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelPath {
    /// Portable Rust; the reference the others are tested against.
    Scalar,
    /// x86-64 AVX2 + FMA + F16C.
    Avx2,
    /// x86-64 AVX-512 F/BW/VL + VNNI (plus AVX2, FMA, F16C).
    Avx512,
}

impl KernelPath {
    /// Every path, slowest first.
    pub const ALL: [KernelPath; 3] = [KernelPath::Scalar, KernelPath::Avx2, KernelPath::Avx512];

    /// Whether this CPU can run the path.
    pub fn is_supported(self) -> bool {
        let f = detect();
        match self {
            KernelPath::Scalar => true,
            KernelPath::Avx2 => f.avx2 && f.fma && f.f16c,
            KernelPath::Avx512 => f.avx2 && f.fma && f.f16c && f.avx512 && f.avx512vnni,
        }
    }

    /// Lower-case name (`scalar`, `avx2`, `avx512`).
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
        }
    }
}

impl std::fmt::Display for KernelPath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// What the CPU offers and which kernel path dispatch chose, for printing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct CpuFeatures {
    /// AVX2.
    pub avx2: bool,
    /// FMA3.
    pub fma: bool,
    /// F16C (f16 <-> f32 conversion).
    pub f16c: bool,
    /// AVX-512 F, BW and VL together.
    pub avx512: bool,
    /// AVX-512 VNNI (`vpdpbusd`).
    pub avx512vnni: bool,
    /// NEON (aarch64); detected but not used yet.
    pub neon: bool,
    /// The path the kernels run.
    pub path: KernelPath,
}

impl std::fmt::Display for CpuFeatures {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "kernels: {} (avx2 {}, fma {}, f16c {}, avx512 {}, avx512vnni {}, neon {})",
            self.path, self.avx2, self.fma, self.f16c, self.avx512, self.avx512vnni, self.neon
        )
    }
}

/// Raw CPU feature flags.
#[derive(Clone, Copy, Default)]
struct Flags {
    avx2: bool,
    fma: bool,
    f16c: bool,
    avx512: bool,
    avx512vnni: bool,
    neon: bool,
}

fn detect() -> Flags {
    static FLAGS: OnceLock<Flags> = OnceLock::new();
    *FLAGS.get_or_init(|| {
        #[allow(unused_mut)]
        let mut f = Flags::default();
        #[cfg(target_arch = "x86_64")]
        {
            f.avx2 = is_x86_feature_detected!("avx2");
            f.fma = is_x86_feature_detected!("fma");
            f.f16c = is_x86_feature_detected!("f16c");
            f.avx512 = is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("avx512vl");
            f.avx512vnni = is_x86_feature_detected!("avx512vnni");
        }
        #[cfg(target_arch = "aarch64")]
        {
            f.neon = std::arch::is_aarch64_feature_detected!("neon");
        }
        f
    })
}

/// The path the kernels run: the best supported one, or a lower one forced with `PINION_KERNELS`.
pub(crate) fn chosen() -> KernelPath {
    static CHOSEN: OnceLock<KernelPath> = OnceLock::new();
    *CHOSEN.get_or_init(|| {
        let best = KernelPath::ALL.into_iter().rev().find(|p| p.is_supported()).unwrap_or(KernelPath::Scalar);
        match std::env::var("PINION_KERNELS").ok().as_deref() {
            Some(name) => {
                KernelPath::ALL.into_iter().find(|p| p.name() == name && p.is_supported()).unwrap_or(best)
            }
            None => best,
        }
    })
}

/// What the CPU offers and which path dispatch chose.
pub fn cpu_features() -> CpuFeatures {
    let f = detect();
    CpuFeatures {
        avx2: f.avx2,
        fma: f.fma,
        f16c: f.f16c,
        avx512: f.avx512,
        avx512vnni: f.avx512vnni,
        neon: f.neon,
        path: chosen(),
    }
}

/// Panics unless `path` can run here (forcing an unsupported path is a programming error).
pub(crate) fn check(path: KernelPath) {
    assert!(path.is_supported(), "kernel path {path} is not supported by this CPU");
}

/// Quantizes a row to Q8_0 (all paths give the same bits).
pub(crate) fn quantize_q8_0(path: KernelPath, x: &[f32], out: &mut [BlockQ8_0]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::Avx512 => {
            // SAFETY: callers pass only supported paths (`check`), and both imply AVX2 and F16C.
            unsafe { avx2::quantize_row_q8_0(x, out) }
        }
        _ => scalar::quantize_row_q8_0(x, out),
    }
}

/// Quantizes a row to Q8_K (all paths give the same bits).
pub(crate) fn quantize_q8k(path: KernelPath, x: &[f32], out: &mut [BlockQ8K]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::Avx512 => {
            // SAFETY: callers pass only supported paths (`check`), and both imply AVX2.
            unsafe { avx2::quantize_row_q8k(x, out) }
        }
        _ => scalar::quantize_row_q8k(x, out),
    }
}

/// A Q8_K block with each 32-value group permuted as the x86 K-quant tiles take it: 32-bit word `l` of a
/// group holds its values `l, l + 8, l + 16, l + 24` (see [`kquants`]); `d` and `bsums` unchanged.
#[cfg(target_arch = "x86_64")]
pub(crate) fn permute_q8k(b: &BlockQ8K) -> BlockQ8K {
    let mut qs = [0i8; pinion_format::quant::QK_K];
    for (out, group) in qs.chunks_exact_mut(32).zip(b.qs.chunks_exact(32)) {
        for (i, o) in out.iter_mut().enumerate() {
            *o = group[i / 4 + 8 * (i % 4)];
        }
    }
    BlockQ8K { d: b.d, qs, bsums: b.bsums }
}

/// Quantizes a row to Q8_1 (all paths give the same bits).
pub(crate) fn quantize_q8_1(path: KernelPath, x: &[f32], out: &mut [BlockQ8_1]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::Avx512 => {
            // SAFETY: callers pass only supported paths (`check`), and both imply AVX2 and F16C.
            unsafe { avx2::quantize_row_q8_1(x, out) }
        }
        _ => scalar::quantize_row_q8_1(x, out),
    }
}

/// f32 dot product (all paths give the same bits).
pub(crate) fn vec_dot_f32(path: KernelPath, x: &[f32], y: &[f32]) -> f32 {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::Avx512 => {
            // SAFETY: callers pass only supported paths (`check`), and both imply AVX2 and FMA.
            unsafe { avx2::vec_dot_f32(x, y) }
        }
        _ => scalar::vec_dot_f32(x, y),
    }
}

/// f16 dot product (all paths give the same bits).
pub(crate) fn vec_dot_f16(path: KernelPath, x: &[f16], y: &[f16]) -> f32 {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::Avx512 => {
            // SAFETY: callers pass only supported paths (`check`), and both imply AVX2, FMA and F16C.
            unsafe { avx2::vec_dot_f16(x, y) }
        }
        _ => scalar::vec_dot_f16(x, y),
    }
}

/// What the x86 K-quant tiles need of a block type (nothing elsewhere).
#[cfg(target_arch = "x86_64")]
use kquants::KBlock as KSimd;
/// What the x86 K-quant tiles need of a block type (nothing elsewhere).
#[cfg(not(target_arch = "x86_64"))]
pub(crate) trait KSimd: bytemuck::Pod {}
#[cfg(not(target_arch = "x86_64"))]
impl KSimd for BlockQ2K {}
#[cfg(not(target_arch = "x86_64"))]
impl KSimd for BlockQ3K {}
#[cfg(not(target_arch = "x86_64"))]
impl KSimd for BlockQ4K {}
#[cfg(not(target_arch = "x86_64"))]
impl KSimd for BlockQ5K {}
#[cfg(not(target_arch = "x86_64"))]
impl KSimd for BlockQ6K {}

/// A K-quant weight block type (Q2_K to Q6_K), whose dot products are taken with Q8_K activations.
pub(crate) trait KQuant: KSimd {
    /// The scalar dot product of a row with a Q8_K row (the reference).
    fn vec_dot(x: &[Self], y: &[BlockQ8K]) -> f32;
}

impl KQuant for BlockQ2K {
    fn vec_dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        scalar::vec_dot_q2k_q8k(x, y)
    }
}
impl KQuant for BlockQ3K {
    fn vec_dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        scalar::vec_dot_q3k_q8k(x, y)
    }
}
impl KQuant for BlockQ4K {
    fn vec_dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        scalar::vec_dot_q4k_q8k(x, y)
    }
}
impl KQuant for BlockQ5K {
    fn vec_dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        scalar::vec_dot_q5k_q8k(x, y)
    }
}
impl KQuant for BlockQ6K {
    fn vec_dot(x: &[Self], y: &[BlockQ8K]) -> f32 {
        scalar::vec_dot_q6k_q8k(x, y)
    }
}

/// K-quant dot products of `R` weight rows with `C` Q8_K activation rows over their first `nb` blocks, into
/// `out[r][c]` (all paths give the same bits). The activation rows are in `path`'s layout
/// ([`crate::QuantizedActs::q8k_for`]: groups permuted on the x86 SIMD paths).
///
/// # Panics
/// If a row holds fewer than `nb` blocks.
pub(crate) fn tile_k<B: KQuant, const R: usize, const C: usize>(
    path: KernelPath,
    w: [&[B]; R],
    a: [&[BlockQ8K]; C],
    nb: usize,
    out: &mut [[f32; C]; R],
) {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => {
            // SAFETY: callers pass only supported paths (`check`), and AVX-512 implies AVX-512F/BW, AVX2, FMA
            // and F16C; the tile checks the row lengths.
            unsafe { kquants::tile_avx512(w, a, nb, out) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => {
            // SAFETY: callers pass only supported paths (`check`), and AVX2 implies AVX2, FMA and F16C; the tile
            // checks the row lengths.
            unsafe { kquants::tile_avx2(w, a, nb, out) }
        }
        _ => {
            for (o, wr) in out.iter_mut().zip(w) {
                for (o, ar) in o.iter_mut().zip(a) {
                    *o = B::vec_dot(&wr[..nb], &ar[..nb]);
                }
            }
        }
    }
}

/// bf16 dot product (all paths give the same bits).
pub(crate) fn vec_dot_bf16(path: KernelPath, x: &[bf16], y: &[bf16]) -> f32 {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 => {
            // SAFETY: callers pass only supported paths (`check`), and AVX-512 implies AVX-512F, AVX2 and FMA.
            unsafe { avx512::vec_dot_bf16(x, y) }
        }
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 => {
            // SAFETY: callers pass only supported paths (`check`), and AVX2 implies AVX2 and FMA.
            unsafe { avx2::vec_dot_bf16(x, y) }
        }
        _ => scalar::vec_dot_bf16(x, y),
    }
}

/// Attention scores against `out.len()` keys of stride `stride` (all paths give the same bits).
pub(crate) fn scores_f16(path: KernelPath, q: &[f32], k: &[f16], stride: usize, out: &mut [f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::Avx512 => {
            // SAFETY: callers pass only supported paths (`check`), and both imply AVX2, FMA and F16C.
            unsafe { avx2::scores_f16(q, k, stride, out) }
        }
        _ => scalar::scores_f16(q, k, stride, out),
    }
}

/// Probability-weighted sum of `p.len()` value rows of stride `stride` (all paths give the same bits).
pub(crate) fn wsum_f16(path: KernelPath, p: &[f32], v: &[f16], stride: usize, out: &mut [f32]) {
    match path {
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 | KernelPath::Avx512 => {
            // SAFETY: callers pass only supported paths (`check`), and both imply AVX2, FMA and F16C.
            unsafe { avx2::wsum_f16(p, v, stride, out) }
        }
        _ => scalar::wsum_f16(p, v, stride, out),
    }
}
