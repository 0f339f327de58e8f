//! The x86-64 kernels: Q8_0 micro-kernels on AVX2, AVX-VNNI and AVX-512 VNNI (all with F16C
//! for the scales), F16C conversion of f16 weights, the activations' quantization and the
//! attention loops on AVX2. With `std` the CPU's features are detected at run time; without,
//! only what the target enables at compile time runs.
// Without std, kernels the target does not enable at compile time are never called.
#![cfg_attr(not(feature = "std"), allow(dead_code))]

#[cfg(feature = "std")]
use super::heads::Simd;
use super::heads::{HeadJob, SimdOps, prefetch_row};
use super::q4::{Nib, unsigned_lut};
use super::q8::{
    Kernel, QActs, QWeights, ahead, micro, micro4, prefetch_range, prefetch_scales, prefetch_scales_of, run,
};
use crate::quant::QK;
use alloc::vec::Vec;
use core::arch::x86_64::*;

/// Hints the cache line at `p` into L1 ahead of its use.
#[inline(always)]
pub(super) fn prefetch(p: *const u8) {
    // SAFETY: a prefetch is a hint: it never faults, whatever the address, and writes
    // nothing; callers form `p` with wrapping arithmetic and never dereference it.
    unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) }
}

/// Which of the SIMD Q8_0 kernels this CPU runs: `(avx2, avx-vnni, avx-512 vnni)`, each with
/// what it needs besides (FMA, F16C; AVX-512 BW). The last two only count with the first.
fn q8_features() -> (bool, bool, bool) {
    #[cfg(feature = "std")]
    {
        use std::is_x86_feature_detected as has;
        let avx2 = has!("avx2") && has!("fma") && has!("f16c");
        (avx2, avx2 && has!("avxvnni"), avx2 && has!("avx512f") && has!("avx512bw") && has!("avx512vnni"))
    }
    #[cfg(not(feature = "std"))]
    {
        let avx2 = cfg!(all(target_feature = "avx2", target_feature = "fma", target_feature = "f16c"));
        (
            avx2,
            avx2 && cfg!(target_feature = "avxvnni"),
            avx2 && cfg!(all(target_feature = "avx512f", target_feature = "avx512bw", target_feature = "avx512vnni")),
        )
    }
}

/// Appends the Q8_0 kernels this CPU runs, best last.
pub(super) fn q8_kernels(v: &mut Vec<Kernel>) {
    let (avx2, vnni, avx512) = q8_features();
    if avx2 {
        // SAFETY: the kernel's features were detected just above (`q8_features`).
        v.push(unsafe { Kernel::new("Avx2", run::<Avx2, 4, 2, 1>) });
    }
    if vnni {
        // SAFETY: as above.
        v.push(unsafe { Kernel::new("AvxVnni", run::<AvxVnni, 4, 2, 1>) });
    }
    if avx512 {
        // SAFETY: as above.
        v.push(unsafe { Kernel::new("Avx512Vnni", gemm_avx512vnni) });
    }
}

/// Appends the 4-bit kernels (format `F`) this CPU runs, best last. One row and up to four
/// tokens per tile: the unpacked weights of 8 blocks are reused across the tokens.
pub(super) fn q4_kernels<F: Nib>(v: &mut Vec<Kernel>) {
    let (avx2, vnni, avx512) = q8_features();
    if avx2 {
        // SAFETY: the kernel's features were detected just above (`q8_features`).
        v.push(unsafe { Kernel::new("Avx2", run::<Avx2Q4<F>, 1, 4, 1>) });
    }
    if vnni {
        // SAFETY: as above.
        v.push(unsafe { Kernel::new("AvxVnni", run::<VnniQ4<F>, 1, 4, 1>) });
    }
    if avx512 && avx512vl() {
        // SAFETY: as above, and AVX-512 VL just above.
        v.push(unsafe { Kernel::new("Avx512Vnni", gemm4_avx512vnni::<F>) });
    }
}

/// The 4-bit AVX-512 VNNI kernel: decoding in the file's layout one row at a time, 16 blocks
/// a step ([`tile4_zmm`]), prompts over packed groups of 16 rows ([`gemm_packed`]), in
/// `q4.rs`'s f32 order both.
///
/// # Safety
/// As [`run`], with avx512f, avx512bw, avx512vl, avx512vnni, avx2, fma, f16c.
unsafe fn gemm4_avx512vnni<F: Nib>(w: &QWeights<'_>, r0: usize, nr: usize, x: &QActs, t: usize, out: &mut [f32]) {
    // SAFETY: forwarded contract (CPU features and bounds).
    unsafe {
        if t == 1 {
            run::<Zmm4<F>, 1, 1, 1>(w, r0, nr, x, t, out)
        } else {
            gemm_packed::<Four<F>>(w, r0, nr, x, t, out)
        }
    }
}

/// AVX-512 VL: the EVEX forms of 128- and 256-bit instructions.
fn avx512vl() -> bool {
    #[cfg(feature = "std")]
    return std::is_x86_feature_detected!("avx512vl");
    #[cfg(not(feature = "std"))]
    cfg!(target_feature = "avx512vl")
}

/// The 8 lanes of `Σ u·x` over one pair of unpacked blocks (`u` unsigned): AVX2
/// `maddubs` (pair sums ≤ 2·24·127, no saturation) then `madd` into i32.
#[inline]
#[target_feature(enable = "avx2")]
fn pair_avx2(u: (__m256i, __m256i), x: (__m256i, __m256i)) -> __m256i {
    let one = _mm256_set1_epi16(1);
    _mm256_add_epi32(
        _mm256_madd_epi16(_mm256_maddubs_epi16(u.0, x.0), one),
        _mm256_madd_epi16(_mm256_maddubs_epi16(u.1, x.1), one),
    )
}

/// The same with VNNI `vpdpbusd` (same i32 lanes).
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
fn pair_vnni(u: (__m256i, __m256i), x: (__m256i, __m256i)) -> __m256i {
    _mm256_dpbusd_avx_epi32(_mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u.0, x.0), u.1, x.1)
}

/// `g ≤ 8` E8M0 scale bytes at `p` as the format's scales (`F::scale`: `2^(e − 128)`), zero
/// beyond `g`.
///
/// # Safety
/// avx2; `p` valid for `g` bytes.
#[inline]
#[target_feature(enable = "avx2")]
unsafe fn e8m0x8<F: Nib>(p: *const u8, g: usize) -> __m256 {
    let mut buf = [0u8; 8];
    // SAFETY: `p` holds g ≤ 8 bytes (caller); `buf` 8: unaligned 8-byte loads.
    let e = unsafe {
        if g == 8 {
            buf = p.cast::<[u8; 8]>().read_unaligned();
        } else {
            core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), g);
        }
        _mm256_cvtepu8_epi32(_mm_loadl_epi64(buf.as_ptr().cast()))
    };
    // For 2 ≤ e ≤ 254 the f32 exponent field is e − 1; 0, 1 (subnormal) and 255 (NaN) are
    // rare: those groups take the scalar decode. Padding (e = 0 past g) is zeroed below.
    let rare =
        _mm256_or_si256(_mm256_cmpgt_epi32(_mm256_set1_epi32(2), e), _mm256_cmpeq_epi32(e, _mm256_set1_epi32(255)));
    let live = _mm256_cmpgt_epi32(_mm256_set1_epi32(g as i32), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    if _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_and_si256(rare, live))) != 0 {
        let mut v = [0.0f32; 8];
        for (k, v) in v.iter_mut().enumerate().take(g) {
            *v = F::scale(&buf, k);
        }
        // SAFETY: `v` holds 8 values; unaligned load.
        return unsafe { _mm256_loadu_ps(v.as_ptr()) };
    }
    let v = _mm256_slli_epi32::<23>(_mm256_sub_epi32(e, _mm256_set1_epi32(1)));
    _mm256_castsi256_ps(_mm256_and_si256(v, live))
}

