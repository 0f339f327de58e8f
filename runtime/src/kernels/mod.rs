//! CPU kernels: the matrix product for every weight dtype, and the small element-wise ops
//! (RMSNorm, RoPE, softmax, SiLU).
//!
//! # Interface
//!
//! Everything heavy goes through [`matmul`]: `y[T, out] = x[T, in] · W[out, in]ᵀ` with `W` a
//! [`MatRef`] in f32, f16, bf16 or Q8_0, borrowed straight from the mapped file. Work is split
//! across threads by a [`Parallel`] implementation ([`Serial`] without `std`; a per-session
//! thread pool with it), always by *rows of W*, so a thread streams its own part of the
//! weights and the result does not depend on the number of threads.
//!
//! Inputs used by several products (q/k/v; an MLP's gate and up) are wrapped once in [`Acts`],
//! so Q8_0 quantizes them once; [`matmul_glu`] computes gate, up and the activation in one
//! threaded pass; [`gemv_many`] runs the selected experts of a decoding step, or its q, k
//! and v, in one pass (one fork/join per layer phase instead of one per matrix). The pool
//! (`ThreadPool`) makes the calling thread work too and keeps its workers spinning briefly
//! between jobs: a decode step is ~50 fork/joins (six per layer).
//!
//! f32 / f16 / bf16: inside one thread the product is blocked: a tile of [`TILE_ROWS`] rows ×
//! [`TILE_COLS`] columns of `W` is decoded to f32 (≈ 16 KiB, stays in L1) and then used
//! against every token's matching slice of `x`, so in prompt processing each weight byte is
//! read from memory once per tile and reused across all `T` tokens.
//!
//! Q8_0: the weights are never decoded. The activations are quantized once per matmul to
//! int8 per 32-block (see *Numerics*), and each output is a sum of int8·int8 block dot
//! products (int32, exact) scaled by the two block scales, like ggml's `q8_0 × q8_0`
//! `vec_dot`. A register-blocked micro-kernel computes 4 weight rows × 2–4 tokens at once
//! (each loaded block reused across them, one horizontal sum per output at the end); decode
//! (`T = 1`) is the same kernel over 4 rows × 1 token, which prefetches the next 4 rows. It is
//! chosen once per matmul by CPU feature detection: AVX-512 VNNI, AVX-VNNI or AVX2 (F16C for
//! the scales) on x86-64, `smmla` (i8mm), `sdot` or plain NEON on aarch64, and a portable
//! scalar loop everywhere else (and without `std`, unless the target enables them at compile
//! time). A pass over the rows keeps ≤ 256 KiB of activations in L2.
//!
//! # Numerics
//!
//! f32 / f16 / bf16 weights are converted to f32 and all products and sums are f32.
//! Each output element is `Σ_tiles dot(tile_row, x_slice)` with `dot` summing 8 interleaved
//! partial sums.
//!
//! Q8_0 weights multiply *quantized activations*: each 32-block of `x` becomes
//! `q = round(x / dx)` (half away from zero, |q| ≤ 127) with `dx = max|x_block| / 127` kept in
//! f32, and a block contributes `(dw · dx) · Σ q_w·q_x`. So besides the weights' own
//! quantization error there is now an activation error of at most `dx/2` per element
//! (relative ≈ 0.4 % of the block's largest |x|), as in llama.cpp's Q8_0 CPU path; the
//! result is no longer the f32 product of the dequantized weights. The file format is
//! unchanged. The block sums are exact in every implementation; the SIMD versions keep
//! lane-wise f32 partial sums over the whole row, so they differ from the portable loop by
//! f32 rounding only. One machine always runs the same implementation.
//!
//! In every dtype the summation order depends only on `in`, never on `T`, the thread count
//! or the row split, so prompt processing and token-by-token decoding give bitwise
//! identical results.
//!
//! # Files
//!
//! As in tract's `linalg`, the frame never names an instruction set: this file (the matmul
//! drivers), `q8.rs` (Q8_0 activations, the kernel record and its tile driver), `heads.rs`
//! (the attention loops' interface), `ops.rs` (element-wise ops) and `pool.rs` (threads).
//! The kernels themselves are in `portable.rs` (plain Rust, every CPU) and in one file per
//! architecture, `x86_64.rs`, `aarch64.rs` and `other.rs` (none), which all offer the same few
//! functions: the kernels their CPU runs, detected at run time (with `std`) or at compile
//! time.

mod heads;
mod ops;
mod portable;
mod q4;
mod q8;

// One file per architecture, each with the same functions (`prefetch`, `q8_kernels`,
// `quantize`, `f16_to_f32`, `run_heads`), used as `arch`: the code in this folder's other
// files never names an instruction set.
#[cfg(target_arch = "aarch64")]
mod aarch64;
#[cfg(target_arch = "aarch64")]
use aarch64 as arch;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
mod other;
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
use other as arch;
#[cfg(target_arch = "x86_64")]
mod x86_64;
#[cfg(target_arch = "x86_64")]
use x86_64 as arch;

pub(crate) use heads::{HeadJob, HeadLoops, run_heads};
#[cfg(test)]
pub(crate) use portable::Portable;

pub use ops::{
    add_into, exp, rmsnorm, rmsnorm_in_place, rope_rotate_half, rope_rotate_pairs, silu, silu_mul, softmax_in_place,
};

use crate::format::DType;
use crate::quant::QK;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use half::f16;

/// Rows of `W` decoded together.
pub const TILE_ROWS: usize = 16;
/// Columns of `W` decoded together (a multiple of the Q8_0 block, 32).
pub const TILE_COLS: usize = 256;
/// Below this many multiply-adds a matmul runs on the calling thread.
pub const PARALLEL_MIN_MACS: usize = 1 << 15;

