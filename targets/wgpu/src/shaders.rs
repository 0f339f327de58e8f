//! WGSL compute kernels, one module per kernel.
//!
//! Binding convention (shared with `gpu.rs`): binding 0 is the kernel's parameters (a uniform
//! of 16 words at a dynamic offset), then the read-only storage buffers, then the read-write
//! ones. Large dispatches are 2-D (`x` at most 32768 groups), linearised with `nwg.x`.

/// Parameters and helpers every kernel starts with.
const PRELUDE: &str = r"
struct Params { v: array<vec4<u32>, 4> }
@group(0) @binding(0) var<uniform> P: Params;
fn pu(i: u32) -> u32 { return P.v[i / 4u][i % 4u]; }
fn pf(i: u32) -> f32 { return bitcast<f32>(pu(i)); }
const WG: u32 = 64u;
var<workgroup> red: array<f32, 64>;
// Tree reduction over the 64 lanes of a workgroup (sum); every lane gets the result.
fn reduce_sum(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = red[lid] + red[lid + s]; }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
// torch's softplus (threshold 20), log1p through the exact-rounding correction.
fn softplus(x: f32) -> f32 {
    if (x > 20.0) { return x; }
    let e = exp(x);
    let u = 1.0 + e;
    if (u == 1.0) { return e; }
    return log(u) * (e / (u - 1.0));
}
fn reduce_max(lid: u32, v: f32) -> f32 {
    red[lid] = v;
    workgroupBarrier();
    for (var s = 32u; s > 0u; s = s >> 1u) {
        if (lid < s) { red[lid] = max(red[lid], red[lid + s]); }
        workgroupBarrier();
    }
    let r = red[0];
    workgroupBarrier();
    return r;
}
";

/// `y[t, n] = x[t, k] · W[n, k]ᵀ` for f32/f16/bf16 weights (decoded to f32, f32 sums).
/// Params: n, k, t, dtype (0 f32, 1 f16, 2 bf16). Workgroup per (row, token).
const MATMUL: &str = r"
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<u32>;
@group(0) @binding(3) var<storage, read_write> y: array<f32>;
fn weight(e: u32, dtype: u32) -> f32 {
    if (dtype == 0u) { return bitcast<f32>(w[e]); }
    let word = w[e >> 1u];
    let hw = select(word & 0xffffu, word >> 16u, (e & 1u) == 1u);
    if (dtype == 1u) { return unpack2x16float(hw).x; }
    return bitcast<f32>(hw << 16u);
}
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid3: vec3<u32>) {
    let n = pu(0u); let k = pu(1u); let dtype = pu(3u);
    let row = wid.x + wid.y * nwg.x;
    let tok = wid.z;
    let lid = lid3.x;
    let valid = row < n;
    let r = min(row, n - 1u);
    var acc = 0.0;
    for (var c = lid; c < k; c += WG) {
        acc += weight(r * k + c, dtype) * x[tok * k + c];
    }
    let s = reduce_sum(lid, acc);
    if (lid == 0u && valid) { y[tok * n + row] = s; }
}
";

/// Q8_0 weights times activations quantized per 32-block (`quant_q8`): each block is an exact
/// int32 sum of int8 products (`dot4I8Packed`, or the portable `DOT4` fallback), scaled by
/// both block scales, as the CPU's Q8_0 kernels compute it.
/// Params: n, k, t, nb (blocks per row), soff (byte offset of the scale plane).
const MATMUL_Q8: &str = r"
@group(0) @binding(1) var<storage, read> xq: array<u32>;
@group(0) @binding(2) var<storage, read> xd: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
DOT4
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid3: vec3<u32>) {
    let n = pu(0u); let nb = pu(3u); let soff = pu(4u);
    let row = wid.x + wid.y * nwg.x;
    let tok = wid.z;
    let lid = lid3.x;
    let valid = row < n;
    let r = min(row, n - 1u);
    var acc = 0.0;
    for (var b = lid; b < nb; b += WG) {
        let wo = (r * nb + b) * 8u;
        let xo = (tok * nb + b) * 8u;
        var s = 0;
        for (var i = 0u; i < 8u; i++) { s += dot4(w[wo + i], xq[xo + i]); }
        let sb = soff + (r * nb + b) * 2u;
        let word = w[sb >> 2u];
        let dw = unpack2x16float(select(word & 0xffffu, word >> 16u, (sb & 2u) == 2u)).x;
        acc += (dw * xd[tok * nb + b]) * f32(s);
    }
    let s = reduce_sum(lid, acc);
    if (lid == 0u && valid) { y[tok * n + row] = s; }
}
";