/// `g ≤ 8` i32 values at `p`, zero beyond `g`.
///
/// # Safety
/// avx; `p` valid for `g` values.
#[inline]
#[target_feature(enable = "avx")]
unsafe fn i32x8(p: *const i32, g: usize) -> __m256i {
    let mut buf = [0i32; 8];
    // SAFETY: `p` holds g values (caller), `buf` 8 ≥ g.
    unsafe {
        if g == 8 {
            return _mm256_loadu_si256(p.cast());
        }
        core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), g);
        _mm256_loadu_si256(buf.as_ptr().cast())
    }
}

/// The 4-bit micro-kernel (see `q4.rs` for the numerics it reproduces bit for bit): per 8
/// blocks, each pair of blocks is one 32-byte load whose low and high nibbles, looked up in
/// the format's table, are the two blocks' even and odd values; their products with the
/// rearranged activations reduce (two `hadd` levels) to the 8 block sums in lane order
/// `[0, 2, 4, 6, 1, 3, 5, 7]`, which is the order the 8 accumulators keep.
macro_rules! tile4 {
    ($name:ident, $feat:literal, $pair:ident) => {
        /// # Safety
        /// As [`Micro::tile`](super::q8::Micro::tile), with the CPU features enabled here.
        #[target_feature(enable = $feat)]
        #[allow(clippy::needless_range_loop)] // [row][token] indices read best as such
        unsafe fn $name<F: Nib, const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            let nb = w.nb;
            let (row, srow) = (nb * 16, nb * F::SB);
            let ne = nb.next_multiple_of(2);
            let lut = const { unsigned_lut::<F>() };
            let zero = _mm256_setzero_si256();
            // SAFETY: the table is 16 bytes; unaligned load.
            let lut = _mm256_broadcastsi128_si256(unsafe { _mm_loadu_si128(lut.as_ptr().cast()) });
            let m4 = _mm256_set1_epi8(0x0F);
            let perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
            let off = _mm256_set1_epi32(-i32::from(F::MIN));
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller): every pointer
            // below addresses a block < nb of a row (the second of a pair only when it exists)
            // or a block < ne of a token's rearranged activations; loads are unaligned.
            unsafe {
                let wq = w.q.as_ptr().add(r * row);
                let ws = w.s.as_ptr().add(r * srow);
                if NR == 1 {
                    prefetch_scales_of(ws, MR, nb, 16, F::SB);
                }
                let mut b = 0;
                while b < nb {
                    let g = (nb - b).min(8);
                    let mut dx = [_mm256_setzero_ps(); NR];
                    let mut corr = [zero; NR];
                    for j in 0..NR {
                        let t = (tok + j) * ne + b;
                        dx[j] = f32x8(x.d.as_ptr().add(t), g);
                        let sx = i32x8(x.s.as_ptr().add(t), g);
                        // −MIN·Σx: 8·Σx or 12·Σx, shifts rather than a 10-cycle `mullo`.
                        let m = if F::MIN == -8 {
                            _mm256_slli_epi32::<3>(sx)
                        } else if F::MIN == -12 {
                            _mm256_add_epi32(_mm256_slli_epi32::<3>(sx), _mm256_slli_epi32::<2>(sx))
                        } else {
                            _mm256_mullo_epi32(sx, off)
                        };
                        corr[j] = _mm256_permutevar8x32_epi32(m, perm);
                    }
                    for i in 0..MR {
                        let dw = if F::SB == 2 {
                            scales8(ws.add(i * srow + 2 * b), g)
                        } else {
                            e8m0x8::<F>(ws.add(i * srow + b), g)
                        };
                        // Unpacked pairs of blocks: (evens of both, odds of both).
                        let mut u = [(zero, zero); 4];
                        for k in 0..4 {
                            let blk = b + 2 * k;
                            if blk >= nb {
                                break;
                            }
                            let p = wq.add(i * row + blk * 16);
                            if NR == 1 && k % 2 == 0 {
                                prefetch(p.wrapping_add(ahead(MR, row)));
                            }
                            let raw = if blk + 1 < nb {
                                _mm256_loadu_si256(p.cast())
                            } else {
                                _mm256_zextsi128_si256(_mm_loadu_si128(p.cast()))
                            };
                            let lo = _mm256_and_si256(raw, m4);
                            let hi = _mm256_and_si256(_mm256_srli_epi16::<4>(raw), m4);
                            u[k] = (_mm256_shuffle_epi8(lut, lo), _mm256_shuffle_epi8(lut, hi));
                        }
                        for j in 0..NR {
                            let xr = x.q.as_ptr().add((tok + j) * ne * 32 + b * 32);
                            let v: [__m256i; 4] = core::array::from_fn(|k| {
                                if b + 2 * k >= nb {
                                    return zero;
                                }
                                let xp = xr.add(k * 64);
                                let xv = (_mm256_loadu_si256(xp.cast()), _mm256_loadu_si256(xp.add(32).cast()));
                                $pair(u[k], xv)
                            });
                            let s = _mm256_hadd_epi32(_mm256_hadd_epi32(v[0], v[1]), _mm256_hadd_epi32(v[2], v[3]));
                            let s = _mm256_cvtepi32_ps(_mm256_sub_epi32(s, corr[j]));
                            let p = _mm256_permutevar8x32_ps(_mm256_mul_ps(dw, dx[j]), perm);
                            acc[i][j] = _mm256_add_ps(acc[i][j], _mm256_mul_ps(s, p));
                        }
                    }
                    b += g;
                }
            }
            for i in 0..MR {
                for j in 0..NR {
                    out[i + j * os] = hsum8(acc[i][j]);
                }
            }
        }
    };
}
tile4!(tile4_avx2, "avx2,fma,f16c", pair_avx2);
tile4!(tile4_vnni, "avx2,fma,f16c,avxvnni", pair_vnni);

micro4!(
    /// AVX2 4-bit kernel of format `F`.
    Avx2Q4 => tile4_avx2
);
micro4!(
    /// AVX-VNNI 4-bit kernel of format `F`.
    VnniQ4 => tile4_vnni
);

micro4!(
    /// The 512-bit AVX-512 VNNI 4-bit kernel of format `F` (decoding).
    Zmm4 => tile4_zmm
);

/// `g ≤ 16` scales of format `F` at `p` (a row's scale bytes from block `b`), zero beyond `g`.
///
/// # Safety
/// avx512f, avx2, f16c; `p` valid for `g · F::SB` bytes.
#[inline]
#[target_feature(enable = "avx2,f16c,avx512f")]
unsafe fn scales16<F: Nib>(p: *const u8, g: usize) -> __m512 {
    // SAFETY: each half reads at most its own g ≤ 8 scales (caller's bound).
    unsafe {
        if F::SB == 2 && g == 16 {
            return _mm512_cvtph_ps(_mm256_loadu_si256(p.cast()));
        }
        let half = |at: usize, n: usize| {
            if n == 0 {
                _mm256_setzero_ps()
            } else if F::SB == 2 {
                scales8(p.add(2 * at), n)
            } else {
                e8m0x8::<F>(p.add(at), n)
            }
        };
        let (lo, hi) = (half(0, g.min(8)), half(8, g.saturating_sub(8)));
        _mm512_castpd_ps(_mm512_insertf64x4::<1>(_mm512_castpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi)))
    }
}