/// Runs independent pieces of work, possibly on several threads.
///
/// Implementations must call `f` exactly once for every chunk; the order and the thread
/// are free. Results must not depend on them (the kernels guarantee this by writing each
/// output element from exactly one chunk).
pub trait Parallel: Sync {
    /// How many threads work at once (1 for [`Serial`]).
    fn threads(&self) -> usize;
    /// Splits `out` into consecutive chunks of `chunk` values (the last may be shorter) and
    /// calls `f(chunk_index, chunk)` for each.
    fn for_each_chunk(&self, out: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync));
}

/// Everything on the calling thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct Serial;

impl Parallel for Serial {
    fn threads(&self) -> usize {
        1
    }
    fn for_each_chunk(&self, out: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
        for (i, c) in out.chunks_mut(chunk.max(1)).enumerate() {
            f(i, c);
        }
    }
}

#[cfg(feature = "std")]
mod pool;
#[cfg(feature = "std")]
pub use pool::{ThreadPool, default_threads};

/// A weight matrix `[rows, cols]` (row-major, `[out, in]`) in one of the file's dtypes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatRef<'a> {
    dtype: DType,
    rows: usize,
    cols: usize,
    data: &'a [u8],
}

impl<'a> MatRef<'a> {
    /// Wraps `data` as a `[rows, cols]` matrix of `dtype`, or `None` if the length does not
    /// match exactly (or the shape is empty).
    pub fn new(dtype: DType, rows: usize, cols: usize, data: &'a [u8]) -> Option<Self> {
        if rows == 0 || cols == 0 {
            return None;
        }
        let len = dtype.byte_len(&[rows as u64, cols as u64])?;
        (len == data.len() as u64).then_some(Self { dtype, rows, cols, data })
    }
    /// A matrix whose length was checked by [`MatRef::new`] before (at model open).
    pub(crate) fn validated(dtype: DType, rows: usize, cols: usize, data: &'a [u8]) -> Self {
        debug_assert!(Self::new(dtype, rows, cols, data).is_some());
        Self { dtype, rows, cols, data }
    }
    pub fn dtype(&self) -> DType {
        self.dtype
    }
    pub fn rows(&self) -> usize {
        self.rows
    }
    pub fn cols(&self) -> usize {
        self.cols
    }
    /// The raw bytes (touching them pages them in).
    pub fn bytes(&self) -> &'a [u8] {
        self.data
    }

    /// Decodes row `r` into `out` (`cols` values). Used for embedding lookup.
    ///
    /// # Panics
    /// If `r >= rows` or `out.len() != cols` (caller bug; token ids are checked before).
    pub fn row(&self, r: usize, out: &mut [f32]) {
        assert!(r < self.rows && out.len() == self.cols, "MatRef::row: out of range");
        decode(self, r, 1, 0, self.cols, out);
    }
}

#[inline]
fn f32_le(b: &[u8]) -> f32 {
    f32::from_le_bytes([b[0], b[1], b[2], b[3]])
}

/// Reads a little-endian f32 vector (norm weights, biases) into `out`.
///
/// # Panics
/// If `bytes.len() != 4 * out.len()` (caller bug: shapes are validated at open).
pub fn read_f32s(bytes: &[u8], out: &mut [f32]) {
    assert_eq!(bytes.len(), out.len() * 4, "read_f32s: length mismatch");
    for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
        *o = f32_le(b);
    }
}

/// The weight bytes as f32 values, when they can be used in place (little-endian target,
/// 4-byte aligned: always so for a memory-mapped file, whose tensors start at 64-byte offsets).
fn as_f32s(data: &[u8]) -> Option<&[f32]> {
    if cfg!(target_endian = "little") { bytemuck::try_cast_slice(data).ok() } else { None }
}

/// The bytes as f16 values, under the same conditions.
fn as_f16s(data: &[u8]) -> Option<&[f16]> {
    if cfg!(target_endian = "little") { bytemuck::try_cast_slice(data).ok() } else { None }
}

/// `out[i] = h[i]` as f32 (exact), vectorised by the architecture's code where it has some
/// (detected once per call; `half`'s slice conversion pays a call and a detection per 8
/// values).
pub(crate) fn f16_to_f32(h: &[f16], out: &mut [f32]) {
    if !arch::f16_to_f32(h, out) {
        half::slice::HalfFloatSliceExt::convert_to_f32_slice(h, out);
    }
}