/// 4-bit weights (`Q4_0`, `MXFP4`, the file's planes as stored: docs/FORMAT.md §10a) times
/// activations quantized per 32-block (`quant_q8`), as the CPU's 4-bit kernels compute it
/// (`runtime/src/kernels/q4.rs`): each code through the format's integer value `v(n)`
/// (`Q4_0`: `n − 8`; `MXFP4`: twice the E2M1 value, `0, ±1, ±2, ±3, ±4, ±6, ±8, ±12`) packed
/// four to a word as int8, an exact int32 block sum with `dot4`, times the block's weight scale
/// (f16; or E8M0 halved, for the doubling) and activation scale.
/// Params: n, k, t, nb (blocks per row), soff (byte offset of the scale plane), fmt (0 `Q4_0`,
/// 1 `MXFP4`).
const MATMUL_Q4: &str = r"
@group(0) @binding(1) var<storage, read> xq: array<u32>;
@group(0) @binding(2) var<storage, read> xd: array<f32>;
@group(0) @binding(3) var<storage, read> w: array<u32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
DOT4
// The integer value of code `n` (0..16), as an int8 in the low byte.
fn code(fmt: u32, n: u32) -> u32 {
    if (fmt == 0u) { return (n - 8u) & 0xffu; }
    let m = n & 7u;
    var v = m;
    if (m >= 4u) { v = (4u + 2u * (m & 1u)) << ((m - 4u) >> 1u); }
    if ((n & 8u) != 0u) { v = 0u - v; }
    return v & 0xffu;
}
// Four values from two code bytes (the low byte of `h`, then the next one): value 2j low
// nibble, value 2j + 1 high nibble, packed as int8x4.
fn unpack4(fmt: u32, h: u32) -> u32 {
    return code(fmt, h & 15u) | (code(fmt, (h >> 4u) & 15u) << 8u)
        | (code(fmt, (h >> 8u) & 15u) << 16u) | (code(fmt, (h >> 12u) & 15u) << 24u);
}
// Block scale in the units of `code`: the f16, or 2^(e − 127) / 2 (e = 0xFF: NaN).
fn wscale(fmt: u32, r: u32, nb: u32, b: u32, soff: u32) -> f32 {
    if (fmt == 0u) {
        let sb = soff + (r * nb + b) * 2u;
        let word = w[sb >> 2u];
        return unpack2x16float(select(word & 0xffffu, word >> 16u, (sb & 2u) == 2u)).x;
    }
    let sb = soff + r * nb + b;
    let e = (w[sb >> 2u] >> (8u * (sb & 3u))) & 0xffu;
    var bits = 0x200000u << e;
    if (e >= 2u) { bits = (e - 1u) << 23u; }
    if (e == 0xffu) { bits = 0x7fc00000u; }
    return bitcast<f32>(bits);
}
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid3: vec3<u32>) {
    let n = pu(0u); let nb = pu(3u); let soff = pu(4u); let fmt = pu(5u);
    let row = wid.x + wid.y * nwg.x;
    let tok = wid.z;
    let lid = lid3.x;
    let valid = row < n;
    let r = min(row, n - 1u);
    var acc = 0.0;
    for (var b = lid; b < nb; b += WG) {
        let wo = (r * nb + b) * 4u;
        let xo = (tok * nb + b) * 8u;
        var s = 0;
        for (var i = 0u; i < 4u; i++) {
            let ww = w[wo + i];
            s += dot4(unpack4(fmt, ww & 0xffffu), xq[xo + 2u * i]);
            s += dot4(unpack4(fmt, ww >> 16u), xq[xo + 2u * i + 1u]);
        }
        acc += f32(s) * (wscale(fmt, r, nb, b, soff) * xd[tok * nb + b]);
    }
    let s = reduce_sum(lid, acc);
    if (lid == 0u && valid) { y[tok * n + row] = s; }
}
";