/// The 4-bit micro-kernel on 512-bit registers, 16 blocks a step (the same numerics as
/// [`tile4!`] and `q4.rs`, bit for bit). A 64-byte load holds 4 blocks, one per 128-bit lane;
/// its low and high nibbles, through the table, are those blocks' evens and odds. The
/// activations' pairs `[evens 2p | evens 2p+1 | odds 2p | odds 2p+1]` are regrouped to
/// `[evens of the 4 | odds of the 4]` once per step for all `MR` rows, so two `vpdpbusd`
/// leave each block's sum spread over its lane's 4 i32s. A 4 × 4 transpose-add of the 4
/// loads' results gives the 16 block sums (lane `4l + i` = block `4i + l`), put back in block
/// order by one permute; the f32 terms of blocks `b..b+8` then `b+8..b+16` are added to the 8
/// accumulators (lane `k` = blocks `≡ k mod 8`), as the reference orders them. Masked loads
/// cover a row's last blocks.
///
/// # Safety
/// As [`Micro::tile`](super::q8::Micro::tile), with the CPU features enabled here.
#[target_feature(enable = "avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")]
#[allow(clippy::needless_range_loop)] // [row][token] indices read best as such
unsafe fn tile4_zmm<F: Nib, const MR: usize, const NR: usize>(
    w: &QWeights<'_>,
    r: usize,
    x: &QActs,
    tok: usize,
    out: &mut [f32],
    os: usize,
) {
    let nb = w.nb;
    let (row, srow) = (nb * 16, nb * F::SB);
    let ne = nb.next_multiple_of(2);
    let lut = const { unsigned_lut::<F>() };
    // SAFETY: the table is 16 bytes; unaligned load.
    let lut = _mm512_broadcast_i32x4(unsafe { _mm_loadu_si128(lut.as_ptr().cast()) });
    let m4 = _mm512_set1_epi8(0x0F);
    // Lane 4l + i of the transposed sums holds block 4i + l: this gathers block k from there.
    let order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    let off = _mm512_set1_epi32(-i32::from(F::MIN));
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller). Weight loads are masked
    // to the row's nb blocks, activation loads to a token's ne blocks (its padded length), and
    // scale loads to g values: nothing outside them is read.
    unsafe {
        let wq = w.q.as_ptr().add(r * row);
        let ws = w.s.as_ptr().add(r * srow);
        if NR == 1 {
            prefetch_scales_of(ws, MR, nb, 16, F::SB);
        }
        let mut b = 0;
        while b < nb {
            let g = (nb - b).min(16);
            let lanes: __mmask16 = if g == 16 { 0xFFFF } else { (1u16 << g) - 1 };
            // Per token: the 4 loads' regrouped activations (evens, odds), −MIN·Σx and dx.
            let mut xe = [[_mm512_setzero_si512(); 4]; NR];
            let mut xo = [[_mm512_setzero_si512(); 4]; NR];
            let mut corr = [_mm512_setzero_si512(); NR];
            let mut dx = [_mm512_setzero_ps(); NR];
            for j in 0..NR {
                let t = (tok + j) * ne + b;
                let xr = x.q.as_ptr().add((tok + j) * ne * 32 + b * 32);
                let xbytes = ((ne - b) * 32).min(512);
                for i in 0..4 {
                    // Pairs (4i, 4i+1) and (4i+2, 4i+3) of this step: 64 bytes each.
                    let at = i * 128;
                    let m = |o: usize| -> __mmask64 {
                        let n = xbytes.saturating_sub(at + o).min(64);
                        if n == 64 { !0 } else { (1u64 << n) - 1 }
                    };
                    let p0 = _mm512_maskz_loadu_epi8(m(0), xr.add(at).cast());
                    let p1 = _mm512_maskz_loadu_epi8(m(64), xr.add(at + 64).cast());
                    xe[j][i] = _mm512_shuffle_i64x2::<0x44>(p0, p1);
                    xo[j][i] = _mm512_shuffle_i64x2::<0xEE>(p0, p1);
                }
                dx[j] = _mm512_maskz_loadu_ps(lanes, x.d.as_ptr().add(t));
                let sx = _mm512_maskz_loadu_epi32(lanes, x.s.as_ptr().add(t).cast());
                corr[j] = if F::MIN == -8 {
                    _mm512_slli_epi32::<3>(sx)
                } else if F::MIN == -12 {
                    _mm512_add_epi32(_mm512_slli_epi32::<3>(sx), _mm512_slli_epi32::<2>(sx))
                } else {
                    _mm512_mullo_epi32(sx, off)
                };
            }
            for i in 0..MR {
                let dw = scales16::<F>(ws.add(i * srow + b * F::SB), g);
                // Unpacked loads: (evens, odds) of blocks b + 4k .. b + 4k + 4.
                let mut u = [(_mm512_setzero_si512(), _mm512_setzero_si512()); 4];
                for k in 0..4 {
                    let blk = b + 4 * k;
                    if blk >= nb {
                        break;
                    }
                    let p = wq.add(i * row + blk * 16);
                    if NR == 1 {
                        prefetch(p.wrapping_add(ahead(MR, row)));
                    }
                    let n = ((nb - blk) * 16).min(64);
                    let raw = _mm512_maskz_loadu_epi8(if n == 64 { !0 } else { (1u64 << n) - 1 }, p.cast());
                    let lo = _mm512_and_si512(raw, m4);
                    let hi = _mm512_and_si512(_mm512_srli_epi16::<4>(raw), m4);
                    u[k] = (_mm512_shuffle_epi8(lut, lo), _mm512_shuffle_epi8(lut, hi));
                }
                for j in 0..NR {
                    let v: [__m512i; 4] = core::array::from_fn(|k| {
                        if b + 4 * k >= nb {
                            return _mm512_setzero_si512();
                        }
                        let e = _mm512_dpbusd_epi32(_mm512_setzero_si512(), u[k].0, xe[j][k]);
                        _mm512_dpbusd_epi32(e, u[k].1, xo[j][k])
                    });
                    let t01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
                    let t23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
                    let s = _mm512_add_epi32(_mm512_unpacklo_epi64(t01, t23), _mm512_unpackhi_epi64(t01, t23));
                    let s = _mm512_sub_epi32(_mm512_permutexvar_epi32(order, s), corr[j]);
                    let prod = _mm512_mul_ps(_mm512_cvtepi32_ps(s), _mm512_mul_ps(dw, dx[j]));
                    let a = _mm256_add_ps(acc[i][j], _mm512_castps512_ps256(prod));
                    let hi8 = _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(prod)));
                    acc[i][j] = _mm256_add_ps(a, hi8);
                }
            }
            b += g;
        }
    }
    // hsum8 reduces lanes in [0, 2, 4, 6, 1, 3, 5, 7] order (the 256-bit kernels' layout).
    let perm = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for i in 0..MR {
        for j in 0..NR {
            out[i + j * os] = hsum8(_mm256_permutevar8x32_ps(acc[i][j], perm));
        }
    }
}

/// AVX-512 VNNI's two paths: decoding one row at a time in the file's layout, prompts over
/// packed groups of rows ([`gemm_packed`]).
///
/// # Safety
/// As [`run`], with avx512f, avx512bw, avx512vnni, avx2, fma, f16c.
unsafe fn gemm_avx512vnni(w: &QWeights<'_>, r0: usize, nr: usize, x: &QActs, t: usize, out: &mut [f32]) {
    // SAFETY: forwarded contract (CPU features and bounds).
    unsafe {
        if t == 1 { run::<Avx512Vnni, 1, 1, 1>(w, r0, nr, x, t, out) } else { gemm_packed::<Q8>(w, r0, nr, x, t, out) }
    }
}

/// [`QActs::new`] on AVX2, or `None` without it.
pub(super) fn quantize(x: &[f32], t: usize, cols: usize) -> Option<QActs> {
    #[cfg(feature = "std")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked on the line above).
        return Some(unsafe { quantize_avx2(x, t, cols) });
    }
    let _ = (x, t, cols);
    None
}

/// The portable quantization compiled with 256-bit vectors (every operation is exact per
/// element, so the values are the same bits): quantizing runs on the calling thread between
/// parallel passes, while the workers wait.
///
/// # Safety
/// The CPU supports AVX2.
#[cfg(feature = "std")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_avx2(x: &[f32], t: usize, cols: usize) -> QActs {
    QActs::new_any(x, t, cols)
}

/// `out[i] = h[i]` as f32 with F16C, when the CPU has it; `false` (nothing written) if not.
pub(super) fn f16_to_f32(h: &[half::f16], out: &mut [f32]) -> bool {
    #[cfg(feature = "std")]
    let f16c = std::is_x86_feature_detected!("f16c") && std::is_x86_feature_detected!("avx");
    #[cfg(not(feature = "std"))]
    let f16c = cfg!(all(target_feature = "f16c", target_feature = "avx"));
    if f16c {
        // SAFETY: the CPU has f16c and avx (detected just above, at run time or compile time).
        unsafe { f16_to_f32_f16c(h, out) };
    }
    f16c
}