/// Decodes rows `r0..r0+nr`, columns `c0..c0+nc` of `w` into `out` (`nr × nc`, row-major).
/// `c0` must be a multiple of 32 for the block dtypes.
pub fn decode(w: &MatRef<'_>, r0: usize, nr: usize, c0: usize, nc: usize, out: &mut [f32]) {
    let cols = w.cols;
    debug_assert!(r0 + nr <= w.rows && c0 + nc <= cols && out.len() >= nr * nc);
    match w.dtype {
        DType::F32 => {
            for r in 0..nr {
                let src = &w.data[((r0 + r) * cols + c0) * 4..][..nc * 4];
                for (o, b) in out[r * nc..][..nc].iter_mut().zip(src.chunks_exact(4)) {
                    *o = f32_le(b);
                }
            }
        }
        DType::F16 => {
            let all = as_f16s(w.data);
            for r in 0..nr {
                let at = (r0 + r) * cols + c0;
                let o = &mut out[r * nc..][..nc];
                match all {
                    // Vectorised (F16C) when the CPU has it; exact either way.
                    Some(h) => f16_to_f32(&h[at..at + nc], o),
                    None => {
                        for (o, b) in o.iter_mut().zip(w.data[at * 2..][..nc * 2].chunks_exact(2)) {
                            *o = f16::from_le_bytes([b[0], b[1]]).to_f32();
                        }
                    }
                }
            }
        }
        DType::BF16 => {
            for r in 0..nr {
                let src = &w.data[((r0 + r) * cols + c0) * 2..][..nc * 2];
                for (o, b) in out[r * nc..][..nc].iter_mut().zip(src.chunks_exact(2)) {
                    // bf16 is the high half of an f32.
                    *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
                }
            }
        }
        DType::Q8_0 => {
            debug_assert!(c0.is_multiple_of(QK));
            let nb = cols.div_ceil(QK);
            let stride = nb * QK;
            let soff = (w.rows * stride).div_ceil(64) * 64;
            for r in 0..nr {
                let row = r0 + r;
                let q = &w.data[row * stride + c0..][..nc];
                let s = &w.data[soff + row * nb * 2..][..nb * 2];
                let o = &mut out[r * nc..][..nc];
                for (bi, (ob, qb)) in o.chunks_mut(QK).zip(q.chunks(QK)).enumerate() {
                    let b = c0 / QK + bi;
                    let d = f16::from_le_bytes([s[2 * b], s[2 * b + 1]]).to_f32();
                    if let (Ok(ob), Ok(qb)) = (<&mut [f32; QK]>::try_from(&mut *ob), <&[u8; QK]>::try_from(qb)) {
                        // Whole block: fixed length, so the loop vectorises.
                        for i in 0..QK {
                            ob[i] = f32::from(qb[i] as i8) * d;
                        }
                    } else {
                        for (x, &v) in ob.iter_mut().zip(qb) {
                            *x = f32::from(v as i8) * d;
                        }
                    }
                }
            }
        }
        DType::Q4_0 | DType::MXFP4 => {
            debug_assert!(c0.is_multiple_of(QK));
            let mut row = vec![0.0f32; cols];
            for r in 0..nr {
                crate::quant::dequantize_row_as(w.dtype, w.data, w.rows, cols, r0 + r, &mut row);
                out[r * nc..][..nc].copy_from_slice(&row[c0..c0 + nc]);
            }
        }
    }
}

/// A tile of `w` (rows `r0..r0+nr`, columns `c0..c0+nc`) as f32: `(values, row stride)`,
/// row `r` being `values[r * stride..][..nc]`. f32 weights are used in place when possible,
/// everything else is decoded into `buf`.
fn tile<'t>(w: &MatRef<'t>, r0: usize, nr: usize, c0: usize, nc: usize, buf: &'t mut [f32]) -> (&'t [f32], usize) {
    if w.dtype == DType::F32
        && let Some(all) = as_f32s(w.data)
    {
        return (&all[r0 * w.cols + c0..], w.cols);
    }
    decode(w, r0, nr, c0, nc, buf);
    (buf, nc)
}

/// `Σ a[i]·b[i]` over 8 interleaved f32 partial sums (vectorises; fixed order).
#[inline]
pub fn dot(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut acc = [0.0f32; 8];
    let (ac, bc) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ar, br) = (ac.remainder(), bc.remainder());
    for (x, y) in ac.zip(bc) {
        for i in 0..8 {
            acc[i] += x[i] * y[i];
        }
    }
    let mut tail = 0.0f32;
    for (x, y) in ar.iter().zip(br) {
        tail += x * y;
    }
    ((acc[0] + acc[4]) + (acc[1] + acc[5])) + ((acc[2] + acc[6]) + (acc[3] + acc[7])) + tail
}

/// Rows of `W` one parallel task takes (a multiple of [`TILE_ROWS`], ≈ 4 tasks per thread).
fn rows_per_task(rows: usize, threads: usize) -> usize {
    let want = rows.div_ceil(threads.max(1) * 4);
    want.div_ceil(TILE_ROWS).max(1) * TILE_ROWS
}

/// Computes `yt[r - r0][t]` for rows `r0..r0 + yt.len() / t` of `w` (transposed output).
fn matmul_rows(x: &[f32], t: usize, w: &MatRef<'_>, r0: usize, yt: &mut [f32]) {
    let k = w.cols;
    let nrows = yt.len() / t;
    yt.fill(0.0);
    let mut buf = [0.0f32; TILE_ROWS * TILE_COLS];
    if t == 1 {
        // Decode: stream each row whole (one sequential read per row instead of 16
        // interleaved ones); same per-tile dots, added in the same order as below.
        for (r, y) in yt.iter_mut().enumerate() {
            let mut c0 = 0;
            while c0 < k {
                let nc = TILE_COLS.min(k - c0);
                let (vals, _) = tile(w, r0 + r, 1, c0, nc, &mut buf);
                *y += dot(&vals[..nc], &x[c0..][..nc]);
                c0 += nc;
            }
        }
        return;
    }
    let mut c0 = 0;
    while c0 < k {
        let nc = TILE_COLS.min(k - c0);
        let mut rr = 0;
        while rr < nrows {
            let nr = TILE_ROWS.min(nrows - rr);
            let (vals, stride) = tile(w, r0 + rr, nr, c0, nc, &mut buf);
            for tok in 0..t {
                let xs = &x[tok * k + c0..][..nc];
                for r in 0..nr {
                    yt[(rr + r) * t + tok] += dot(&vals[r * stride..][..nc], xs);
                }
            }
            rr += nr;
        }
        c0 += nc;
    }
}