/// The portable int8x4 dot product (for adapters without the packed-dot language feature).
pub const DOT4_PORTABLE: &str = r"
fn dot4(a: u32, b: u32) -> i32 {
    let x = vec4<i32>(bitcast<i32>(a << 24u) >> 24u, bitcast<i32>(a << 16u) >> 24u,
                      bitcast<i32>(a << 8u) >> 24u, bitcast<i32>(a) >> 24u);
    let y = vec4<i32>(bitcast<i32>(b << 24u) >> 24u, bitcast<i32>(b << 16u) >> 24u,
                      bitcast<i32>(b << 8u) >> 24u, bitcast<i32>(b) >> 24u);
    return dot(x, y);
}
";

/// The packed int8x4 dot product of WGSL's `packed_4x8_integer_dot_product` extension.
pub const DOT4_PACKED: &str = "fn dot4(a: u32, b: u32) -> i32 { return dot4I8Packed(a, b); }\n";

/// Quantizes `x[t, k]` per 32-block: `d = max|x| / 127`, `q = round(x / d)` half away from
/// zero, clamped to ±127; `q` packed four to a word (rows padded with zeros to whole blocks).
/// Params: k, t, nb. One invocation per (token, block).
const QUANT_Q8: &str = r"
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> xq: array<u32>;
@group(0) @binding(3) var<storage, read_write> xd: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let k = pu(0u); let t = pu(1u); let nb = pu(2u);
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= t * nb) { return; }
    let tok = i / nb; let b = i % nb;
    let c0 = b * 32u;
    var amax = 0.0;
    for (var c = c0; c < min(c0 + 32u, k); c++) { amax = max(amax, abs(x[tok * k + c])); }
    let d = amax / 127.0;
    var id = 0.0;
    if (d > 0.0) { id = 1.0 / d; }
    xd[i] = d;
    for (var wd = 0u; wd < 8u; wd++) {
        var packed = 0u;
        for (var j = 0u; j < 4u; j++) {
            let c = c0 + wd * 4u + j;
            var q = 0.0;
            if (c < k) {
                let v = x[tok * k + c] * id;
                q = clamp(sign(v) * floor(abs(v) + 0.5), -127.0, 127.0);
            }
            packed |= (bitcast<u32>(i32(q)) & 0xffu) << (8u * j);
        }
        xq[i * 8u + wd] = packed;
    }
}
";

/// RMSNorm or LayerNorm of each row of `width` values: `out = norm(x) · w (+ b)`.
/// Params: width, eps, kind (0 rms, 1 layer), x row stride, y row stride (0: `width`), groups
/// (0 or 1: one weight row for every row; `g` > 1: row `r` takes the weights (and bias)
/// `[(r % g) · width ..][..width]`, a norm per group of a wider row). Workgroup per row.
const NORM: &str = r"
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read> wt: array<f32>;
@group(0) @binding(3) var<storage, read> bs: array<f32>;
@group(0) @binding(4) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>,
        @builtin(local_invocation_id) lid3: vec3<u32>) {
    let width = pu(0u); let eps = pf(1u); let kind = pu(2u);
    let xs = select(pu(3u), width, pu(3u) == 0u);
    let ys = select(pu(4u), width, pu(4u) == 0u);
    let row = wid.x + wid.y * nwg.x;
    let lid = lid3.x;
    let base = row * xs;
    let ob = row * ys;
    let wo = select(0u, (row % pu(5u)) * width, pu(5u) > 1u);
    if (kind == 0u) {
        var ss = 0.0;
        for (var c = lid; c < width; c += WG) { let v = x[base + c]; ss += v * v; }
        let inv = 1.0 / sqrt(reduce_sum(lid, ss) / f32(width) + eps);
        for (var c = lid; c < width; c += WG) { y[ob + c] = wt[wo + c] * (x[base + c] * inv); }
    } else {
        var s = 0.0;
        for (var c = lid; c < width; c += WG) { s += x[base + c]; }
        let mean = reduce_sum(lid, s) / f32(width);
        var v2 = 0.0;
        for (var c = lid; c < width; c += WG) { let d = x[base + c] - mean; v2 += d * d; }
        let inv = 1.0 / sqrt(reduce_sum(lid, v2) / f32(width) + eps);
        for (var c = lid; c < width; c += WG) { y[ob + c] = (x[base + c] - mean) * inv * wt[wo + c] + bs[wo + c]; }
    }
}
";