/// Runs `job` with the AVX2 attention loops if the CPU has AVX2; `false` (nothing ran) if not.
pub(super) fn run_heads<J: HeadJob>(job: &J, h0: usize, o: &mut [f32]) -> bool {
    #[cfg(feature = "std")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has AVX2 (checked on the line above).
        unsafe { run_heads_avx2(job, h0, o) };
        return true;
    }
    let _ = (job, h0, o);
    false
}

/// The job's code with 256-bit vectors and the [`Simd`] loops on AVX2. No FMA: multiply and
/// add round separately as in the portable loops, so the values are the same bits.
///
/// # Safety
/// The CPU supports AVX2.
#[cfg(feature = "std")]
#[target_feature(enable = "avx2")]
unsafe fn run_heads_avx2<J: HeadJob>(job: &J, h0: usize, o: &mut [f32]) {
    // SAFETY: the CPU has AVX2 (caller).
    unsafe { job.run_with::<Simd<HeadsAvx2>>(h0, o) }
}

/// F16C conversion of `h` into `out` (lengths must match).
///
/// # Safety
/// The CPU must support f16c and avx.
#[target_feature(enable = "avx,f16c")]
unsafe fn f16_to_f32_f16c(h: &[half::f16], out: &mut [f32]) {
    assert_eq!(h.len(), out.len());
    let n = h.len();
    let mut i = 0;
    while i + 8 <= n {
        // SAFETY: i + 8 <= n = h.len() = out.len(); unaligned load and store.
        unsafe {
            let v = _mm256_cvtph_ps(_mm_loadu_si128(h.as_ptr().add(i).cast()));
            _mm256_storeu_ps(out.as_mut_ptr().add(i), v);
        }
        i += 8;
    }
    for j in i..n {
        out[j] = h[j].to_f32();
    }
}

/// `g ≤ 8` f16 scales at `p` as f32, zero beyond `g`.
///
/// # Safety
/// f16c and avx; `p` valid for `2·g` bytes.
#[inline]
#[target_feature(enable = "avx,f16c")]
unsafe fn scales8(p: *const u8, g: usize) -> __m256 {
    let mut buf = [0u8; 16];
    // SAFETY: `p` holds 2·g bytes (caller), `buf` 16 ≥ 2·g.
    unsafe {
        if g == 8 {
            return _mm256_cvtph_ps(_mm_loadu_si128(p.cast()));
        }
        core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), 2 * g);
        _mm256_cvtph_ps(_mm_loadu_si128(buf.as_ptr().cast()))
    }
}

/// `g ≤ 8` f32 values at `p`, zero beyond `g`.
///
/// # Safety
/// avx; `p` valid for `g` values.
#[inline]
#[target_feature(enable = "avx")]
unsafe fn f32x8(p: *const f32, g: usize) -> __m256 {
    let mut buf = [0.0f32; 8];
    // SAFETY: `p` holds g values (caller), `buf` 8 ≥ g.
    unsafe {
        if g == 8 {
            return _mm256_loadu_ps(p);
        }
        core::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), g);
        _mm256_loadu_ps(buf.as_ptr())
    }
}

/// The sum of the 8 lanes, in a fixed order.
#[inline]
#[target_feature(enable = "avx")]
fn hsum8(acc: __m256) -> f32 {
    let h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    let h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    let h = _mm_add_ss(h, _mm_movehdup_ps(h));
    _mm_cvtss_f32(h)
}

// The 256-bit integer part, in two flavours producing the *same* eight i32 lanes per
// block (lane k = Σ of the products of bytes 4k..4k+3), so AVX2 and AVX-VNNI give
// bitwise equal results. Both instructions multiply an unsigned byte by a signed one:
//
// - AVX2 `maddubs`: `|w|` (−128 reads as 128 unsigned, exact) times `x` with `w`'s sign
//   (|x| ≤ 127, so nothing wraps); pair sums ≤ 2·128·127 fit in i16, then `madd` adds
//   pairs into i32. (`w + 128` would overflow maddubs' saturating i16 pair sums.)
// - VNNI `vpdpbusd` (i32 accumulation, no saturation): `w + 128` (= `w ^ 0x80`, in
//   0..=255) times `x`, which adds `128·Σx` to each lane; the lane starts from
//   `−128·Σx` (computed once per token block with a `vpdpbusd` of 128s by `x`), so the
//   result is exactly `Σ w·x`. Lane magnitudes stay below 4·255·127 — no overflow.

/// Per-row preparation of a weight block: `(w, |w|)` or `(w ^ 0x80, _)`.
#[inline]
#[target_feature(enable = "avx2")]
fn prep_w_avx2(w: __m256i) -> (__m256i, __m256i) {
    (w, _mm256_sign_epi8(w, w))
}
#[inline]
#[target_feature(enable = "avx2")]
fn prep_x_avx2(x: __m256i) -> (__m256i, __m256i) {
    (x, x)
}
#[inline]
#[target_feature(enable = "avx2")]
fn dot_avx2(w: (__m256i, __m256i), x: (__m256i, __m256i)) -> __m256i {
    _mm256_madd_epi16(_mm256_maddubs_epi16(w.1, _mm256_sign_epi8(x.0, w.0)), _mm256_set1_epi16(1))
}
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
fn prep_w_vnni(w: __m256i) -> (__m256i, __m256i) {
    (_mm256_xor_si256(w, _mm256_set1_epi8(-128)), w)
}
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
fn prep_x_vnni(x: __m256i) -> (__m256i, __m256i) {
    let z = _mm256_setzero_si256();
    (x, _mm256_sub_epi32(z, _mm256_dpbusd_avx_epi32(z, _mm256_set1_epi8(-128), x)))
}
#[inline]
#[target_feature(enable = "avx2,avxvnni")]
fn dot_vnni(w: (__m256i, __m256i), x: (__m256i, __m256i)) -> __m256i {
    _mm256_dpbusd_avx_epi32(x.1, w.0, x.0)
}

/// The 256-bit micro-kernel: per output one 8-lane f32 accumulator over every block of
/// the row, `acc = fma(f32(lanes_b), dw_b·dx_b, acc)`, summed once at the end.
macro_rules! tile256 {
    ($name:ident, $feat:literal, $prep_w:ident, $prep_x:ident, $dot:ident) => {
        /// # Safety
        /// As [`Micro::tile`](super::q8::Micro::tile), with the CPU features enabled here.
        #[target_feature(enable = $feat)]
        #[allow(clippy::needless_range_loop)] // [row][token] indices read best as such
        unsafe fn $name<const MR: usize, const NR: usize>(
            w: &QWeights<'_>,
            r: usize,
            x: &QActs,
            tok: usize,
            out: &mut [f32],
            os: usize,
        ) {
            let nb = w.nb;
            let row = nb * QK;
            let mut acc = [[_mm256_setzero_ps(); NR]; MR];
            // Scale products dw_b·dx_b of the current 8 blocks, per (row, token).
            let mut p = [[[0.0f32; 8]; NR]; MR];
            // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller): every pointer
            // below addresses block b + k < nb of one of them; loads are unaligned.
            unsafe {
                let wq = w.q.as_ptr().add(r * row);
                let ws = w.s.as_ptr().add(r * nb * 2);
                if NR == 1 {
                    prefetch_scales(ws, MR, nb);
                }
                let xq = x.q.as_ptr().add(tok * row);
                let xd = x.d.as_ptr().add(tok * nb);
                let mut b = 0;
                while b < nb {
                    let g = (nb - b).min(8);
                    let mut dw = [_mm256_setzero_ps(); MR];
                    for (i, d) in dw.iter_mut().enumerate() {
                        *d = scales8(ws.add(i * nb * 2 + 2 * b), g);
                    }
                    for j in 0..NR {
                        let dx = f32x8(xd.add(j * nb + b), g);
                        for i in 0..MR {
                            _mm256_storeu_ps(p[i][j].as_mut_ptr(), _mm256_mul_ps(dw[i], dx));
                        }
                    }
                    for k in 0..g {
                        let off = (b + k) * QK;
                        let mut xv = [(_mm256_setzero_si256(), _mm256_setzero_si256()); NR];
                        for (j, v) in xv.iter_mut().enumerate() {
                            *v = $prep_x(_mm256_loadu_si256(xq.add(j * row + off).cast()));
                        }
                        for i in 0..MR {
                            if NR == 1 && k % 2 == 0 {
                                prefetch(wq.wrapping_add(i * row + off + ahead(MR, row)));
                            }
                            let wv = $prep_w(_mm256_loadu_si256(wq.add(i * row + off).cast()));
                            for j in 0..NR {
                                let s = $dot(wv, xv[j]);
                                acc[i][j] =
                                    _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), _mm256_set1_ps(p[i][j][k]), acc[i][j]);
                            }
                        }
                    }
                    b += g;
                }
            }
            for i in 0..MR {
                for j in 0..NR {
                    out[i + j * os] = hsum8(acc[i][j]);
                }
            }
        }
    };
}
tile256!(tile_avx2, "avx2,fma,f16c", prep_w_avx2, prep_x_avx2, dot_avx2);
tile256!(tile_avxvnni, "avx2,fma,f16c,avxvnni", prep_w_vnni, prep_x_vnni, dot_vnni);