/// Q8_0 version of [`matmul_rows`], but token-major: `out[tok][r - r0]` for rows
/// `r0..r0 + out.len() / t`. `xq` are the quantized activations, `kern` the micro-kernel
/// (register-blocked over rows and tokens; see `q8`).
fn matmul_rows_blocks(xq: &q8::QActs, t: usize, w: &MatRef<'_>, r0: usize, out: &mut [f32], kern: q8::Kernel) {
    let qw = if w.dtype == DType::Q8_0 {
        let nb = xq.nb;
        let stride = nb * QK;
        let soff = (w.rows * stride).div_ceil(64) * 64;
        q8::QWeights::q8(&w.data[..w.rows * stride], &w.data[soff..][..w.rows * nb * 2], nb)
    } else {
        q4::weights(w.dtype, w.data, w.rows, w.cols)
    };
    kern.gemm(&qw, r0, out.len() / t, xq, t, out);
}

/// The kernels this CPU runs for a block dtype, best last (empty for f32/f16/bf16).
fn block_kernels(dtype: DType) -> Vec<q8::Kernel> {
    match dtype {
        DType::Q8_0 => q8::Kernel::candidates(),
        DType::Q4_0 | DType::MXFP4 => q4::candidates(dtype),
        DType::F32 | DType::F16 | DType::BF16 => Vec::new(),
    }
}

/// The best kernel of this CPU for a block dtype (`None` for f32/f16/bf16).
fn block_kernel(dtype: DType) -> Option<q8::Kernel> {
    match dtype {
        DType::Q8_0 => Some(q8::Kernel::detect()),
        DType::Q4_0 | DType::MXFP4 => Some(q4::detect(dtype)),
        DType::F32 | DType::F16 | DType::BF16 => None,
    }
}

/// `y[T, rows] = x[T, cols] · Wᵀ`, split over rows of `W` by `par`.
///
/// # Panics
/// If `x.len() != t * w.cols()` or `y.len() != t * w.rows()` (caller bug).
pub fn matmul(par: &dyn Parallel, x: &[f32], t: usize, w: &MatRef<'_>, y: &mut [f32]) {
    matmul_with(par, &Acts::new(x, t), w, y, None);
}

/// Activations `x[T, in]` for several [`matmul_acts`] calls with the same input (q/k/v, an
/// MLP's gate and up): the Q8_0 kernels quantize them once, on first use, not per matrix.
pub struct Acts<'a> {
    x: &'a [f32],
    t: usize,
    q8: core::cell::OnceCell<q8::QActs>,
    q4: core::cell::OnceCell<q8::QActs>,
}

impl<'a> Acts<'a> {
    /// Wraps `t` rows of `x`.
    pub fn new(x: &'a [f32], t: usize) -> Self {
        Self { x, t, q8: core::cell::OnceCell::new(), q4: core::cell::OnceCell::new() }
    }
    fn quantized(&self, cols: usize) -> &q8::QActs {
        self.q8.get_or_init(|| q8::QActs::new(self.x, self.t, cols))
    }
    /// The activations a block dtype's kernels take: quantized per block, and for the 4-bit
    /// formats rearranged to their nibble order (`q4.rs`); `None` for the plain dtypes.
    fn blocks(&self, dtype: DType, cols: usize) -> Option<&q8::QActs> {
        match dtype {
            DType::Q8_0 => Some(self.quantized(cols)),
            DType::Q4_0 | DType::MXFP4 => Some(self.q4.get_or_init(|| q4::rearrange(self.quantized(cols), self.t))),
            DType::F32 | DType::F16 | DType::BF16 => None,
        }
    }
}

/// [`matmul`] of prepared activations.
///
/// # Panics
/// As [`matmul`]; also if one `Acts` is used with matrices of different widths.
pub fn matmul_acts(par: &dyn Parallel, x: &Acts<'_>, w: &MatRef<'_>, y: &mut [f32]) {
    matmul_with(par, x, w, y, None);
}

/// The micro-kernels this CPU runs for block dtype `dtype` (`Q8_0`, `Q4_0`, `MXFP4`), by
/// name, best last (benchmarks compare them).
#[doc(hidden)]
pub fn block_kernel_names(dtype: DType) -> Vec<String> {
    block_kernels(dtype).iter().map(|k| String::from(k.name())).collect()
}

/// [`matmul`] with the micro-kernel named `kernel` (one of [`block_kernel_names`] for `w`'s
/// dtype) instead of the detected one; `false` (and nothing computed) if this CPU has no such
/// kernel for it.
///
/// # Panics
/// As [`matmul`].
#[doc(hidden)]
pub fn matmul_block_kernel(
    kernel: &str,
    par: &dyn Parallel,
    x: &[f32],
    t: usize,
    w: &MatRef<'_>,
    y: &mut [f32],
) -> bool {
    match block_kernels(w.dtype).into_iter().find(|k| k.name() == kernel) {
        Some(k) => {
            matmul_with(par, &Acts::new(x, t), w, y, Some(k));
            true
        }
        None => false,
    }
}

/// [`matmul`] with the given Q8_0 kernel (`None`: the detected one).
fn matmul_with(par: &dyn Parallel, xa: &Acts<'_>, w: &MatRef<'_>, y: &mut [f32], kern: Option<q8::Kernel>) {
    matmul_impl(par, xa, w, None, y, kern);
}

/// A gated activation applied element-wise over a chunk: `gate[i] = act(gate[i], up[i])`
/// (SiLU-gated: [`silu_mul`]). One call per chunk, so its loop can vectorise.
pub type Glu<'a> = &'a (dyn Fn(&mut [f32], &[f32]) + Sync);