/// Element-wise ops on `y` (`n` values) with a second operand `x`. Params: n, op, a (u32),
/// b (f32). Ops: 0 `y += x`; 1 `y += x[i % a]` (bias); 2 `y = clamp(y, ±b)`; 3 `y = act_a(y)`;
/// 4 `y = act_a(y) · x` (gated); 5 `y *= sigmoid(x[i / a])` (row gate); 6 `y = x`;
/// 7 GPT-OSS's clamped SwiGLU of gate `y` and up `x` (alpha = bits of `a`, limit `b`, in the
/// CPU's order of operations); 8 `y += x · b` (scaled residual, weighted sum); 9 `y *= x`.
/// Activations: 0 SiLU, 1 GELU (tanh), 2 ReLU.
const EW: &str = r"
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
fn act(kind: u32, v: f32) -> f32 {
    if (kind == 0u) { return v / (1.0 + exp(-v)); }
    if (kind == 1u) { return 0.5 * v * (1.0 + tanh(0.7978846 * (v + 0.044715 * v * v * v))); }
    return max(v, 0.0);
}
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u); let op = pu(1u); let a = pu(2u); let b = pf(3u);
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= n) { return; }
    switch op {
        case 0u: { y[i] = y[i] + x[i]; }
        case 1u: { y[i] = y[i] + x[i % a]; }
        case 2u: { y[i] = clamp(y[i], -b, b); }
        case 3u: { y[i] = act(a, y[i]); }
        case 4u: { y[i] = act(a, y[i]) * x[i]; }
        case 5u: { y[i] = y[i] * (1.0 / (1.0 + exp(-x[i / a]))); }
        case 7u: {
            let alpha = bitcast<f32>(a);
            let g = min(y[i], b);
            let u = clamp(x[i], -b, b);
            let glu = g * (1.0 / (1.0 + exp(-(g * alpha))));
            y[i] = (u + 1.0) * glu;
        }
        case 8u: { y[i] = y[i] + x[i] * b; }
        case 9u: { y[i] = y[i] * x[i]; }
        default: { y[i] = x[i]; }
    }
}
";

/// RoPE on `rd` dimensions of each of `heads` head vectors per token (the rotated part of head
/// `h` of token `t` starts at `t · tok_stride + h · head_stride + off`), with the host's cos/sin
/// table `cs[t, 2, nf]`. Pairs are halves `(j, j + rd/2)`, or adjacent `(2j, 2j+1)` when
/// `interleave` (DeepSeek). Params: heads, rd, t, tok_stride, head_stride, off, interleave, nf.
const ROPE: &str = r"
@group(0) @binding(1) var<storage, read> cs: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let heads = pu(0u); let rd = pu(1u); let t = pu(2u);
    let ts = pu(3u); let hs = pu(4u); let off = pu(5u); let inter = pu(6u); let nf = pu(7u);
    let hh = rd / 2u;
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= t * heads * hh) { return; }
    let tok = i / (heads * hh);
    let rem = i % (heads * hh);
    let head = rem / hh; let j = rem % hh;
    let c = cs[tok * 2u * nf + j]; let s = cs[tok * 2u * nf + nf + j];
    let o = tok * ts + head * hs + off;
    var a = o + j;
    var b = o + hh + j;
    if (inter != 0u) { a = o + 2u * j; b = a + 1u; }
    let x1 = y[a]; let x2 = y[b];
    y[a] = x1 * c - x2 * s;
    y[b] = x2 * c + x1 * s;
}
";