micro!(
    /// AVX2 `maddubs`/`madd`.
    Avx2 => tile_avx2
);

micro!(
    /// AVX-VNNI `vpdpbusd` on 256 bits.
    AvxVnni => tile_avxvnni
);

micro!(
    /// AVX-512 VNNI: `vpdpbusd` on 512 bits. One f32 order for both of its paths, so that a
    /// prompt and token-by-token decoding give the same bits: every block's exact i32 sum
    /// times `fl(dw·dx)` is added into one of 8 accumulators, block `b` into `b mod 8` in
    /// block order (fused multiply-add), and the 8 are summed as [`hsum8`] does.
    ///
    /// - Decoding ([`Micro::tile`](super::q8::Micro::tile), one row and one token at a time) reads a row in address
    ///   order, blocks `2k`, `2k + 1` per register (`w ^ 0x80` times `x`, as AVX-VNNI above),
    ///   reduces 16 blocks' lanes to their 16 sums ([`block_sums`]), takes off the `128·Σx`
    ///   that the unsigned operand added (from [`QActs::s`]) and adds them with two 8-lane
    ///   FMAs.
    /// - Prompts ([`gemm_packed`]) repack 16 rows at a time so that one register holds 4
    ///   bytes of each of 16 rows: 8 `vpdpbusd` sum a whole block of 16 rows against
    ///   broadcast activations, and the f32 work is one FMA per block and 16 rows instead of
    ///   three instructions per 2 blocks and row.
    Avx512Vnni => tile_avx512vnni
);

/// Blocks `b`, `b + 1` (only `b` when `two` is false; the high half is then zero).
///
/// # Safety
/// avx512f; `p` valid for 64 bytes (32 when `!two`).
#[inline]
#[target_feature(enable = "avx512f")]
unsafe fn load2(p: *const u8, two: bool) -> __m512i {
    // SAFETY: per the contract.
    unsafe { if two { _mm512_loadu_si512(p.cast()) } else { _mm512_zextsi256_si512(_mm256_loadu_si256(p.cast())) } }
}

/// Where [`block_sums`]' in-lane steps leave block `b`: lane `SPREAD[m]` holds block `m`.
const SPREAD: [i32; 16] = [0, 4, 1, 5, 2, 6, 3, 7, 8, 12, 9, 13, 10, 14, 11, 15];

/// The 16 exact block sums of 16 blocks, lane `b` = block `b`, from the 8 registers of
/// block pairs (`s[k]`: lanes 0..8 hold block `2k`'s partial sums, 8..16 block `2k + 1`'s).
/// Two steps inside 128-bit lanes (unpack and add: cheap), one across them, one permute.
#[inline]
#[target_feature(enable = "avx512f")]
fn block_sums(s: [__m512i; 8]) -> __m512i {
    // 128-bit lane q of s[k] holds 4 partial sums of block 2k + q / 2. Per 128-bit lane:
    // (a, c) → (a0 + a2, c0 + c2, a1 + a3, c1 + c3), then two such → 4 blocks' halves.
    let l1 = |a, b| _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
    let l2 = |a, b| _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    // v: 128-bit lanes 0, 1 hold blocks (0, 2, 4, 6) (two halves), 2, 3 blocks (1, 3, 5, 7).
    let v0 = l2(l1(s[0], s[1]), l1(s[2], s[3]));
    let v1 = l2(l1(s[4], s[5]), l1(s[6], s[7]));
    let t =
        _mm512_add_epi32(_mm512_shuffle_i32x4::<0b10_00_10_00>(v0, v1), _mm512_shuffle_i32x4::<0b11_01_11_01>(v0, v1));
    // t: blocks 0, 2, 4, 6, 1, 3, 5, 7, 8, 10, …; back into block order.
    // SAFETY: SPREAD is 16 i32, an unaligned 64-byte load.
    let ix = unsafe { _mm512_loadu_si512(SPREAD.as_ptr().cast()) };
    _mm512_permutexvar_epi32(ix, t)
}

/// # Safety
/// As [`Micro::tile`](super::q8::Micro::tile), with avx512f, avx512bw, avx512vnni, fma, f16c.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx,fma,f16c")]
#[allow(clippy::needless_range_loop)] // [row][token] indices read best as such
unsafe fn tile_avx512vnni<const MR: usize, const NR: usize>(
    w: &QWeights<'_>,
    r: usize,
    x: &QActs,
    tok: usize,
    out: &mut [f32],
    os: usize,
) {
    let nb = w.nb;
    let row = nb * QK;
    let k80 = _mm512_set1_epi8(-128);
    let zero = _mm512_setzero_si512();
    let mut acc = [[_mm256_setzero_ps(); NR]; MR];
    // SAFETY: rows r..r + MR and tokens tok..tok + NR exist (caller): every pointer below
    // addresses blocks < nb of one of them (the second block of a pair only when
    // 2k + 1 < g); loads are unaligned.
    unsafe {
        let wq = w.q.as_ptr().add(r * row);
        let ws = w.s.as_ptr().add(r * nb * 2);
        if NR == 1 {
            prefetch_scales(ws, MR, nb);
        }
        let xq = x.q.as_ptr().add(tok * row);
        let xd = x.d.as_ptr().add(tok * nb);
        let xsum = x.s.as_ptr().add(tok * nb);
        let mut b = 0;
        while b < nb {
            let g = (nb - b).min(16);
            let mut dw = [_mm512_setzero_ps(); MR];
            for (i, d) in dw.iter_mut().enumerate() {
                let s = ws.add(i * nb * 2 + 2 * b);
                *d = if g == 16 {
                    _mm512_cvtph_ps(_mm256_loadu_si256(s.cast()))
                } else {
                    let mut buf = [0u8; 32];
                    core::ptr::copy_nonoverlapping(s, buf.as_mut_ptr(), 2 * g);
                    _mm512_cvtph_ps(_mm256_loadu_si256(buf.as_ptr().cast()))
                };
            }
            for j in 0..NR {
                let s = xd.add(j * nb + b);
                let xs = xsum.add(j * nb + b);
                let (dx, sx) = if g == 16 {
                    (_mm512_loadu_ps(s), _mm512_loadu_si512(xs.cast()))
                } else {
                    let mut buf = [0.0f32; 16];
                    let mut sbuf = [0i32; 16];
                    core::ptr::copy_nonoverlapping(s, buf.as_mut_ptr(), g);
                    core::ptr::copy_nonoverlapping(xs, sbuf.as_mut_ptr(), g);
                    (_mm512_loadu_ps(buf.as_ptr()), _mm512_loadu_si512(sbuf.as_ptr().cast()))
                };
                // vpdpbusd of `w ^ 0x80` adds 128·Σx per block: taken off the 16 sums at once.
                let c = _mm512_slli_epi32::<7>(sx);
                for i in 0..MR {
                    // Pair k of block sums; pairs past the group's end are zero (and
                    // their scales too, so they add exact zeros).
                    let pair = |k: usize| {
                        if 2 * k >= g {
                            return zero;
                        }
                        let off = (b + 2 * k) * QK;
                        let two = 2 * k + 1 < g;
                        if NR == 1 {
                            prefetch(wq.wrapping_add(i * row + off + ahead(MR, row)));
                        }
                        let xx = load2(xq.add(j * row + off).cast(), two);
                        let wu = _mm512_xor_si512(load2(wq.add(i * row + off), two), k80);
                        _mm512_dpbusd_epi32(zero, wu, xx)
                    };
                    let sums = _mm512_cvtepi32_ps(_mm512_sub_epi32(block_sums(core::array::from_fn(pair)), c));
                    let p = _mm512_mul_ps(dw[i], dx);
                    let a = _mm256_fmadd_ps(_mm512_castps512_ps256(sums), _mm512_castps512_ps256(p), acc[i][j]);
                    acc[i][j] = _mm256_fmadd_ps(hi256(sums), hi256(p), a);
                }
            }
            b += g;
        }
    }
    for i in 0..MR {
        for j in 0..NR {
            out[i + j * os] = hsum8(acc[i][j]);
        }
    }
}