/// Fused gate/up projection of a gated MLP: `y[T, rows] = act(x · Gᵀ, x · Uᵀ)` element-wise,
/// in one parallel pass (each task computes its rows of both products and combines them), so
/// the activation is threaded too and the MLP needs one fork/join less. The same values as two
/// [`matmul_acts`] calls followed by `act`.
///
/// # Panics
/// As [`matmul`]; also if `g` and `u` differ in shape or dtype.
pub fn matmul_glu(par: &dyn Parallel, x: &Acts<'_>, g: &MatRef<'_>, u: &MatRef<'_>, act: Glu<'_>, y: &mut [f32]) {
    assert!(g.rows == u.rows && g.cols == u.cols && g.dtype == u.dtype, "matmul_glu: gate and up differ");
    matmul_impl(par, x, g, Some((u, act)), y, None);
}

fn matmul_impl(
    par: &dyn Parallel,
    xa: &Acts<'_>,
    w: &MatRef<'_>,
    glu: Option<(&MatRef<'_>, Glu<'_>)>,
    y: &mut [f32],
    kern: Option<q8::Kernel>,
) {
    let (n, k, x, t) = (w.rows, w.cols, xa.x, xa.t);
    assert!(x.len() == t * k && y.len() == t * n, "matmul: shapes do not match");
    if t == 0 {
        return;
    }
    let serial = par.threads() <= 1 || n * k * t < PARALLEL_MIN_MACS;
    let chunk_rows = if serial { n } else { rows_per_task(n, par.threads()) };
    let q8 = xa.blocks(w.dtype, k).zip(kern.or_else(|| block_kernel(w.dtype)));
    assert!(q8.is_none_or(|(xq, _)| xq.nb == k.div_ceil(QK)), "matmul: one Acts used with different widths");
    let rows = |m: &MatRef<'_>, i: usize, out: &mut [f32]| match &q8 {
        Some((xq, kern)) => matmul_rows_blocks(xq, t, m, i * chunk_rows, out, *kern),
        None => matmul_rows(x, t, m, i * chunk_rows, out),
    };
    let task = |i: usize, out: &mut [f32]| {
        rows(w, i, out);
        if let Some((u, act)) = glu {
            // Same layout for both products, so the activation is element-wise on the chunk.
            let mut up = vec![0.0f32; out.len()];
            rows(u, i, &mut up);
            act(out, &up);
        }
    };
    if t == 1 {
        // Transposed output is the output.
        if serial {
            task(0, y)
        } else {
            par.for_each_chunk(y, chunk_rows, &task)
        }
        return;
    }
    if q8.is_some() && serial {
        // One task over every row, token-major: the output itself.
        task(0, y);
        return;
    }
    let mut yt = vec![0.0f32; n * t];
    if serial {
        task(0, &mut yt);
    } else {
        par.for_each_chunk(&mut yt, chunk_rows * t, &task);
    }
    if q8.is_some() {
        // Each task's rows, token-major: copy them into place run by run.
        for (c, part) in yt.chunks(chunk_rows * t).enumerate() {
            let nr = part.len() / t;
            for (tok, run) in part.chunks_exact(nr).enumerate() {
                y[tok * n + c * chunk_rows..][..nr].copy_from_slice(run);
            }
        }
    } else {
        transpose(&yt, n, t, y);
    }
}

/// One matrix-vector product of [`gemv_many`]: `y = act(W x, U x)` with `glu = Some((U, act))`,
/// else `y = W x`.
pub struct Gemv<'x, 'w> {
    pub x: &'x Acts<'x>,
    pub w: MatRef<'w>,
    pub glu: Option<(MatRef<'w>, Glu<'x>)>,
}

