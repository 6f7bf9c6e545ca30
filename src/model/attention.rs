//! Scaled dot-product attention `softmax(s·Q·Kᵀ)·V` over `[B, H, L, D]` tensors, in three implementations that
//! give the same values and gradients:
//!
//! * **explicit**: the score matrix `[B, H, Lq, Lk]` is materialised (and kept for backward) by candle's ops: the
//!   path for other devices and dtypes while that matrix is small.
//! * **fused** (CPU, f32): FlashAttention-2's algorithm as one candle op with its own backward. Forward walks key
//!   tiles with an online softmax (running max and sum per query row) and keeps only the output and each row's
//!   log-sum-exp; backward recomputes each tile's probabilities from them. Memory is `O(L·D)`, not `O(L²)`: at
//!   1024 px (65 536 tokens) the explicit scores of one head would take 16 GiB.
//! * **chunked** (any device and dtype, the GPU's path): the same idea at the granularity of candle ops. The
//!   forward walks query chunks without a graph and keeps only the output; backward recomputes each chunk's
//!   probabilities and applies the softmax-attention gradient to it (`dS = P∘(dP − rowsum(dO∘O))`), so training
//!   holds one chunk's scores at a time, never `[B, H, L, L]`. Chunks hold up to [`CHUNK_SCORE_BYTES`] of
//!   scores, large enough that each is a few big matrix products.
//!
//! [`attention`] picks: fused on the CPU in f32, at every size (at the tiny default's training shapes, batch 8 ×
//! 4 heads × 424 tokens, forward and backward take 48 ms a layer against 64–81 ms explicit, and it is as fast or
//! faster at every shape `examples/attention_time.rs` tried); elsewhere explicit while the scores are small
//! ([`FUSED_MIN_SCORE_BYTES`]), chunked beyond. `M_s` (Eq. 3) reads hidden states, never these maps, so it is the same whichever runs.

use std::sync::{Arc, Mutex};

use super::checkpoint::Precomputed;
use candle_core::{CpuStorage, CustomOp3, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Off the CPU's f32 path, score matrices up to this size (all batch rows and heads together) are materialised;
/// above it the chunked path runs.
pub const FUSED_MIN_SCORE_BYTES: usize = 64 << 20;

/// Scores (all batch rows and heads) of one query chunk of the chunked path. Its backward holds about four such
/// matrices at once (scores, probabilities, their gradients): 2 GiB at the peak.
pub const CHUNK_SCORE_BYTES: usize = 512 << 20;

/// Query rows per tile of the fused kernel.
const TILE_Q: usize = 64;
/// Key rows per tile of the fused kernel.
const TILE_K: usize = 128;

/// Which implementation runs ([`attention`] chooses by size and device).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AttentionImpl {
    /// Materialised scores.
    Explicit,
    /// FlashAttention-style op (CPU, f32); other devices/dtypes fall back to [`AttentionImpl::Chunked`].
    Fused,
    /// Explicit over chunks of this many query rows.
    Chunked(usize),
}

/// `softmax(scale·q·kᵀ)·v` for `q` [B, H, Lq, D], `k`/`v` [B, H, Lk, D], by the implementation that suits the
/// size and device.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    let (b, h, lq, _) = q.dims4()?;
    let lk = k.dim(2)?;
    let score_bytes = b * h * lq * lk * q.dtype().size_in_bytes();
    let imp = if q.device().is_cpu() && q.dtype() == DType::F32 {
        AttentionImpl::Fused
    } else if score_bytes <= FUSED_MIN_SCORE_BYTES {
        AttentionImpl::Explicit
    } else {
        AttentionImpl::Fused
    };
    attention_with(q, k, v, scale, imp)
}

/// Query rows per chunk so that one chunk's scores stay under [`CHUNK_SCORE_BYTES`].
fn chunk_rows(b: usize, h: usize, lk: usize, dtype: DType) -> usize {
    (CHUNK_SCORE_BYTES / (b * h * lk * dtype.size_in_bytes()).max(1)).max(1)
}