/// Lanes 8..16.
#[inline]
#[target_feature(enable = "avx512f")]
fn hi256(v: __m512) -> __m256 {
    _mm256_castpd_ps(_mm512_extractf64x4_pd::<1>(_mm512_castps_pd(v)))
}

/// Rows per packed group: one 32-bit lane of a 512-bit register per row.
const GROUP: usize = 16;

/// What [`gemm_packed`] needs of a block format: the unsigned bytes of a row's block in the
/// order of the activations, its scales, where the activations are and how the f32 sums go.
trait Packed {
    /// Weight bytes per block in the file.
    const CODE: usize;
    /// Scale bytes per block.
    const SB: usize;
    /// What every unsigned weight byte carries on top of its value (`Σ` takes `OFF·Σx` off).
    const OFF: i32;
    /// Row `row`'s block `b` as 32 unsigned bytes, in the order of the block's activations.
    ///
    /// # Safety
    /// avx2; row `row`, block `b` exist in `w`.
    unsafe fn block(w: &QWeights<'_>, row: usize, b: usize) -> __m256i;
    /// `g ≤ 8` scales of row `row` from block `b` (zero beyond `g`).
    ///
    /// # Safety
    /// avx2, f16c; the blocks exist.
    unsafe fn scales(w: &QWeights<'_>, row: usize, b: usize, g: usize) -> __m256;
    /// Index of token `tok`'s block `b` in `x.d` / `x.s`.
    fn xi(x: &QActs, tok: usize, b: usize) -> usize;
    /// Offset in `x.q` of activation bytes `4c..4c + 4` (c < 8) of token `tok`'s block `b`.
    fn xq(x: &QActs, tok: usize, b: usize, c: usize) -> usize;
    /// `acc + f32(sum) · p`, in the format's rounding (fused for Q8_0, not for 4-bit).
    ///
    /// # Safety
    /// avx512f.
    unsafe fn add(acc: __m512, sum: __m512i, p: __m512) -> __m512;
    /// The 8 accumulators (block `b` in `a[b mod 8]`), summed lane-wise in the format's order.
    ///
    /// # Safety
    /// avx512f.
    unsafe fn finish(a: &[__m512; 8]) -> __m512;
}

/// Q8_0 in [`gemm_packed`]: `w ^ 0x80`, fused multiply-adds, [`hsum8`]'s order.
struct Q8;
impl Packed for Q8 {
    const CODE: usize = QK;
    const SB: usize = 2;
    const OFF: i32 = 128;
    #[inline(always)]
    unsafe fn block(w: &QWeights<'_>, row: usize, b: usize) -> __m256i {
        // SAFETY: the block exists and the CPU has avx2 (caller); unaligned load.
        unsafe {
            let v = _mm256_loadu_si256(w.q.as_ptr().add((row * w.nb + b) * QK).cast());
            _mm256_xor_si256(v, _mm256_set1_epi8(-128))
        }
    }
    #[inline(always)]
    unsafe fn scales(w: &QWeights<'_>, row: usize, b: usize, g: usize) -> __m256 {
        // SAFETY: the blocks exist (caller): 2·g bytes (unaligned: the plane need not be 2-byte aligned).
        unsafe { scales8(w.s.as_ptr().add((row * w.nb + b) * 2), g) }
    }
    #[inline(always)]
    fn xi(x: &QActs, tok: usize, b: usize) -> usize {
        tok * x.nb + b
    }
    #[inline(always)]
    fn xq(x: &QActs, tok: usize, b: usize, c: usize) -> usize {
        (tok * x.nb + b) * QK + 4 * c
    }
    #[inline(always)]
    unsafe fn add(acc: __m512, sum: __m512i, p: __m512) -> __m512 {
        // SAFETY: avx512f (caller).
        unsafe { _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum), p, acc) }
    }
    #[inline(always)]
    unsafe fn finish(a: &[__m512; 8]) -> __m512 {
        // hsum8's order, lane by lane: ((a0 + a4) + (a2 + a6)) + ((a1 + a5) + (a3 + a7)).
        // SAFETY: avx512f (caller).
        unsafe {
            let e: [__m512; 4] = core::array::from_fn(|l| _mm512_add_ps(a[l], a[l + 4]));
            _mm512_add_ps(_mm512_add_ps(e[0], e[2]), _mm512_add_ps(e[1], e[3]))
        }
    }
}

/// A 4-bit format in [`gemm_packed`]: the codes looked up unsigned (`v − MIN`) in the
/// rearranged order (evens, then odds), multiply then add, `q4.rs`'s order.
struct Four<F>(core::marker::PhantomData<F>);
impl<F: Nib> Packed for Four<F> {
    const CODE: usize = 16;
    const SB: usize = F::SB;
    const OFF: i32 = -(F::MIN as i32);
    #[inline(always)]
    unsafe fn block(w: &QWeights<'_>, row: usize, b: usize) -> __m256i {
        let lut = const { unsigned_lut::<F>() };
        // SAFETY: the table is 16 bytes and the block 16 (caller); unaligned loads; avx2 (caller).
        unsafe {
            let (lut, raw) =
                (_mm_loadu_si128(lut.as_ptr().cast()), _mm_loadu_si128(w.q.as_ptr().add((row * w.nb + b) * 16).cast()));
            let m4 = _mm_set1_epi8(0x0F);
            let lo = _mm_shuffle_epi8(lut, _mm_and_si128(raw, m4));
            let hi = _mm_shuffle_epi8(lut, _mm_and_si128(_mm_srli_epi16::<4>(raw), m4));
            _mm256_set_m128i(hi, lo)
        }
    }
    #[inline(always)]
    unsafe fn scales(w: &QWeights<'_>, row: usize, b: usize, g: usize) -> __m256 {
        // SAFETY: the blocks exist (caller).
        unsafe {
            let p = w.s.as_ptr().add((row * w.nb + b) * F::SB);
            if F::SB == 2 { scales8(p, g) } else { e8m0x8::<F>(p, g) }
        }
    }
    #[inline(always)]
    fn xi(x: &QActs, tok: usize, b: usize) -> usize {
        tok * x.nb.next_multiple_of(2) + b
    }
    #[inline(always)]
    fn xq(x: &QActs, tok: usize, b: usize, c: usize) -> usize {
        // Pair (b/2): [evens of 2p | evens of 2p + 1 | odds of 2p | odds of 2p + 1].
        let pair = (tok * x.nb.next_multiple_of(2) + b / 2 * 2) * QK;
        pair + (c / 4) * 32 + (b % 2) * 16 + 4 * (c % 4)
    }
    #[inline(always)]
    unsafe fn add(acc: __m512, sum: __m512i, p: __m512) -> __m512 {
        // SAFETY: avx512f (caller).
        unsafe { _mm512_add_ps(acc, _mm512_mul_ps(_mm512_cvtepi32_ps(sum), p)) }
    }
    #[inline(always)]
    unsafe fn finish(a: &[__m512; 8]) -> __m512 {
        // q4.rs: ((A0 + A1) + (A4 + A5)) + ((A2 + A3) + (A6 + A7)).
        // SAFETY: avx512f (caller).
        let add = |x, y| unsafe { _mm512_add_ps(x, y) };
        add(add(add(a[0], a[1]), add(a[4], a[5])), add(add(a[2], a[3]), add(a[6], a[7])))
    }
}

