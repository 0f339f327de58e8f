//! Alignment arithmetic, shared by the file layout ([`crate::format`]) and the layout of the
//! quantized blocks inside a tensor ([`crate::quant`]); its own module so that neither of
//! those imports the other for it.

/// `x` rounded up to a multiple of the power of two `align`, or `None` on overflow.
pub fn align_up(x: u64, align: u64) -> Option<u64> {
    Some(x.checked_add(align - 1)? & !(align - 1))
}