/// [`attention`] with a chosen implementation.
pub fn attention_with(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64, imp: AttentionImpl) -> Result<Tensor> {
    let (b, h, lq, d) = q.dims4()?;
    let (kb, kh, lk, kd) = k.dims4()?;
    if (kb, kh, kd) != (b, h, d) || v.dims4()? != (b, h, lk, d) {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit [B, H, L, D]",
            q.dims(),
            k.dims(),
            v.dims()
        );
    }
    match imp {
        AttentionImpl::Explicit => explicit(q, k, v, scale),
        AttentionImpl::Fused if q.device().is_cpu() && q.dtype() == DType::F32 => q.contiguous()?.apply_op3(
            &k.contiguous()?,
            &v.contiguous()?,
            FlashAttention::new(scale, TILE_Q, TILE_K),
        ),
        // Rows sized for f32 scores whatever the activations: narrow ones take their softmax in f32.
        AttentionImpl::Fused => {
            attention_with(q, k, v, scale, AttentionImpl::Chunked(chunk_rows(b, h, lk, DType::F32)))
        }
        AttentionImpl::Chunked(rows) => {
            let rows = rows.max(1);
            if rows >= lq {
                return explicit(q, k, v, scale);
            }
            let value = chunked_forward(scale, rows, &q.detach(), &k.detach(), &v.detach())?;
            let op = ChunkedAttention {
                scale,
                rows,
                value: Precomputed::new(value, "chunked attention"),
            };
            q.apply_op3_arc(k, v, Arc::new(Box::new(op)))
        }
    }
}

/// The chunked path as one candle op: its value is computed beforehand without a graph ([`Self::forward`]) and
/// handed to candle by `*_fwd`; `bwd` recomputes chunk by chunk.
struct ChunkedAttention {
    scale: f64,
    rows: usize,
    value: Precomputed,
}

/// Query chunks `(start, rows)` of `lq` rows.
fn chunks(rows: usize, lq: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..lq).step_by(rows.max(1)).map(move |s| (s, rows.max(1).min(lq - s)))
}

/// One chunk's probabilities `softmax(s·q·kᵀ)` (no graph).
fn chunk_probs(scale: f64, q: &Tensor, k: &Tensor) -> Result<Tensor> {
    let scores = (q * scale)?.matmul(&k.t()?)?;
    if super::ops::is_narrow(&scores) {
        // Narrow activations: the softmax in f32 (the chunk's rows are sized for f32 scores).
        return candle_nn::ops::softmax_last_dim(&scores.to_dtype(DType::F32)?)?.to_dtype(scores.dtype());
    }
    candle_nn::ops::softmax_last_dim(&scores)
}

/// The chunked path's value, chunk by chunk (call it on detached tensors: no graph).
fn chunked_forward(scale: f64, rows: usize, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let parts = chunks(rows, q.dim(2)?)
        .map(|(s, n)| chunk_probs(scale, &q.narrow(2, s, n)?, k)?.matmul(v))
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&parts, 2)?.contiguous()
}

impl CustomOp3 for ChunkedAttention {
    fn name(&self) -> &'static str {
        "chunked-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.value.cpu()
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        self.value.cuda()
    }

    /// Per chunk: `P` recomputed, `dV += Pᵀ·dO`, `dP = dO·Vᵀ`, `dS = P∘(dP − rowsum(dO∘O))`, `dQ = s·dS·K`,
    /// `dK += s·dSᵀ·Q`.
    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (q, k, v, res, grad) = (q.detach(), k.detach(), v.detach(), res.detach(), grad.detach());
        let lq = q.dim(2)?;
        let mut dq = Vec::new();
        let mut dk = k.zeros_like()?;
        let mut dv = v.zeros_like()?;
        for (s, n) in chunks(self.rows, lq) {
            let (qc, oc, gc) = (
                q.narrow(2, s, n)?,
                res.narrow(2, s, n)?,
                grad.narrow(2, s, n)?.contiguous()?,
            );
            let p = chunk_probs(self.scale, &qc, &k)?;
            dv = (dv + p.t()?.matmul(&gc)?)?;
            let dp = gc.matmul(&v.t()?)?;
            let delta = (&gc * &oc)?.sum_keepdim(3)?;
            let ds = (p * dp.broadcast_sub(&delta)?)?;
            dq.push((ds.matmul(&k)? * self.scale)?);
            dk = (dk + (ds.t()?.matmul(&qc)? * self.scale)?)?;
        }
        Ok((Some(Tensor::cat(&dq, 2)?), Some(dk), Some(dv)))
    }
}