/// Several one-token products (the selected experts of a layer in decoding, or q, k and v)
/// in **one** parallel pass: `out` is the jobs' outputs one after another, `w.rows()` values
/// each. One fork/join instead of one per matrix, and the threads balance over all of them,
/// not per matrix. Each row is computed by the same kernel as [`matmul`], so the values are
/// identical.
///
/// # Panics
/// If a job's `x` is not one token of `w.cols()` values, `out.len()` is not the sum of the
/// jobs' rows, or a gate and up pair differ in shape or dtype.
pub fn gemv_many(par: &dyn Parallel, jobs: &[Gemv<'_, '_>], out: &mut [f32]) {
    let total: usize = jobs.iter().map(|j| j.w.rows).sum();
    assert!(out.len() == total, "gemv_many: output length");
    for j in jobs {
        let (w, k) = (&j.w, j.w.cols);
        assert!(j.x.t == 1 && j.x.x.len() == k, "gemv_many: shapes do not match");
        assert!(
            j.glu.as_ref().is_none_or(|(u, _)| u.rows == w.rows && u.cols == k && u.dtype == w.dtype),
            "gemv_many: gate and up differ"
        );
    }
    if total == 0 {
        return;
    }
    // Quantized on this thread first: `Acts` caches lazily and is not `Sync`.
    let xq: Vec<Option<(&q8::QActs, q8::Kernel)>> =
        jobs.iter().map(|j| j.x.blocks(j.w.dtype, j.w.cols).zip(block_kernel(j.w.dtype))).collect();
    let macs: usize = jobs.iter().map(|j| j.w.rows * j.w.cols * if j.glu.is_some() { 2 } else { 1 }).sum();
    let serial = par.threads() <= 1 || macs < PARALLEL_MIN_MACS;
    let most = jobs.iter().map(|j| j.w.rows).max().unwrap_or(0);
    // Every job split into tasks of `c` rows (its last one shorter); the tasks write equal
    // chunks of one buffer, padded where a job's rows are not a multiple of `c`.
    // ≈ 8 tasks per thread: the join waits for at most one short task.
    let c = if serial { most } else { rows_per_task(total, 2 * par.threads()).min(most) };
    // Job j's tasks are `first[j]..first[j + 1]`.
    let mut first = Vec::with_capacity(jobs.len() + 1);
    first.push(0);
    for j in jobs {
        first.push(first[first.len() - 1] + j.w.rows.div_ceil(c));
    }
    let tasks = first[jobs.len()];
    // What the tasks read, without the (non-`Sync`) `Acts`: x, its quantized form, W, (U, act).
    type Plain<'a> =
        (&'a [f32], Option<(&'a q8::QActs, q8::Kernel)>, &'a MatRef<'a>, Option<&'a (MatRef<'a>, Glu<'a>)>);
    let plain: Vec<Plain<'_>> = jobs.iter().zip(&xq).map(|(j, q)| (j.x.x, *q, &j.w, j.glu.as_ref())).collect();
    let rows = |j: usize, w: &MatRef<'_>, r0: usize, o: &mut [f32]| match plain[j].1 {
        Some((q, kern)) => matmul_rows_blocks(q, 1, w, r0, o, kern),
        None => matmul_rows(plain[j].0, 1, w, r0, o),
    };
    let task = |i: usize, o: &mut [f32]| {
        // The last job that starts at or before task i (`first[0] = 0 ≤ i < first[njobs]`).
        let j = first.partition_point(|&f| f <= i) - 1;
        let (w, r0) = (plain[j].2, (i - first[j]) * c);
        let o = &mut o[..c.min(w.rows - r0)];
        rows(j, w, r0, o);
        if let Some((u, act)) = plain[j].3 {
            let mut up = vec![0.0f32; o.len()];
            rows(j, u, r0, &mut up);
            act(o, &up);
        }
    };
    if jobs.iter().all(|j| j.w.rows % c == 0) {
        par.for_each_chunk(out, c, &task);
    } else {
        let mut padded = vec![0.0f32; tasks * c];
        par.for_each_chunk(&mut padded, c, &task);
        let mut at = 0;
        for (j, f) in jobs.iter().zip(&first) {
            out[at..][..j.w.rows].copy_from_slice(&padded[f * c..][..j.w.rows]);
            at += j.w.rows;
        }
    }
}

/// `out[j][i] = a[i][j]` for `a` of `[rows, cols]`.
pub fn transpose(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const B: usize = 32;
    for i0 in (0..rows).step_by(B) {
        for j0 in (0..cols).step_by(B) {
            for i in i0..(i0 + B).min(rows) {
                for j in j0..(j0 + B).min(cols) {
                    out[j * rows + i] = a[i * cols + j];
                }
            }
        }
    }
}

