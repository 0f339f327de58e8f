//! Every other architecture: no SIMD kernels, the portable code runs everywhere. The same
//! functions as `x86_64.rs` and `aarch64.rs`, each saying "nothing here".

use super::heads::HeadJob;
use super::q8::{Kernel, QActs};
use alloc::vec::Vec;

/// No prefetch instruction here.
#[inline(always)]
pub(super) fn prefetch(_p: *const u8) {}

/// No SIMD Q8_0 kernels here.
pub(super) fn q8_kernels(_v: &mut Vec<Kernel>) {}

/// No SIMD 4-bit kernels here.
pub(super) fn q4_kernels<F: super::q4::Nib>(_v: &mut Vec<Kernel>) {}

/// The portable quantization runs: `None`.
pub(super) fn quantize(_x: &[f32], _t: usize, _cols: usize) -> Option<QActs> {
    None
}

/// `half`'s conversion runs: `false`.
pub(super) fn f16_to_f32(_h: &[half::f16], _out: &mut [f32]) -> bool {
    false
}

/// The portable attention loops run: `false`.
pub(super) fn run_heads<J: HeadJob>(_job: &J, _h0: usize, _o: &mut [f32]) -> bool {
    false
}