/// A prompt pass (`t ≥ 2`) over rows `r0..r0 + nr`, `out` token-major (`t × nr`), in
/// [`Avx512Vnni`]'s f32 order.
///
/// Each group of 16 rows is repacked once into a buffer that stays in L1/L2 while every
/// token runs over it: per block, 8 registers whose lane `i` holds bytes `4c..4c + 4` of
/// row `i` (`^ 0x80`, the unsigned operand of `vpdpbusd`), then the 16 rows' scales as
/// f32. A missing row of the last group is zero weights with zero scales. Decoding (one
/// token) keeps the file's layout ([`Micro::tile`](super::q8::Micro::tile)); from two tokens on, this runs.
///
/// # Safety
/// avx512f, avx512bw, avx512vnni, avx2, fma, f16c; rows `r0..r0 + nr` of `w` and tokens
/// `..t` of `x` exist (`x.nb == w.nb`); `out.len() == t · nr`.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx,avx2,fma,f16c")]
unsafe fn gemm_packed<P: Packed>(w: &QWeights<'_>, r0: usize, nr: usize, x: &QActs, t: usize, out: &mut [f32]) {
    let nb = w.nb;
    let mut wp = alloc::vec![_mm512_setzero_si512(); nb * 8];
    let mut sp = alloc::vec![0.0f32; nb * GROUP];
    // Whole 8-scale vectors (zero past nb), as `scales8` gives them.
    let mut srow = alloc::vec![0.0f32; nb.next_multiple_of(8)];
    for g0 in (0..nr).step_by(GROUP) {
        let gr = (nr - g0).min(GROUP);
        // SAFETY: rows r0 + g0..r0 + g0 + gr exist (caller); features as ours.
        unsafe { pack::<P>(w, r0 + g0, gr, &mut wp, &mut sp, &mut srow) };
        // The next group's weights and scales, hinted a share per token step while this
        // group computes, so that packing it finds them in cache.
        let (row, srow_bytes, nx) = (nb * P::CODE, nb * P::SB, (nr - g0 - gr).min(GROUP));
        let next_q = w.q.as_ptr().wrapping_add((r0 + g0 + gr) * row);
        let next_s = w.s.as_ptr().wrapping_add((r0 + g0 + gr) * srow_bytes);
        let sshare = |a: usize| a / P::CODE * P::SB;
        let share = (nx * row).div_ceil(t.div_ceil(2)).next_multiple_of(64);
        let mut ahead = 0;
        let mut tok = 0;
        while tok < t {
            if ahead < nx * row {
                prefetch_range(next_q.wrapping_add(ahead), share.min(nx * row - ahead));
                prefetch_range(next_s.wrapping_add(sshare(ahead)), sshare(share).min(nx * srow_bytes - sshare(ahead)));
                ahead += share;
            }
            // SAFETY: tokens tok..tok + 2 (or 1) < t exist; the group's outputs lie in `out`.
            unsafe {
                if tok + 2 <= t {
                    group_tokens::<P, 2>(&wp, &sp, x, tok, out, nr, g0, gr);
                    tok += 2;
                } else {
                    group_tokens::<P, 1>(&wp, &sp, x, tok, out, nr, g0, gr);
                    tok += 1;
                }
            }
        }
    }
}

/// Packs rows `r..r + gr` (`gr ≤ 16`) into `wp` (per block 8 registers, see
/// [`gemm_packed`]) and `sp` (per block 16 f32 scales); `srow` is scratch of `nb` values
/// rounded up to a multiple of 8.
///
/// # Safety
/// As [`gemm_packed`]'s features; rows `r..r + gr` of `w` exist.
#[target_feature(enable = "avx512f,avx512bw,avx,avx2,f16c")]
unsafe fn pack<P: Packed>(w: &QWeights<'_>, r: usize, gr: usize, wp: &mut [__m512i], sp: &mut [f32], srow: &mut [f32]) {
    let nb = w.nb;
    // Qword indices joining 128-bit lanes (0, 0', 2, 2') and (1, 1', 3, 3') of two registers.
    let lo = _mm512_setr_epi64(0, 1, 8, 9, 4, 5, 12, 13);
    let hi = _mm512_setr_epi64(2, 3, 10, 11, 6, 7, 14, 15);
    for b in 0..nb {
        // Register i: row i's block in its low half, row i + 8's in its high half.
        // SAFETY: rows r + i < r + gr exist (caller). A missing row is zero bytes (its
        // scales are zero too).
        let ld = |i: usize| unsafe { if i < gr { P::block(w, r + i, b) } else { _mm256_setzero_si256() } };
        let z: [__m512i; 8] =
            core::array::from_fn(|i| _mm512_inserti64x4::<1>(_mm512_castsi256_si512(ld(i)), ld(i + 8)));
        // An 8×8 transpose of 32-bit values in each 256-bit half.
        let t0: [__m512i; 8] = core::array::from_fn(|k| {
            let (a, b) = (z[2 * (k / 2)], z[2 * (k / 2) + 1]);
            if k % 2 == 0 { _mm512_unpacklo_epi32(a, b) } else { _mm512_unpackhi_epi32(a, b) }
        });
        // u[4h + m]: rows 4h..4h + 4 of columns m and m + 4 (in 128-bit lanes 0/2 and 1/3).
        let u: [__m512i; 8] = core::array::from_fn(|k| {
            let (h, m) = (k / 4, k % 4);
            let (a, b) = (t0[4 * h + m / 2], t0[4 * h + m / 2 + 2]);
            if m % 2 == 0 { _mm512_unpacklo_epi64(a, b) } else { _mm512_unpackhi_epi64(a, b) }
        });
        for c in 0..8 {
            let (m, ix) = (c % 4, if c < 4 { lo } else { hi });
            wp[b * 8 + c] = _mm512_permutex2var_epi64(u[m], ix, u[4 + m]);
        }
    }
    for i in 0..GROUP {
        if i < gr {
            for b in (0..nb).step_by(8) {
                // SAFETY: row r + i's blocks b..b + min(8, nb − b) exist (caller); values
                // b..b + 8 ≤ srow.len() of `srow`.
                unsafe { _mm256_storeu_ps(srow.as_mut_ptr().add(b), P::scales(w, r + i, b, (nb - b).min(8))) };
            }
        } else {
            srow.fill(0.0);
        }
        for (b, &v) in srow[..nb].iter().enumerate() {
            sp[b * GROUP + i] = v;
        }
    }
}