/// Softmax attention over the KV cache, one workgroup per (head, token); scores go through the
/// `sc` scratch (`[heads · t, total]`). Causal (optionally windowed) or bidirectional (encoder);
/// optional per-head sink logits join the softmax (their probability is dropped, GPT-OSS); an
/// optional bias per (head, relative position `key − query`) is added to the scores
/// (`rb[head, span]`, `span = 2·total − 1`, T5). Query heads share KV heads in groups (GQA);
/// queries and keys are `dqk` wide, values `dv` (MLA: `dqk ≠ dv`).
/// Params: nh, nkv, dqk, dv, pos0, t, window, scale, total, flags (1 causal, 2 sinks, 4 bias).
const ATTN: &str = r"
@group(0) @binding(1) var<storage, read> q: array<f32>;
@group(0) @binding(2) var<storage, read> kc: array<f32>;
@group(0) @binding(3) var<storage, read> vc: array<f32>;
@group(0) @binding(4) var<storage, read> sinks: array<f32>;
@group(0) @binding(5) var<storage, read> rb: array<f32>;
@group(0) @binding(6) var<storage, read_write> sc: array<f32>;
@group(0) @binding(7) var<storage, read_write> o: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let nh = pu(0u); let nkv = pu(1u); let dqk = pu(2u); let dv = pu(3u); let pos0 = pu(4u);
    let t = pu(5u); let window = pu(6u); let scale = pf(7u); let total = pu(8u); let flags = pu(9u);
    let head = wid.x; let tok = wid.y; let lid = lid3.x;
    let kvh = head / (nh / nkv);
    let i = pos0 + tok;
    var lo = 0u;
    var hi = total - 1u;
    if ((flags & 1u) != 0u) {
        hi = i;
        if (window > 0u && i + 1u > window) { lo = i + 1u - window; }
    }
    let span = 2u * total - 1u;
    let base = (head * t + tok) * total;
    let qo = tok * nh * dqk + head * dqk;
    let ko = kvh * dqk;
    let vo = kvh * dv;
    var m = -3.4e38;
    for (var j = lo + lid; j <= hi; j += WG) {
        var d = 0.0;
        for (var c = 0u; c < dqk; c++) { d += q[qo + c] * kc[j * nkv * dqk + ko + c]; }
        d = d * scale;
        if ((flags & 4u) != 0u) { d += rb[head * span + j + total - 1u - i]; }
        sc[base + j] = d;
        m = max(m, d);
    }
    m = reduce_max(lid, m);
    var sink = 0.0;
    if ((flags & 2u) != 0u) { sink = sinks[head]; m = max(m, sink); }
    var s = 0.0;
    for (var j = lo + lid; j <= hi; j += WG) {
        let e = exp(sc[base + j] - m);
        sc[base + j] = e;
        s += e;
    }
    s = reduce_sum(lid, s);
    if ((flags & 2u) != 0u) { s += exp(sink - m); }
    storageBarrier();
    workgroupBarrier();
    let inv = 1.0 / s;
    for (var c = lid; c < dv; c += WG) {
        var acc = 0.0;
        for (var j = lo; j <= hi; j++) { acc += (sc[base + j] * inv) * vc[j * nkv * dv + vo + c]; }
        o[tok * nh * dv + head * dv + c] = acc;
    }
}
";