/// The materialised form: scores, softmax (our fused op, which keeps gradients), weighted values.
fn explicit(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    // Scaling q (B·H·L·D values) instead of the scores (B·H·L·L) is the same product, cheaper.
    let scores = (q * scale)?.matmul(&k.t()?)?;
    let probs = super::ops::softmax_last_dim(&scores)?;
    probs.matmul(v)
}

/// `c (+)= alpha · a · b` for row-major tiles given by (pointer offset, row stride, column stride): `a` [m, k],
/// `b` [k, n], `c` [m, n]; the slices must cover every index the strides reach (checked).
#[allow(clippy::too_many_arguments)]
fn gemm_into(
    (m, n, k): (usize, usize, usize),
    c: &mut [f32],
    (c_rs, c_cs): (usize, usize),
    accumulate: bool,
    a: &[f32],
    (a_rs, a_cs): (usize, usize),
    b: &[f32],
    (b_rs, b_cs): (usize, usize),
    alpha: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let last = |rows: usize, cols: usize, rs: usize, cs: usize| (rows - 1) * rs + (cols - 1) * cs;
    assert!(last(m, n, c_rs, c_cs) < c.len(), "gemm_into: c too short");
    if k == 0 {
        if !accumulate {
            (0..m).for_each(|i| (0..n).for_each(|j| c[i * c_rs + j * c_cs] = 0.0));
        }
        return;
    }
    assert!(last(m, k, a_rs, a_cs) < a.len(), "gemm_into: a too short");
    assert!(last(k, n, b_rs, b_cs) < b.len(), "gemm_into: b too short");
    // SAFETY: the asserts above keep every index `gemm` reaches inside the three slices; `c` is borrowed mutably
    // and does not alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_cs as isize,
            c_rs as isize,
            accumulate,
            a.as_ptr(),
            a_cs as isize,
            a_rs as isize,
            b.as_ptr(),
            b_cs as isize,
            b_rs as isize,
            1.0,
            alpha,
            false,
            false,
            false,
            gemm::Parallelism::None,
        );
    }
}

/// The fused attention op: the forward keeps each query row's log-sum-exp for the backward.
struct FlashAttention {
    scale: f32,
    tile_q: usize,
    tile_k: usize,
    /// `[B·H·Lq]` log-sum-exp of the scaled scores, written by the forward.
    lse: Mutex<Vec<f32>>,
}

impl FlashAttention {
    fn new(scale: f64, tile_q: usize, tile_k: usize) -> Self {
        Self {
            scale: scale as f32,
            tile_q: tile_q.max(1),
            tile_k: tile_k.max(1),
            lse: Mutex::new(Vec::new()),
        }
    }