/// Tokens `tok..tok + NT` over a packed group: `out[(tok + j)·nr + g0 + i]` for rows `i < gr`.
///
/// # Safety
/// As [`gemm_packed`]; `wp`, `sp` packed for `x.nb` blocks; tokens `tok..tok + NT` exist.
#[target_feature(enable = "avx512f,avx512bw,avx512vnni,avx,avx2,fma")]
#[allow(clippy::too_many_arguments)]
unsafe fn group_tokens<P: Packed, const NT: usize>(
    wp: &[__m512i],
    sp: &[f32],
    x: &QActs,
    tok: usize,
    out: &mut [f32],
    nr: usize,
    g0: usize,
    gr: usize,
) {
    let nb = x.nb;
    // The lengths, told to the optimiser: without them each `step` keeps eight bounds checks,
    // is not always inlined (it depends on how the crate is split into codegen units) and the
    // prompt kernel ran 35 % slower (`q8_gemm_t128/Avx512Vnni`).
    let (wp, sp) = (&wp[..nb * 8], &sp[..nb * GROUP]);
    let mut acc = [[_mm512_setzero_ps(); 8]; NT];
    // Block `b` into accumulator `L = b mod 8`, written out 8 times with a literal `L` so the
    // accumulator index is a constant. (With two tokens, 16 accumulators, 8 weight registers
    // and the i32 chains exceed 32 registers, so some still spill.)
    let step = |acc: &mut [[__m512; 8]; NT], b: usize, l: usize| {
        let wv: [__m512i; 8] = core::array::from_fn(|c| wp[b * 8 + c]);
        // SAFETY: sp holds nb·16 values; unaligned load.
        let d = unsafe { _mm512_loadu_ps(sp.as_ptr().add(b * GROUP)) };
        for (j, a) in acc.iter_mut().enumerate() {
            let k = P::xi(x, tok + j, b);
            // SAFETY: token tok + j exists (caller): bytes 4c..4c + 4 of its block b lie in
            // x.q; unaligned read.
            let xc = |c: usize| {
                _mm512_set1_epi32(unsafe { x.q.as_ptr().add(P::xq(x, tok + j, b, c)).cast::<i32>().read_unaligned() })
            };
            // Four chains of 2 instead of one of 8 (exact i32 either way).
            let z = _mm512_setzero_si512();
            // vpdpbusd of the unsigned bytes adds OFF·Σx: start from −OFF·Σx.
            let mut s = [_mm512_set1_epi32(-P::OFF * x.s[k]), z, z, z];
            for c in 0..8 {
                s[c % 4] = _mm512_dpbusd_epi32(s[c % 4], wv[c], xc(c));
            }
            let (s0, s1) = (_mm512_add_epi32(s[0], s[2]), _mm512_add_epi32(s[1], s[3]));
            let p = _mm512_mul_ps(d, _mm512_set1_ps(x.d[k]));
            // SAFETY: avx512f (this function's features).
            a[l] = unsafe { P::add(a[l], _mm512_add_epi32(s0, s1), p) };
        }
    };
    let mut b8 = 0;
    while b8 + 8 <= nb {
        step(&mut acc, b8, 0);
        step(&mut acc, b8 + 1, 1);
        step(&mut acc, b8 + 2, 2);
        step(&mut acc, b8 + 3, 3);
        step(&mut acc, b8 + 4, 4);
        step(&mut acc, b8 + 5, 5);
        step(&mut acc, b8 + 6, 6);
        step(&mut acc, b8 + 7, 7);
        b8 += 8;
    }
    for b in b8..nb {
        step(&mut acc, b, b - b8);
    }
    for (j, a) in acc.iter().enumerate() {
        // SAFETY: avx512f (this function's features).
        let v = unsafe { P::finish(a) };
        let o = &mut out[(tok + j) * nr + g0..][..gr];
        // SAFETY: masked store of the first gr ≤ 16 lanes into `o`, which holds gr values.
        unsafe { _mm512_mask_storeu_ps(o.as_mut_ptr(), ((1u32 << gr) - 1) as u16, v) };
    }
}

/// The attention loops' vector pieces in 256-bit AVX2 (run-time detected by the caller).
struct HeadsAvx2;

impl SimdOps for HeadsAvx2 {
    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn dot4(q: *const f32, k: [*const f32; 4], n: usize) -> [f32; 4] {
        let full = n / 8 * 8;
        let mut a = [_mm256_setzero_ps(); 4];
        let mut c = 0;
        // SAFETY: c + 8 ≤ full ≤ n: within every row (contract).
        unsafe {
            while c < full {
                let qv = _mm256_loadu_ps(q.add(c));
                a[0] = _mm256_add_ps(a[0], _mm256_mul_ps(qv, _mm256_loadu_ps(k[0].add(c))));
                a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(qv, _mm256_loadu_ps(k[1].add(c))));
                a[2] = _mm256_add_ps(a[2], _mm256_mul_ps(qv, _mm256_loadu_ps(k[2].add(c))));
                a[3] = _mm256_add_ps(a[3], _mm256_mul_ps(qv, _mm256_loadu_ps(k[3].add(c))));
                c += 8;
            }
        }
        let mut out = [0.0f32; 4];
        for p in 0..4 {
            let mut tail = 0.0f32;
            for i in full..n {
                // SAFETY: i < n (contract).
                tail += unsafe { *q.add(i) * *k[p].add(i) };
            }
            let s = _mm_add_ps(_mm256_castps256_ps128(a[p]), _mm256_extractf128_ps::<1>(a[p]));
            let u = _mm_add_ps(s, _mm_movehdup_ps(s));
            out[p] = _mm_cvtss_f32(_mm_add_ss(u, _mm_movehl_ps(u, u))) + tail;
        }
        out
    }

    #[inline]
    #[target_feature(enable = "avx2")]
    unsafe fn slice16<const H: usize>(
        s: *const f32,
        span: usize,
        r: *const f32,
        stride: usize,
        o: *mut f32,
        ostride: usize,
        j0: usize,
        j1: usize,
        pf: Option<usize>,
    ) {
        // SAFETY: every address is valid (contract).
        unsafe {
            let mut acc = [[_mm256_setzero_ps(); 2]; H];
            for (h, a) in acc.iter_mut().enumerate() {
                let at = o.add(h * ostride);
                *a = [_mm256_loadu_ps(at), _mm256_loadu_ps(at.add(8))];
            }
            for jj in j0..j1 {
                if let Some(hd) = pf {
                    prefetch_row::<HeadsAvx2>(r.wrapping_add((jj + 4) * stride), hd);
                }
                let v = r.add(jj * stride);
                let (v0, v1) = (_mm256_loadu_ps(v), _mm256_loadu_ps(v.add(8)));
                for (h, a) in acc.iter_mut().enumerate() {
                    let p = _mm256_set1_ps(*s.add(h * span + jj));
                    a[0] = _mm256_add_ps(a[0], _mm256_mul_ps(p, v0));
                    a[1] = _mm256_add_ps(a[1], _mm256_mul_ps(p, v1));
                }
            }
            for (h, a) in acc.iter().enumerate() {
                let at = o.add(h * ostride);
                _mm256_storeu_ps(at, a[0]);
                _mm256_storeu_ps(at.add(8), a[1]);
            }
        }
    }

    #[inline(always)]
    fn prefetch(p: *const f32) {
        self::prefetch(p.cast())
    }
}

#[cfg(test)]
mod tests {
    use super::super::q8::tests::{BLOCKS, SHAPES, case, rng};
    use super::*;
    use alloc::vec;

    #[test]
    fn the_4bit_kernels_of_this_cpu_are_listed() {
        // The bitwise test in q4.rs compares what is listed: make sure that is what this CPU has.
        use std::is_x86_feature_detected as has;
        for dtype in [crate::format::DType::Q4_0, crate::format::DType::MXFP4] {
            let names: Vec<&str> = super::super::q4::candidates(dtype).iter().map(|k| k.name()).collect();
            let (avx2, vnni, avx512) = q8_features();
            assert_eq!(names.contains(&"Avx2"), avx2, "{names:?}");
            assert_eq!(names.contains(&"AvxVnni"), vnni, "{names:?}");
            assert_eq!(names.contains(&"Avx512Vnni"), avx512 && has!("avx512vl"), "{names:?}");
        }
    }

    #[test]
    fn avx_vnni_equals_avx2_bitwise() {
        // AVX-VNNI computes the same i32 lanes and f32 operations as AVX2 (see `tile256!`);
        // `q8_kernels` never lists it without AVX2.
        let all = Kernel::available();
        let Some(vnni) = all.iter().find(|k| k.name() == "AvxVnni") else { return };
        let avx2 = all.iter().find(|k| k.name() == "Avx2").expect("AVX2 listed");
        let mut r = rng(5);
        for nb in BLOCKS {
            for (rows, t) in SHAPES {
                let (wq, ws, x) = case(&mut r, rows, nb, t);
                let w = QWeights::q8(&wq, &ws, nb);
                let (mut a, mut b) = (vec![0.0; rows * t], vec![0.0; rows * t]);
                avx2.gemm(&w, 0, rows, &x, t, &mut a);
                vnni.gemm(&w, 0, rows, &x, t, &mut b);
                assert_eq!(a, b, "nb{nb} {rows}x{t}");
            }
        }
    }
}