/// Strided block copy: `y[r·ysr + h·ysh + yoff + c] = x[r·xsr + h·xsh + xoff + c]` for `c < n`,
/// `h < heads`, `r < rows` (assembles MLA keys and values in the cache).
/// Params: n, heads, rows, xsr, xsh, xoff, ysr, ysh, yoff.
const COPY2D: &str = r"
@group(0) @binding(1) var<storage, read> x: array<f32>;
@group(0) @binding(2) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let n = pu(0u); let heads = pu(1u); let rows = pu(2u);
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= n * heads * rows) { return; }
    let r = i / (n * heads);
    let rem = i % (n * heads);
    let h = rem / n; let c = rem % n;
    y[r * pu(6u) + h * pu(7u) + pu(8u) + c] = x[r * pu(3u) + h * pu(4u) + pu(5u) + c];
}
";

/// `xs[i, :] = x[idx[i], :]`. Params: width, rows.
const GATHER: &str = r"
@group(0) @binding(1) var<storage, read> idx: array<u32>;
@group(0) @binding(2) var<storage, read> x: array<f32>;
@group(0) @binding(3) var<storage, read_write> xs: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let width = pu(0u); let rows = pu(1u);
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= width * rows) { return; }
    let r = i / width; let c = i % width;
    xs[i] = x[idx[r] * width + c];
}
";

/// `out[idx[i], :] += w[i] · ys[i, :]` (`iw` = rows indices, then rows f32 weights as bits;
/// a token appears once per expert, so rows never collide). Params: width, rows.
const SCATTER: &str = r"
@group(0) @binding(1) var<storage, read> iw: array<u32>;
@group(0) @binding(2) var<storage, read> ys: array<f32>;
@group(0) @binding(3) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let width = pu(0u); let rows = pu(1u);
    let i = gid.x + gid.y * nwg.x * WG;
    if (i >= width * rows) { return; }
    let r = i / width; let c = i % width;
    let o = iw[r] * width + c;
    out[o] = out[o] + ys[i] * bitcast<f32>(iw[rows + r]);
}
";

/// The causal depthwise convolution of the recurrent mixers (the CPU's
/// `recurrent::causal_conv`) over `inp` `[t, cd]`, with its state `st` (the last `kw − 1`
/// inputs `[kw − 1, cd]`, oldest first). Phase 0: `out[tok, c] = act(bias[c] + Σ_j w[c, j] ·
/// in[tok − (kw − 1) + j, c])`, inputs before this call from `st` (one invocation per (token,
/// channel)); `act` is SiLU when `silu` is 1, none when 0; `bias` is read only when `has_bias`
/// is 1. Phase 1: `st` ← the last `kw − 1` inputs (one invocation per channel; run after
/// phase 0). Params: cd, kw, t, phase, silu, has_bias.
const CONV: &str = r"
@group(0) @binding(1) var<storage, read> inp: array<f32>;
@group(0) @binding(2) var<storage, read> w: array<f32>;
@group(0) @binding(3) var<storage, read> bias: array<f32>;
@group(0) @binding(4) var<storage, read_write> st: array<f32>;
@group(0) @binding(5) var<storage, read_write> out: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let cd = pu(0u); let kw = pu(1u); let t = pu(2u); let phase = pu(3u);
    let i = gid.x + gid.y * nwg.x * WG;
    let past = kw - 1u;
    if (phase == 0u) {
        if (i >= t * cd) { return; }
        let tok = i / cd; let c = i % cd;
        var acc = 0.0;
        for (var j = 0u; j < kw; j++) {
            let src = tok + j;
            var v = 0.0;
            if (src >= past) { v = inp[(src - past) * cd + c]; } else { v = st[src * cd + c]; }
            acc += w[c * kw + j] * v;
        }
        if (pu(5u) == 1u) { acc += bias[c]; }
        if (pu(4u) == 1u) { acc = acc / (1.0 + exp(-acc)); }
        out[i] = acc;
        return;
    }
    if (i >= cd) { return; }
    // Row r takes the input at time t + r − past: from this call, or a later state row (not
    // yet overwritten: t ≥ 1, rows are written in ascending order).
    for (var r = 0u; r < past; r++) {
        let src = t + r;
        if (src >= past) { st[r * cd + i] = inp[(src - past) * cd + i]; } else { st[r * cd + i] = st[src * cd + i]; }
    }
}
";