    /// One (batch, head): `o` [lq, d] and `lse` [lq] from `q` [lq, d], `k`/`v` [lk, d].
    fn forward_head(&self, q: &[f32], k: &[f32], v: &[f32], d: usize, o: &mut [f32], lse: &mut [f32]) {
        let (lq, lk) = (q.len() / d.max(1), k.len() / d.max(1));
        let mut s = vec![0f32; self.tile_q * self.tile_k];
        let mut acc = vec![0f32; self.tile_q * d];
        let mut row_max = vec![0f32; self.tile_q];
        let mut row_sum = vec![0f32; self.tile_q];
        for q0 in (0..lq).step_by(self.tile_q) {
            let r = self.tile_q.min(lq - q0);
            row_max[..r].fill(f32::NEG_INFINITY);
            row_sum[..r].fill(0.0);
            acc[..r * d].fill(0.0);
            let qt = &q[q0 * d..(q0 + r) * d];
            for k0 in (0..lk).step_by(self.tile_k) {
                let c = self.tile_k.min(lk - k0);
                let kt = &k[k0 * d..(k0 + c) * d];
                // s [r, c] = scale · q_tile · k_tileᵀ (k_tile read as [d, c]: row stride 1, column stride d).
                gemm_into((r, c, d), &mut s, (c, 1), false, qt, (d, 1), kt, (1, d), self.scale);
                for i in 0..r {
                    let row = &mut s[i * c..(i + 1) * c];
                    let tile_max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                    let new_max = row_max[i].max(tile_max);
                    let correction = (row_max[i] - new_max).exp();
                    row.iter_mut().for_each(|x| *x -= new_max);
                    super::ops::exp_in_place(row);
                    let sum: f32 = row.iter().sum();
                    row_sum[i] = row_sum[i] * correction + sum;
                    row_max[i] = new_max;
                    acc[i * d..(i + 1) * d].iter_mut().for_each(|a| *a *= correction);
                }
                // acc [r, d] += p [r, c] · v_tile [c, d]
                gemm_into(
                    (r, d, c),
                    &mut acc,
                    (d, 1),
                    true,
                    &s,
                    (c, 1),
                    &v[k0 * d..(k0 + c) * d],
                    (d, 1),
                    1.0,
                );
            }
            for i in 0..r {
                let inv = 1.0 / row_sum[i];
                for (dst, a) in o[(q0 + i) * d..(q0 + i + 1) * d]
                    .iter_mut()
                    .zip(&acc[i * d..(i + 1) * d])
                {
                    *dst = a * inv;
                }
                lse[q0 + i] = row_max[i] + row_sum[i].ln();
            }
        }
    }

    /// One (batch, head): `dq`, `dk`, `dv` from the inputs, the output `o`, its gradient `go` and `lse`.
    #[allow(clippy::too_many_arguments)]
    fn backward_head(
        &self,
        (q, k, v): (&[f32], &[f32], &[f32]),
        o: &[f32],
        go: &[f32],
        lse: &[f32],
        d: usize,
        (dq, dk, dv): (&mut [f32], &mut [f32], &mut [f32]),
    ) {
        let (lq, lk) = (q.len() / d.max(1), k.len() / d.max(1));
        // delta_i = Σ_d go_id · o_id.
        let delta: Vec<f32> = (0..lq)
            .map(|i| {
                go[i * d..(i + 1) * d]
                    .iter()
                    .zip(&o[i * d..(i + 1) * d])
                    .map(|(a, b)| a * b)
                    .sum()
            })
            .collect();
        let mut p = vec![0f32; self.tile_q * self.tile_k];
        let mut dp = vec![0f32; self.tile_q * self.tile_k];
        for q0 in (0..lq).step_by(self.tile_q) {
            let r = self.tile_q.min(lq - q0);
            let (qt, got) = (&q[q0 * d..(q0 + r) * d], &go[q0 * d..(q0 + r) * d]);
            for k0 in (0..lk).step_by(self.tile_k) {
                let c = self.tile_k.min(lk - k0);
                let (kt, vt) = (&k[k0 * d..(k0 + c) * d], &v[k0 * d..(k0 + c) * d]);
                // p = exp(scale · q·kᵀ − lse)
                gemm_into((r, c, d), &mut p, (c, 1), false, qt, (d, 1), kt, (1, d), self.scale);
                for i in 0..r {
                    let l = lse[q0 + i];
                    let row = &mut p[i * c..(i + 1) * c];
                    row.iter_mut().for_each(|x| *x -= l);
                    super::ops::exp_in_place(row);
                }
                // dv_tile [c, d] += pᵀ [c, r] · go_tile [r, d]
                gemm_into(
                    (c, d, r),
                    &mut dv[k0 * d..(k0 + c) * d],
                    (d, 1),
                    true,
                    &p,
                    (1, c),
                    got,
                    (d, 1),
                    1.0,
                );
                // dp [r, c] = go_tile · v_tileᵀ; ds = p ∘ (dp − delta)
                gemm_into((r, c, d), &mut dp, (c, 1), false, got, (d, 1), vt, (1, d), 1.0);
                for i in 0..r {
                    let di = delta[q0 + i];
                    for (x, &pi) in dp[i * c..(i + 1) * c].iter_mut().zip(&p[i * c..(i + 1) * c]) {
                        *x = pi * (*x - di);
                    }
                }
                // dq_tile [r, d] += scale · ds [r, c] · k_tile [c, d]; dk_tile [c, d] += scale · dsᵀ · q_tile
                gemm_into(
                    (r, d, c),
                    &mut dq[q0 * d..(q0 + r) * d],
                    (d, 1),
                    true,
                    &dp,
                    (c, 1),
                    kt,
                    (d, 1),
                    self.scale,
                );
                gemm_into(
                    (c, d, r),
                    &mut dk[k0 * d..(k0 + c) * d],
                    (d, 1),
                    true,
                    &dp,
                    (1, c),
                    qt,
                    (d, 1),
                    self.scale,
                );
            }
        }
    }
}