/// Reference product for tests: dequantize every row, f64 dot products.
pub fn matmul_reference(x: &[f32], t: usize, w: &MatRef<'_>) -> Vec<f32> {
    let (n, k) = (w.rows, w.cols);
    let mut row = vec![0.0f32; k];
    let mut y = vec![0.0f32; t * n];
    for r in 0..n {
        decode(w, r, 1, 0, k, &mut row);
        for tok in 0..t {
            let s: f64 = row.iter().zip(&x[tok * k..][..k]).map(|(&a, &b)| f64::from(a) * f64::from(b)).sum();
            y[tok * n + r] = s as f32;
        }
    }
    y
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rng(seed: u64) -> impl FnMut() -> f32 {
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        move || {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            ((s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40) as f32 / (1u64 << 23) as f32) - 1.0
        }
    }

    fn encode(vals: &[f32], dtype: DType, rows: usize, cols: usize) -> Vec<u8> {
        crate::merge::encode(vals, rows, cols, dtype)
    }

    /// A fake pool: chunks run in reverse order, to show order does not matter.
    struct Reversed(usize);
    impl Parallel for Reversed {
        fn threads(&self) -> usize {
            self.0
        }
        fn for_each_chunk(&self, out: &mut [f32], chunk: usize, f: &(dyn Fn(usize, &mut [f32]) + Sync)) {
            let mut v: Vec<_> = out.chunks_mut(chunk).enumerate().collect();
            v.reverse();
            for (i, c) in v {
                f(i, c);
            }
        }
    }

    #[test]
    fn matmul_matches_reference_for_every_dtype_and_shape() {
        for &(n, k, t) in &[(1, 1, 1), (3, 5, 2), (17, 40, 3), (40, 300, 5), (70, 520, 1), (33, 257, 9)] {
            let mut r = rng((n * 1000 + k * 10 + t) as u64);
            let w: Vec<f32> = (0..n * k).map(|_| r()).collect();
            let x: Vec<f32> = (0..t * k).map(|_| r()).collect();
            for dtype in [DType::F32, DType::F16, DType::BF16, DType::Q8_0, DType::Q4_0, DType::MXFP4] {
                let bytes = encode(&w, dtype, n, k);
                let m = MatRef::new(dtype, n, k, &bytes).unwrap();
                let want = matmul_reference(&x, t, &m);
                // Q8_0 also quantizes the activations: ≤ dx/2 per element, dx ≤ 1/127 here.
                let act_err = |i: usize| {
                    if crate::quant::Planar::of(dtype).is_none() {
                        return 0.0;
                    }
                    let mut row = vec![0.0; k];
                    decode(&m, i % n, 1, 0, k, &mut row);
                    row.iter().map(|v| v.abs()).sum::<f32>() * 0.5 / 127.0
                };
                for par in [&Serial as &dyn Parallel, &Reversed(3)] {
                    let mut y = vec![0.0; t * n];
                    matmul(par, &x, t, &m, &mut y);
                    for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-5 * (1.0 + b.abs()) * (k as f32).sqrt() + act_err(i),
                            "{dtype:?} {n}x{k} t{t} [{i}]: {a} vs {b}"
                        );
                    }
                }
            }
        }
    }

    #[test]
    fn result_independent_of_batch_and_threads() {
        let (n, k, t) = (100, 700, 6);
        let mut r = rng(7);
        let w: Vec<f32> = (0..n * k).map(|_| r()).collect();
        let x: Vec<f32> = (0..t * k).map(|_| r()).collect();
        for dtype in [DType::Q8_0, DType::Q4_0, DType::MXFP4] {
            let bytes = encode(&w, dtype, n, k);
            let m = MatRef::new(dtype, n, k, &bytes).unwrap();
            let mut batched = vec![0.0; t * n];
            matmul(&Reversed(4), &x, t, &m, &mut batched);
            for tok in 0..t {
                let mut one = vec![0.0; n];
                matmul(&Serial, &x[tok * k..][..k], 1, &m, &mut one);
                assert_eq!(one, batched[tok * n..][..n], "{dtype:?}");
            }
        }
    }

    /// `matmul_glu` and `gemv_many` are the two products and the activation, value for value,
    /// whatever the pool and however rows split into tasks (ragged sizes, several jobs).
    #[test]
    fn fused_passes_equal_separate_products() {
        let act = |g: &mut [f32], u: &[f32]| silu_mul(g, u);
        for &(n, k, t, jobs) in &[(1, 32, 1, 1), (37, 70, 1, 3), (130, 256, 1, 4), (130, 256, 5, 1), (64, 96, 3, 2)] {
            let mut r = rng((n * 7 + k + t) as u64);
            for dtype in [DType::F32, DType::Q8_0] {
                let mats: Vec<(Vec<u8>, Vec<u8>)> = (0..jobs)
                    .map(|_| {
                        let g: Vec<f32> = (0..n * k).map(|_| r()).collect();
                        let u: Vec<f32> = (0..n * k).map(|_| r()).collect();
                        (encode(&g, dtype, n, k), encode(&u, dtype, n, k))
                    })
                    .collect();
                let xs: Vec<Vec<f32>> = (0..jobs).map(|_| (0..t * k).map(|_| r()).collect()).collect();
                // Separate products, serially.
                let want: Vec<Vec<f32>> = mats
                    .iter()
                    .zip(&xs)
                    .map(|((g, u), x)| {
                        let (mut yg, mut yu) = (vec![0.0; t * n], vec![0.0; t * n]);
                        matmul(&Serial, x, t, &MatRef::new(dtype, n, k, g).unwrap(), &mut yg);
                        matmul(&Serial, x, t, &MatRef::new(dtype, n, k, u).unwrap(), &mut yu);
                        silu_mul(&mut yg, &yu);
                        yg
                    })
                    .collect();
                let pool = ThreadPool::new(3).unwrap();
                for par in [&Serial as &dyn Parallel, &Reversed(3), &pool] {
                    for (((g, u), x), w) in mats.iter().zip(&xs).zip(&want) {
                        let (g, u) = (MatRef::new(dtype, n, k, g).unwrap(), MatRef::new(dtype, n, k, u).unwrap());
                        let mut y = vec![0.0; t * n];
                        matmul_glu(par, &Acts::new(x, t), &g, &u, &act, &mut y);
                        assert_eq!(&y, w, "matmul_glu {dtype:?} {n}x{k} t{t}");
                    }
                    if t == 1 {
                        let acts: Vec<Acts<'_>> = xs.iter().map(|x| Acts::new(x, 1)).collect();
                        let list: Vec<Gemv<'_, '_>> = mats
                            .iter()
                            .zip(&acts)
                            .map(|((g, u), x)| Gemv {
                                x,
                                w: MatRef::new(dtype, n, k, g).unwrap(),
                                glu: Some((MatRef::new(dtype, n, k, u).unwrap(), &act)),
                            })
                            .collect();
                        let mut y = vec![0.0; jobs * n];
                        gemv_many(par, &list, &mut y);
                        assert_eq!(y, want.concat(), "gemv_many {dtype:?} {n}x{k} ×{jobs}");
                    }
                }
            }
        }
    }

    /// Jobs of different heights (q, k and v) in one `gemv_many`: each output is its own
    /// `matmul`, value for value, padded task split or not.
    #[test]
    fn gemv_many_takes_jobs_of_different_heights() {
        let k = 96;
        let act = |g: &mut [f32], u: &[f32]| silu_mul(g, u);
        for heights in [&[1024usize, 256, 256][..], &[37, 130, 1, 64], &[1, 5], &[128, 128]] {
            let mut r = rng(heights.iter().sum::<usize>() as u64);
            for dtype in [DType::F32, DType::Q8_0] {
                let mats: Vec<Vec<u8>> = heights
                    .iter()
                    .map(|&n| encode(&(0..n * k).map(|_| r()).collect::<Vec<_>>(), dtype, n, k))
                    .collect();
                // Each job its own input (the experts' down projections), so a task that
                // reads another job's input fails.
                let xs: Vec<Vec<f32>> = heights.iter().map(|_| (0..k).map(|_| r()).collect()).collect();
                let view = |j: usize| MatRef::new(dtype, heights[j], k, &mats[j]).unwrap();
                let want: Vec<f32> = (0..heights.len())
                    .flat_map(|j| {
                        let mut y = vec![0.0; heights[j]];
                        matmul(&Serial, &xs[j], 1, &view(j), &mut y);
                        y
                    })
                    .collect();
                // Gated: job j's gate and up are both matrix j.
                let gated: Vec<f32> = {
                    let mut w = want.clone();
                    let u = want.clone();
                    act(&mut w, &u);
                    w
                };
                let pool = ThreadPool::new(2).unwrap();
                for par in [&Serial as &dyn Parallel, &Reversed(3), &pool] {
                    let xa: Vec<Acts<'_>> = xs.iter().map(|x| Acts::new(x, 1)).collect();
                    let plain: Vec<Gemv<'_, '_>> =
                        (0..heights.len()).map(|j| Gemv { x: &xa[j], w: view(j), glu: None }).collect();
                    let mut y = vec![f32::NAN; want.len()];
                    gemv_many(par, &plain, &mut y);
                    assert_eq!(y, want, "gemv_many {dtype:?} {heights:?}");
                    let glu: Vec<Gemv<'_, '_>> = (0..heights.len())
                        .map(|j| Gemv { x: &xa[j], w: view(j), glu: Some((view(j), &act)) })
                        .collect();
                    gemv_many(par, &glu, &mut y);
                    assert_eq!(y, gated, "gemv_many gated {dtype:?} {heights:?}");
                }
            }
        }
    }

    #[test]
    fn q8_0_error_is_within_quantization_error() {
        let (n, k) = (8, 96);
        let mut r = rng(3);
        let w: Vec<f32> = (0..n * k).map(|_| r()).collect();
        let x: Vec<f32> = (0..k).map(|_| r()).collect();
        let bytes = encode(&w, DType::Q8_0, n, k);
        let m = MatRef::new(DType::Q8_0, n, k, &bytes).unwrap();
        let mut y = vec![0.0; n];
        matmul(&Serial, &x, 1, &m, &mut y);
        for (row, &got) in y.iter().enumerate() {
            let exact: f32 = (0..k).map(|c| w[row * k + c] * x[c]).sum();
            // |Δw| ≤ d/2 per element, d ≤ 1/127; the same for the quantized activations.
            let wsum: f32 = w[row * k..][..k].iter().map(|v| v.abs()).sum();
            let bound: f32 = (x.iter().map(|v| v.abs()).sum::<f32>() + wsum) * 0.5 / 127.0 + 1e-5;
            assert!((got - exact).abs() <= bound, "{got} vs {exact}");
        }
    }

    #[test]
    fn unaligned_weights_take_the_portable_path_with_the_same_result() {
        let (n, k) = (5, 70);
        let mut r = rng(11);
        let w: Vec<f32> = (0..n * k).map(|_| r()).collect();
        let x: Vec<f32> = (0..2 * k).map(|_| r()).collect();
        for dtype in [DType::F32, DType::F16] {
            let bytes = encode(&w, dtype, n, k);
            let mut shifted = vec![0u8; bytes.len() + 1];
            shifted[1..].copy_from_slice(&bytes);
            let (a, b) = (MatRef::new(dtype, n, k, &bytes).unwrap(), MatRef::new(dtype, n, k, &shifted[1..]).unwrap());
            let (mut ya, mut yb) = (vec![0.0; 2 * n], vec![0.0; 2 * n]);
            matmul(&Serial, &x, 2, &a, &mut ya);
            matmul(&Serial, &x, 2, &b, &mut yb);
            assert_eq!(ya, yb, "{dtype:?}");
        }
    }

    #[test]
    fn q8_0_simd_matches_portable_on_ragged_shapes() {
        // cols not a multiple of 32 (or of a 32-block tile), rows not a multiple of TILE_ROWS.
        for &(n, k, t) in &[
            (1, 1, 1),
            (17, 40, 1),
            (17, 40, 3),
            (33, 1000, 1),
            (35, 1057, 4),
            (5, 2080, 2),
            (19, 1057, 17),
            (9, 1000, 64),
            (6, 2080, 5),
        ] {
            let mut r = rng((n * 31 + k * 7 + t) as u64);
            let w: Vec<f32> = (0..n * k).map(|_| r() * 3.0).collect();
            let x: Vec<f32> = (0..t * k).map(|_| r()).collect();
            let bytes = encode(&w, DType::Q8_0, n, k);
            let m = MatRef::new(DType::Q8_0, n, k, &bytes).unwrap();
            let xq = q8::QActs::new(&x, t, k);
            let mut want = vec![0.0; n * t];
            matmul_rows_blocks(&xq, t, &m, 0, &mut want, q8::Kernel::portable());
            for kern in q8::Kernel::available() {
                // Whole and in row chunks of 7 (not a tile multiple).
                let mut got = vec![0.0; n * t];
                matmul_rows_blocks(&xq, t, &m, 0, &mut got, kern);
                let mut chunked = vec![0.0; n * t];
                for r0 in (0..n).step_by(7) {
                    let nr = 7.min(n - r0);
                    let mut c = vec![0.0; nr * t];
                    matmul_rows_blocks(&xq, t, &m, r0, &mut c, kern);
                    for tok in 0..t {
                        chunked[tok * n + r0..][..nr].copy_from_slice(&c[tok * nr..][..nr]);
                    }
                }
                assert_eq!(got, chunked, "{kern:?}");
                for (i, (a, b)) in got.iter().zip(&want).enumerate() {
                    assert!((a - b).abs() <= 1e-5 * (1.0 + b.abs()), "{kern:?} {n}x{k} t{t} [{i}]: {a} vs {b}");
                }
            }
        }
    }

    #[test]
    fn wrong_lengths_are_rejected() {
        assert!(MatRef::new(DType::F32, 2, 3, &[0; 23]).is_none());
        assert!(MatRef::new(DType::F32, 0, 3, &[]).is_none());
        assert!(MatRef::new(DType::Q8_0, 2, 40, &[0; 200]).is_none());
    }
}