/// Gated DeltaNet, the delta rule and the gated RMSNorm over `t` tokens in order, one workgroup
/// per value head `h` (its state `S_h` `[dk, dv]` in `st`, each lane owning columns of it), as
/// the CPU's `delta::delta_net`: q and k of key head `h / (nv / nk)` L2-normalised (q scaled),
/// `β = sigmoid(b)`, decay `exp(−exp(a_log) · softplus(a + dt_bias))`; `S ← decay · S`,
/// `S += k ⊗ β(v − Sᵀk)`, `o = Sᵀq`; then `o = w · rmsnorm(o) · silu(z)`.
/// Buffers: the convolution's output `cv` `[t, cd]` (q, k, v), `z` `[t, nv·dv]`, `b`, `a`
/// `[t, nv]`, `cs` = dt_bias `[nv]`, a_log `[nv]`, norm weight `[dv]`; the state `st`
/// `[nv, dk, dv]`; the output `o` `[t, nv·dv]`. Params: nk, nv, dk (≤ 256), dv, t, cd, eps,
/// scale.
const DELTA_STEP: &str = r"
@group(0) @binding(1) var<storage, read> cv: array<f32>;
@group(0) @binding(2) var<storage, read> z: array<f32>;
@group(0) @binding(3) var<storage, read> bb: array<f32>;
@group(0) @binding(4) var<storage, read> aa: array<f32>;
@group(0) @binding(5) var<storage, read> cs: array<f32>;
@group(0) @binding(6) var<storage, read_write> st: array<f32>;
@group(0) @binding(7) var<storage, read_write> o: array<f32>;
var<workgroup> qn: array<f32, 256>;
var<workgroup> kn: array<f32, 256>;
@compute @workgroup_size(64)
fn main(@builtin(workgroup_id) wid: vec3<u32>, @builtin(local_invocation_id) lid3: vec3<u32>) {
    let nk = pu(0u); let nv = pu(1u); let dk = pu(2u); let dv = pu(3u); let t = pu(4u);
    let cd = pu(5u); let eps = pf(6u); let scale = pf(7u);
    let h = wid.x; let lid = lid3.x;
    let kh = h / (nv / nk);
    let kd = nk * dk; let vd = nv * dv;
    let sb = h * dk * dv;
    let dtb = cs[h]; let al = exp(cs[nv + h]);
    for (var tok = 0u; tok < t; tok++) {
        let qo = tok * cd + kh * dk;
        let ko = qo + kd;
        let vo = tok * cd + 2u * kd + h * dv;
        let oo = tok * vd + h * dv;
        var sq = 0.0;
        var sk = 0.0;
        for (var i = lid; i < dk; i += WG) { sq += cv[qo + i] * cv[qo + i]; sk += cv[ko + i] * cv[ko + i]; }
        let iq = 1.0 / sqrt(reduce_sum(lid, sq) + 1e-6);
        let ik = 1.0 / sqrt(reduce_sum(lid, sk) + 1e-6);
        for (var i = lid; i < dk; i += WG) { qn[i] = (cv[qo + i] * iq) * scale; kn[i] = cv[ko + i] * ik; }
        workgroupBarrier();
        let beta = 1.0 / (1.0 + exp(-bb[tok * nv + h]));
        let decay = exp(-al * softplus(aa[tok * nv + h] + dtb));
        var ss = 0.0;
        for (var j = lid; j < dv; j += WG) {
            var ks = 0.0;
            for (var i = 0u; i < dk; i++) {
                let s = st[sb + i * dv + j] * decay;
                st[sb + i * dv + j] = s;
                ks += s * kn[i];
            }
            let d = (cv[vo + j] - ks) * beta;
            var acc = 0.0;
            for (var i = 0u; i < dk; i++) {
                let s = st[sb + i * dv + j] + kn[i] * d;
                st[sb + i * dv + j] = s;
                acc += s * qn[i];
            }
            o[oo + j] = acc;
            ss += acc * acc;
        }
        let inv = 1.0 / sqrt(reduce_sum(lid, ss) / f32(dv) + eps);
        for (var j = lid; j < dv; j += WG) {
            let zj = z[oo + j];
            o[oo + j] = (cs[2u * nv + j] * (o[oo + j] * inv)) * (zj / (1.0 + exp(-zj)));
        }
    }
}
";