/// The f32 data of a contiguous CPU tensor, borrowed from its storage (the guard must outlive the slice).
fn cpu_slice<'a>(storage: &'a Storage, layout: &Layout, what: &str) -> Result<&'a [f32]> {
    let Storage::Cpu(s) = storage else {
        candle_core::bail!("fused attention: {what} is not on the CPU");
    };
    super::ops::contiguous_f32(s, layout, &format!("fused attention: {what}"))
}

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        sq: &CpuStorage,
        lq_: &Layout,
        sk: &CpuStorage,
        lk_: &Layout,
        sv: &CpuStorage,
        lv_: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let f32_of = |s, l, what| super::ops::contiguous_f32(s, l, &format!("fused attention: {what}"));
        let (q, k, v) = (f32_of(sq, lq_, "q")?, f32_of(sk, lk_, "k")?, f32_of(sv, lv_, "v")?);
        let (b, h, lq, d) = lq_.shape().dims4()?;
        let lk = lk_.shape().dims4()?.2;
        let mut o = vec![0f32; b * h * lq * d];
        let mut lse = vec![0f32; b * h * lq];
        o.par_chunks_mut((lq * d).max(1))
            .zip(lse.par_chunks_mut(lq.max(1)))
            .enumerate()
            .for_each(|(bh, (o, lse))| {
                let (qs, ks) = (bh * lq * d, bh * lk * d);
                super::ops::widest(|| {
                    self.forward_head(&q[qs..qs + lq * d], &k[ks..ks + lk * d], &v[ks..ks + lk * d], d, o, lse)
                });
            });
        if let Ok(mut stash) = self.lse.lock() {
            *stash = lse;
        }
        Ok((CpuStorage::F32(o), lq_.shape().clone()))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, h, lq, d) = q.dims4()?;
        let lk = k.dim(2)?;
        let lse = self
            .lse
            .lock()
            .map_err(|_| candle_core::Error::Msg("fused attention: poisoned log-sum-exp".into()))?
            .clone();
        if lse.len() != b * h * lq {
            candle_core::bail!("fused attention: backward without its forward");
        }
        // Read in place (no copies): `contiguous` is free on the contiguous tensors the forward produced.
        let tensors = [q, k, v, res, grad]
            .map(Tensor::contiguous)
            .into_iter()
            .collect::<Result<Vec<_>>>()?;
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let slices = guards
            .iter()
            .zip(["q", "k", "v", "output", "output gradient"])
            .map(|((storage, layout), what)| cpu_slice(storage, layout, what))
            .collect::<Result<Vec<_>>>()?;
        let [qv, kv, vv, ov, gv] = slices[..] else {
            candle_core::bail!("fused attention: expected five backward inputs");
        };
        let mut dq = vec![0f32; qv.len()];
        let mut dk = vec![0f32; kv.len()];
        let mut dv = vec![0f32; vv.len()];
        dq.par_chunks_mut((lq * d).max(1))
            .zip(
                dk.par_chunks_mut((lk * d).max(1))
                    .zip(dv.par_chunks_mut((lk * d).max(1))),
            )
            .enumerate()
            .for_each(|(bh, (dq, (dk, dv)))| {
                let (qs, ks) = (bh * lq * d, bh * lk * d);
                super::ops::widest(|| {
                    self.backward_head(
                        (&qv[qs..qs + lq * d], &kv[ks..ks + lk * d], &vv[ks..ks + lk * d]),
                        &ov[qs..qs + lq * d],
                        &gv[qs..qs + lq * d],
                        &lse[bh * lq..(bh + 1) * lq],
                        d,
                        (dq, dk, dv),
                    )
                });
            });
        let dev = q.device();
        Ok((
            Some(Tensor::from_vec(dq, q.shape(), dev)?),
            Some(Tensor::from_vec(dk, k.shape(), dev)?),
            Some(Tensor::from_vec(dv, v.shape(), dev)?),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::random_tensor;
    use candle_core::{Device, Var};

    fn max_abs(a: &Tensor, b: &Tensor) -> f32 {
        crate::model::testing::max_abs_diff(a, b).expect("diff")
    }

    /// Values and the gradients of q, k and v equal the explicit form's to 1e-5, with lengths that are not
    /// multiples of the tiles (small tiles, so that many are walked), different query and key lengths, scores
    /// large enough that the online softmax must rescale, and the chunked form too.
    #[test]
    fn fused_and_chunked_attention_equal_the_explicit_one_in_value_and_gradient() -> Result<()> {
        let dev = Device::Cpu;
        for (b, h, lq, lk, d, tiles) in [
            (2, 3, 37, 37, 16, (8, 16)),
            (1, 2, 70, 45, 32, (16, 8)),
            (1, 1, 5, 9, 8, (64, 128)),
        ] {
            let q = Var::from_tensor(&random_tensor(&[b, h, lq, d], 1.5, 1, &dev)?)?;
            let k = Var::from_tensor(&random_tensor(&[b, h, lk, d], 1.5, 2, &dev)?)?;
            let v = Var::from_tensor(&random_tensor(&[b, h, lk, d], 1.0, 3, &dev)?)?;
            let w = random_tensor(&[b, h, lq, d], 1.0, 4, &dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let run = |out: Tensor| -> Result<(Tensor, [Tensor; 3])> {
                let grads = (&out * &w)?.sum_all()?.backward()?;
                let g = |x: &Var| grads.get(x.as_tensor()).cloned().expect("gradient");
                Ok((out, [g(&q), g(&k), g(&v)]))
            };
            let (want, want_g) = run(explicit(q.as_tensor(), k.as_tensor(), v.as_tensor(), scale)?)?;
            let fused = q.as_tensor().apply_op3(
                k.as_tensor(),
                v.as_tensor(),
                FlashAttention::new(scale, tiles.0, tiles.1),
            )?;
            let chunked = attention_with(
                q.as_tensor(),
                k.as_tensor(),
                v.as_tensor(),
                scale,
                AttentionImpl::Chunked(7),
            )?;
            for (name, out) in [("fused", fused), ("chunked", chunked)] {
                let (got, got_g) = run(out)?;
                assert!(max_abs(&got, &want) <= 1e-5, "{name} values: {}", max_abs(&got, &want));
                for (which, (a, e)) in ["q", "k", "v"].iter().zip(got_g.iter().zip(&want_g)) {
                    assert!(max_abs(a, e) <= 1e-5, "{name} d{which} ({lq}×{lk}): {}", max_abs(a, e));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_choice_follows_the_device_dtype_and_size() -> Result<()> {
        let dev = Device::Cpu;
        assert_eq!(chunk_rows(1, 1, 1 << 20, DType::F32), 128);
        let q = random_tensor(&[1, 1, 4, 8], 1.0, 1, &dev)?;
        let a = attention(&q, &q, &q, 0.5)?;
        let b = attention_with(&q, &q, &q, 0.5, AttentionImpl::Fused)?;
        assert_eq!(max_abs(&a, &b), 0.0, "CPU f32 takes the fused path at every size");
        // Other dtypes: explicit while the scores are small.
        let q64 = q.to_dtype(DType::F64)?;
        let a = attention(&q64, &q64, &q64, 0.5)?;
        let b = attention_with(&q64, &q64, &q64, 0.5, AttentionImpl::Explicit)?;
        assert_eq!(
            a.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            b.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?
        );
        let bad = attention_with(&q, &q.narrow(3, 0, 4)?, &q, 0.5, AttentionImpl::Fused).expect_err("shapes");
        assert!(bad.to_string().contains("do not fit"), "{bad}");
        Ok(())
    }
}