/// Mamba2's selective state space rule over `t` tokens in order, one invocation per channel `i`
/// of x (head `h = i / hd`, its row `p` of `S_h`, group `g = h / (nh / groups)`), as the CPU's
/// `mamba::mamba2`: `Δ = softplus(dt + dt_bias)`; `S_h[p] ← exp(Δ·A_h)·S_h[p] + Δ·B_g·x_p`;
/// `y_p = S_h[p]·C_g + D_h·x_p`, with `A_h = −exp(a_log_h)`. Buffers: the convolution's output
/// `cv` `[t, cd]` (x `[inner]`, B, C `[groups, N]` each), `dt` `[t, nh]`, `cs` = dt_bias, a_log,
/// D `[nh]` each; the state `st` `[nh, hd, N]`; the output `y` `[t, nh·hd]`.
/// Params: nh, hd, N, groups, t, cd.
const MAMBA_STEP: &str = r"
@group(0) @binding(1) var<storage, read> cv: array<f32>;
@group(0) @binding(2) var<storage, read> dt: array<f32>;
@group(0) @binding(3) var<storage, read> cs: array<f32>;
@group(0) @binding(4) var<storage, read_write> st: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<f32>;
@compute @workgroup_size(64)
fn main(@builtin(global_invocation_id) gid: vec3<u32>, @builtin(num_workgroups) nwg: vec3<u32>) {
    let nh = pu(0u); let hd = pu(1u); let n = pu(2u); let groups = pu(3u); let t = pu(4u);
    let cd = pu(5u);
    let i = gid.x + gid.y * nwg.x * WG;
    let inner = nh * hd;
    if (i >= inner) { return; }
    let h = i / hd;
    let g = h / (nh / groups);
    let dtb = cs[h]; let a = -exp(cs[nh + h]); let dh = cs[2u * nh + h];
    let sb = i * n;
    for (var tok = 0u; tok < t; tok++) {
        let row = tok * cd;
        let xp = cv[row + i];
        let bo = row + inner + g * n;
        let co = row + inner + groups * n + g * n;
        let delta = softplus(dt[tok * nh + h] + dtb);
        let decay = exp(delta * a);
        var acc = 0.0;
        for (var k = 0u; k < n; k++) {
            let s = st[sb + k] * decay + delta * cv[bo + k] * xp;
            st[sb + k] = s;
            acc += s * cv[co + k];
        }
        y[tok * inner + i] = acc + xp * dh;
    }
}
";

/// Every kernel: (name, source without the prelude, read-only buffers, read-write buffers).
pub const KERNELS: [(&str, &str, u32, u32); 14] = [
    ("matmul", MATMUL, 2, 1),
    ("matmul_q8", MATMUL_Q8, 3, 1),
    ("matmul_q4", MATMUL_Q4, 3, 1),
    ("quant_q8", QUANT_Q8, 1, 2),
    ("norm", NORM, 3, 1),
    ("ew", EW, 1, 1),
    ("rope", ROPE, 1, 1),
    ("attn", ATTN, 5, 2),
    ("copy2d", COPY2D, 1, 1),
    ("gather", GATHER, 2, 1),
    ("scatter", SCATTER, 2, 1),
    ("conv", CONV, 3, 2),
    ("delta_step", DELTA_STEP, 5, 2),
    ("mamba_step", MAMBA_STEP, 3, 2),
];

/// The full source of a kernel, with the int8 dot product chosen for the adapter.
pub fn source(body: &str, packed_dot: bool) -> String {
    let dot = if packed_dot { DOT4_PACKED } else { DOT4_PORTABLE };
    format!("{PRELUDE}\n{}", body.replace("DOT4", dot))
}
