//! Fused candle ops for the backbone's hot paths, each with its own backward.
//!
//! Why: candle builds softmax, LayerNorm, RMSNorm, GELU and RoPE from 5–15 elementwise ops, each allocating a
//! tensor and recording a graph node, and its `matmul` backward computes the gradient of *both* operands, also
//! for a frozen base weight (see `../shared/notes/candle-on-cpu.md`). Each op here is one pass forward and one
//! pass backward on contiguous f32 CPU data, parallel over rows with rayon.
//!
//! Every op has an elementary-op twin (`*_reference`) that the tests compare against, value and gradient; the
//! twins are also the path taken on other devices (CUDA) and dtypes, where candle's kernels are the better choice.
//! Ops whose parameter is a trainable `Var` (pretraining the base) either have a variant that returns the
//! parameter's gradient too (linear layers, RMSNorm's scale, the modulation vectors) or take the elementary path.

use candle_core::backend::BackendStorage;
use candle_core::{CpuStorage, CustomOp1, CustomOp2, CustomOp3, D, DType, Layout, Result, Shape, Storage, Tensor};
use rayon::prelude::*;

/// Below this many elements an op runs on one thread (rayon's fork/join costs more than it saves).
const PAR_MIN_ELEMS: usize = 1 << 14;

/// The f32 data of a contiguous CPU storage, or an error naming `op`.
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: expected f32 storage");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous tensor");
    };
    Ok(&v[start..end])
}

/// [`contiguous_f32`] for writing (the destination of an in-place op).
pub(crate) fn contiguous_f32_mut<'a>(s: &'a mut CpuStorage, l: &Layout, op: &str) -> Result<&'a mut [f32]> {
    let CpuStorage::F32(v) = s else {
        candle_core::bail!("{op}: expected f32 storage");
    };
    let Some((start, end)) = l.contiguous_offsets() else {
        candle_core::bail!("{op}: expected a contiguous tensor");
    };
    Ok(&mut v[start..end])
}

/// Runs `f` compiled for the widest vector instructions the CPU has: AVX-512, AVX2 + FMA, or the baseline the crate
/// is built for (x86-64's SSE2), chosen at run time as `gemm` chooses its kernels. `f` is inlined into each variant,
/// so its element-wise loops are vectorised for that width; Rust never fuses or reorders float operations on its
/// own, so every variant computes the same bits.
#[inline(always)]
pub(crate) fn widest<R>(f: impl FnOnce() -> R) -> R {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: the CPU has AVX-512F (checked just above).
            return unsafe { run_avx512(f) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
            // SAFETY: the CPU has AVX2 and FMA (checked just above).
            return unsafe { run_avx2(f) };
        }
    }
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn run_avx512<R>(f: impl FnOnce() -> R) -> R {
    f()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
fn run_avx2<R>(f: impl FnOnce() -> R) -> R {
    f()
}

/// Applies `f(row_in, row_out)` to every row of width `cols`, in parallel when the tensor is large, compiled for
/// the [`widest`] vectors.
fn map_rows(input: &[f32], cols: usize, f: impl Fn(&[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; input.len()];
    if cols == 0 {
        return out;
    }
    if input.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(cols)
            .zip(input.par_chunks(cols))
            .for_each(|(o, i)| widest(|| f(i, o)));
    } else {
        widest(|| out.chunks_mut(cols).zip(input.chunks(cols)).for_each(|(o, i)| f(i, o)));
    }
    out
}

/// Like [`map_rows`] over two inputs of the same shape.
fn map_rows2(a: &[f32], b: &[f32], cols: usize, f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    if cols == 0 {
        return out;
    }
    if a.len() >= PAR_MIN_ELEMS {
        out.par_chunks_mut(cols)
            .zip(a.par_chunks(cols).zip(b.par_chunks(cols)))
            .for_each(|(o, (x, y))| widest(|| f(x, y, o)));
    } else {
        widest(|| {
            out.chunks_mut(cols)
                .zip(a.chunks(cols).zip(b.chunks(cols)))
                .for_each(|(o, (x, y))| f(x, y, o))
        });
    }
    out
}

fn last_dim(l: &Layout) -> usize {
    l.dims().last().copied().unwrap_or(1)
}

fn fast_path(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// A half-width float (bf16, f16: `model.activations`), which norms and softmax compute in f32.
pub fn is_narrow(x: &Tensor) -> bool {
    matches!(x.dtype(), DType::BF16 | DType::F16)
}

fn same_shape(l1: &Layout, l2: &Layout, op: &str) -> Result<()> {
    if l1.shape() != l2.shape() {
        candle_core::bail!("{op}: shapes {:?} and {:?} differ", l1.shape(), l2.shape());
    }
    Ok(())
}

/// `exp` of every element in place, vectorised: Cephes' `expf` (range reduction by `ln 2` in two parts, a degree-5
/// polynomial, the power of two built in the exponent bits) written without branches, so the compiler vectorises
/// the loop for the [`widest`] vectors the CPU has. Within a few ulp of libm's
/// (`exp_in_place_is_libm_exp` checks); overflows to ∞, underflows to 0 through the subnormals, keeps NaN.
/// `wide`'s `f32x8::exp` did the same eight lanes at a time but only with the baseline's SSE2, 12.7 % of a
/// pretraining step on an AVX-512 machine.
pub(super) fn exp_in_place(xs: &mut [f32]) {
    widest(|| exp_slice(xs));
}

#[inline(always)]
fn exp_slice(xs: &mut [f32]) {
    for x in xs.iter_mut() {
        *x = exp_branchless(*x);
    }
}

/// One `exp`, branch-free (see [`exp_in_place`]).
#[inline(always)]
fn exp_branchless(x: f32) -> f32 {
    // Adding 1.5·2²³ rounds an f32 of magnitude < 2²² to an integer (ties to even) held in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Beyond these every result is ∞ or 0; NaN passes `clamp` unchanged and stays NaN throughout.
    let xc = x.clamp(-104.0, 89.0);
    let y = xc * std::f32::consts::LOG2_E + ROUND;
    let r = y - ROUND;
    let n = (y.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let f = xc - r * LN2_HI - r * LN2_LO;
    let mut p = 1.987_569_1e-4_f32;
    p = p * f + 1.398_199_9e-3;
    p = p * f + 8.333_452e-3;
    p = p * f + 4.166_579_6e-2;
    p = p * f + 1.666_666_5e-1;
    p = p * f + 0.5;
    let z = p * f * f + f + 1.0;
    // 2ⁿ as two normal powers of two (n ∈ [−150, 128]): their product overflows to ∞ and underflows through the
    // subnormals to 0 as exp does.
    let n1 = n >> 1;
    let n2 = n - n1;
    let pow2 = |k: i32| f32::from_bits(((k + 127) << 23) as u32);
    z * pow2(n1) * pow2(n2)
}

// ---------------------------------------------------------------------------------------------------------------
// x · Wᵀ with a frozen W

/// `x·Wᵀ` for `x` [m, k] and a frozen `W` [n, k]: no gradient is ever computed for `W`.
struct FrozenMatmulT;

fn matmul_dims(l1: &Layout, l2: &Layout) -> Result<(usize, usize, usize)> {
    let (m, k) = l1.shape().dims2()?;
    let (n, k2) = l2.shape().dims2()?;
    if k != k2 {
        candle_core::bail!("frozen_matmul_t: x is [{m}, {k}] but W is [{n}, {k2}]");
    }
    Ok((m, n, k))
}

impl CustomOp2 for FrozenMatmulT {
    fn name(&self) -> &'static str {
        "frozen-matmul-t"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = matmul_dims(l1, l2)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> Result<(candle_core::CudaStorage, Shape)> {
        let (m, n, k) = matmul_dims(l1, l2)?;
        let out = s1.matmul(s2, (1, m, n, k), l1, &l2.transpose(0, 1)?)?;
        Ok((out, Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, w: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(grad.matmul(w)?), None))
    }
}

/// `x·Wᵀ` for `x` [m, k] and a weight `W` [n, k] (PyTorch layout). A frozen `W` (a plain tensor) gets no gradient
/// and costs none in the backward pass; a `W` that is a `Var` (pretraining) takes candle's matmul and is trained.
pub fn frozen_matmul_t(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    if w.is_variable() {
        x.matmul(&w.t()?)
    } else {
        x.apply_op2(w, FrozenMatmulT)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Linear layers: y = x·Wᵀ + b (+ s·(x·Aᵀ)·Bᵀ) as one graph node

/// `x·Wᵀ` on CPU storages, `x` [m, k] with layout `lx`, `W` [n, k] a frozen tensor.
fn cpu_matmul_t(x: &CpuStorage, lx: &Layout, w: &Tensor) -> Result<(CpuStorage, usize, usize)> {
    let (m, k) = lx.shape().dims2()?;
    let (n, k2) = w.dims2()?;
    if k != k2 {
        candle_core::bail!("linear: x is [{m}, {k}] but W is [{n}, {k2}]");
    }
    let (ws, wl) = w.storage_and_layout();
    let Storage::Cpu(wc) = &*ws else {
        candle_core::bail!("linear: the weight is not on the CPU");
    };
    Ok((x.matmul(wc, (1, m, n, k), lx, &wl.transpose(0, 1)?)?, m, n))
}

/// Adds `bias` [n] to every row of `y` [m, n] in place.
fn add_bias(y: &mut [f32], bias: &[f32]) {
    if bias.is_empty() {
        return;
    }
    let add = |row: &mut [f32]| row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    if y.len() >= PAR_MIN_ELEMS {
        y.par_chunks_mut(bias.len()).for_each(|r| widest(|| add(r)));
    } else {
        widest(|| y.chunks_mut(bias.len()).for_each(add));
    }
}

fn into_f32(s: CpuStorage, op: &str) -> Result<Vec<f32>> {
    match s {
        CpuStorage::F32(v) => Ok(v),
        _ => candle_core::bail!("{op}: expected f32"),
    }
}

/// `y = x·Wᵀ + b` with a frozen `W`, `b`: backward yields `∂x = g·W` only.
struct FrozenLinear {
    w: Tensor,
    bias: Vec<f32>,
}

impl CustomOp1 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let (y, m, n) = cpu_matmul_t(s, l, &self.w)?;
        let mut y = into_f32(y, self.name())?;
        add_bias(&mut y, &self.bias);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.matmul(&self.w)?))
    }
}

/// `y = x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` with frozen `W`, `b` and trainable `A` [r, k], `B` [n, r].
struct LoraLinear {
    w: Tensor,
    bias: Vec<f32>,
    scale: f64,
}

impl CustomOp3 for LoraLinear {
    fn name(&self) -> &'static str {
        "lora-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (y, m, n) = cpu_matmul_t(sx, lx, &self.w)?;
        let (r, k) = la.shape().dims2()?;
        let (n2, r2) = lb.shape().dims2()?;
        if n2 != n || r2 != r || lx.shape().dims2()?.1 != k {
            candle_core::bail!("lora-linear: A [{r}, {k}] / B [{n2}, {r2}] do not fit the layer [{n}, {k}]");
        }
        let h = sx.matmul(sa, (1, m, r, k), lx, &la.transpose(0, 1)?)?;
        let h_layout = Layout::contiguous((m, r));
        let d = into_f32(
            h.matmul(sb, (1, m, n, r), &h_layout, &lb.transpose(0, 1)?)?,
            self.name(),
        )?;
        let mut y = into_f32(y, self.name())?;
        let s = self.scale as f32;
        y.iter_mut().zip(&d).for_each(|(v, dv)| *v += s * dv);
        add_bias(&mut y, &self.bias);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // The arguments carry the forward graph (A and B are `Var`s): gradients computed from them would keep
        // that whole graph alive through the optimiser state. Detach first.
        let (x, a, b) = (x.detach(), a.detach(), b.detach());
        let (x, a, b) = (&x, &a, &b);
        let h = x.matmul(&a.t()?)?; // [m, r]
        let gh = (g.matmul(b)? * self.scale)?; // [m, r]
        let gb = (g.t()?.matmul(&h)? * self.scale)?; // [n, r]
        let ga = gh.t()?.matmul(x)?; // [r, k]
        let gx = (g.matmul(&self.w)? + gh.matmul(a)?)?;
        Ok((Some(gx), Some(ga), Some(gb)))
    }
}

fn frozen_bias(bias: Option<&Tensor>) -> Result<Option<Vec<f32>>> {
    match bias {
        None => Ok(Some(Vec::new())),
        Some(b) if b.is_variable() || !fast_path(b) => Ok(None),
        Some(b) => Ok(Some(b.to_vec1::<f32>()?)),
    }
}

/// `y = x·Wᵀ + b` with a trainable `W` [n, k] and `b` [n] (pretraining) as one graph node: backward is three
/// 2-D GEMMs (`∂x = g·W`, `∂W = gᵀ·x`, `∂b = 1ᵀ·g`) instead of candle's matmul and broadcast-add backward, whose
/// bias gradient is a strided reduction over the rows.
struct TrainableLinear;

impl CustomOp3 for TrainableLinear {
    fn name(&self) -> &'static str {
        "trainable-linear"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sw: &CpuStorage,
        lw: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (m, n, k) = matmul_dims(lx, lw)?;
        let bias = contiguous_f32(sb, lb, self.name())?;
        if bias.len() != n {
            candle_core::bail!("trainable-linear: bias of {} for {n} outputs", bias.len());
        }
        let y = sx.matmul(sw, (1, m, n, k), lx, &lw.transpose(0, 1)?)?;
        let mut y = into_f32(y, self.name())?;
        add_bias(&mut y, bias);
        Ok((CpuStorage::F32(y), Shape::from((m, n))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Detached: gradients built from the graph's own tensors would keep the graph alive in the optimiser.
        let (x, w, g) = (x.detach(), w.detach(), g.contiguous()?);
        let gx = g.matmul(&w)?;
        let gw = g.t()?.matmul(&x)?;
        let gb = Tensor::ones((1, g.dim(0)?), g.dtype(), g.device())?
            .matmul(&g)?
            .squeeze(0)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// `x·Wᵀ + b` for `x` [m, k] with a trainable f32 CPU `W` and `b` (both `Var`s) as one graph node; `None` when
/// that path does not apply (frozen weights take [`fused_linear`]).
pub fn trainable_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Option<Result<Tensor>> {
    let b = bias?;
    if !fast_path(x) || !fast_path(w) || !fast_path(b) || !w.is_variable() || !b.is_variable() {
        return None;
    }
    Some(x.contiguous().and_then(|x| x.apply_op3(w, b, TrainableLinear)))
}

/// `x·Wᵀ + b (+ scale·(x·Aᵀ)·Bᵀ)` for `x` [m, k] as a single graph node when `W` and `b` are frozen f32 CPU
/// tensors; returns `None` when that fast path does not apply (trainable base, other device or dtype).
pub fn fused_linear(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    lora: Option<(&Tensor, &Tensor, f64)>,
) -> Option<Result<Tensor>> {
    if !fast_path(x) || !fast_path(w) || w.is_variable() {
        return None;
    }
    let bias = match frozen_bias(bias) {
        Ok(Some(b)) => b,
        Ok(None) => return None,
        Err(e) => return Some(Err(e)),
    };
    let x = match x.contiguous() {
        Ok(x) => x,
        Err(e) => return Some(Err(e)),
    };
    Some(match lora {
        None => x.apply_op1(FrozenLinear { w: w.clone(), bias }),
        Some((a, b, scale)) => x.apply_op3(
            a,
            b,
            LoraLinear {
                w: w.clone(),
                bias,
                scale,
            },
        ),
    })
}

// ---------------------------------------------------------------------------------------------------------------
// softmax over the last axis

struct Softmax;
struct SoftmaxGrad;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "fused-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let out = map_rows(x, last_dim(l), |row, o| {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for (oi, &xi) in o.iter_mut().zip(row) {
                *oi = xi - max;
            }
            exp_in_place(o);
            let sum: f32 = o.iter().sum();
            let inv = 1.0 / sum;
            o.iter_mut().for_each(|v| *v *= inv);
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(y.apply_op2_no_bwd(&g.contiguous()?, &SoftmaxGrad)?))
    }
}

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "fused-softmax-grad"
    }

    /// `∂x = y ⊙ (g − Σ g⊙y)` per row.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let y = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let out = map_rows2(y, g, last_dim(l1), |y, g, o| {
            let dot: f32 = y.iter().zip(g).map(|(a, b)| a * b).sum();
            for ((oi, &yi), &gi) in o.iter_mut().zip(y).zip(g) {
                *oi = yi * (gi - dot);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Elementary-op softmax over the last axis (keeps gradients; the reference for [`softmax_last_dim`]).
pub fn softmax_reference(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::softmax(x, D::Minus1)
}

/// Softmax over the last axis, fused with its backward; narrow (bf16/f16) scores are normalised in f32, as fused
/// attention kernels accumulate them.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if is_narrow(x) {
        return softmax_last_dim(&x.to_dtype(DType::F32)?)?.to_dtype(x.dtype());
    }
    if fast_path(x) {
        x.contiguous()?.apply_op1(Softmax)
    } else {
        softmax_reference(x)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm without affine parameters

struct LayerNorm {
    eps: f32,
}
struct LayerNormGrad {
    eps: f32,
}

fn mean_inv_std(row: &[f32], eps: f32) -> (f32, f32) {
    let n = row.len() as f32;
    let mean = row.iter().sum::<f32>() / n;
    let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp1 for LayerNorm {
    fn name(&self) -> &'static str {
        "fused-layer-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let eps = self.eps;
        let out = map_rows(x, last_dim(l), |row, o| {
            let (mean, inv) = mean_inv_std(row, eps);
            for (oi, &xi) in o.iter_mut().zip(row) {
                *oi = (xi - mean) * inv;
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(
            &g.contiguous()?,
            &LayerNormGrad { eps: self.eps },
        )?))
    }
}

impl CustomOp2 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "fused-layer-norm-grad"
    }

    /// With `x̂ = (x − μ)/σ`: `∂x = (g − mean(g) − x̂·mean(g⊙x̂)) / σ`.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let eps = self.eps;
        let out = map_rows2(x, g, last_dim(l1), |x, g, o| {
            let n = x.len() as f32;
            let (mean, inv) = mean_inv_std(x, eps);
            let g_mean = g.iter().sum::<f32>() / n;
            let gx_mean = x.iter().zip(g).map(|(&xi, &gi)| (xi - mean) * inv * gi).sum::<f32>() / n;
            for ((oi, &xi), &gi) in o.iter_mut().zip(x).zip(g) {
                *oi = (gi - g_mean - (xi - mean) * inv * gx_mean) * inv;
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Elementary-op LayerNorm over the last axis without affine parameters.
pub fn layer_norm_reference(x: &Tensor, eps: f64) -> Result<Tensor> {
    let centered = x.broadcast_sub(&x.mean_keepdim(D::Minus1)?)?;
    let var = centered.sqr()?.mean_keepdim(D::Minus1)?;
    centered.broadcast_div(&(var + eps)?.sqrt()?)
}

/// LayerNorm over the last axis without affine parameters (FLUX's `elementwise_affine=False`), fused.
pub fn layer_norm(x: &Tensor, eps: f64) -> Result<Tensor> {
    if is_narrow(x) {
        return layer_norm(&x.to_dtype(DType::F32)?, eps)?.to_dtype(x.dtype());
    }
    if fast_path(x) {
        x.contiguous()?.apply_op1(LayerNorm { eps: eps as f32 })
    } else {
        layer_norm_reference(x, eps)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm with a frozen scale

struct RmsNorm {
    scale: Vec<f32>,
    eps: f32,
}
struct RmsNormGrad {
    scale: Vec<f32>,
    eps: f32,
}

fn inv_rms(row: &[f32], eps: f32) -> f32 {
    let ms = row.iter().map(|v| v * v).sum::<f32>() / row.len() as f32;
    1.0 / (ms + eps).sqrt()
}

/// `x / rms(x) · scale` for every row of width `cols` (both RMSNorm ops' forward).
fn rms_norm_rows(x: &[f32], cols: usize, scale: &[f32], eps: f32) -> Vec<f32> {
    map_rows(x, cols, |row, o| {
        let inv = inv_rms(row, eps);
        for ((oi, &xi), &si) in o.iter_mut().zip(row).zip(scale) {
            *oi = xi * inv * si;
        }
    })
}

impl CustomOp1 for RmsNorm {
    fn name(&self) -> &'static str {
        "fused-rms-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        if last_dim(l) != self.scale.len() {
            candle_core::bail!("rms_norm: last axis {} but scale has {}", last_dim(l), self.scale.len());
        }
        let out = rms_norm_rows(x, last_dim(l), &self.scale, self.eps);
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        let op = RmsNormGrad {
            scale: self.scale.clone(),
            eps: self.eps,
        };
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &op)?))
    }
}

impl CustomOp2 for RmsNormGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-grad"
    }

    /// With `r = 1/rms(x)`, `x̂ = x·r`, `h = g⊙s`: `∂x = r·(h − x̂·mean(h⊙x̂))`.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let (scale, eps) = (&self.scale, self.eps);
        let out = map_rows2(x, g, last_dim(l1), |x, g, o| {
            let n = x.len() as f32;
            let r = inv_rms(x, eps);
            let hx_mean = x
                .iter()
                .zip(g)
                .zip(scale)
                .map(|((&xi, &gi), &si)| gi * si * xi * r)
                .sum::<f32>()
                / n;
            for (((oi, &xi), &gi), &si) in o.iter_mut().zip(x).zip(g).zip(scale) {
                *oi = r * (gi * si - xi * r * hx_mean);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// Elementary-op RMSNorm over the last axis with a learned scale.
pub fn rms_norm_reference(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(scale)
}

/// RMSNorm whose scale is trained (pretraining's QK norms): `x` and `scale` are both inputs of the op, and
/// backward gives `∂x` (as [`RmsNormGrad`]) and `∂scale = Σ_rows g⊙x̂`.
struct RmsNormTrainable {
    eps: f32,
}

/// `Σ_rows g⊙x̂` over the rows of `x` and `g`: the trained scale's gradient.
struct RmsNormScaleGrad {
    eps: f32,
}

/// Rows per task of [`RmsNormScaleGrad`]'s reduction: a fixed split, so the sum is the same for any thread count.
const SCALE_GRAD_ROWS: usize = 256;

impl CustomOp2 for RmsNormTrainable {
    fn name(&self) -> &'static str {
        "fused-rms-norm-trainable"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s1, l1, self.name())?;
        let scale = contiguous_f32(s2, l2, self.name())?;
        if last_dim(l1) != scale.len() || l2.shape().rank() != 1 {
            candle_core::bail!("rms_norm: last axis {} but scale is {:?}", last_dim(l1), l2.shape());
        }
        let out = rms_norm_rows(x, last_dim(l1), scale, self.eps);
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, scale: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (x, g) = (x.detach(), g.contiguous()?);
        let op = RmsNormGrad {
            scale: scale.to_vec1::<f32>()?,
            eps: self.eps,
        };
        let dx = x.apply_op2_no_bwd(&g, &op)?;
        let ds = x.apply_op2_no_bwd(&g, &RmsNormScaleGrad { eps: self.eps })?;
        Ok((Some(dx), Some(ds)))
    }
}

impl CustomOp2 for RmsNormScaleGrad {
    fn name(&self) -> &'static str {
        "fused-rms-norm-scale-grad"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let d = last_dim(l1).max(1);
        let eps = self.eps;
        let block = SCALE_GRAD_ROWS * d;
        let partial = |(x, g): (&[f32], &[f32])| {
            let mut acc = vec![0f32; d];
            for (x, g) in x.chunks(d).zip(g.chunks(d)) {
                let r = inv_rms(x, eps);
                for ((a, &xi), &gi) in acc.iter_mut().zip(x).zip(g) {
                    *a += gi * xi * r;
                }
            }
            acc
        };
        let parts: Vec<Vec<f32>> = if x.len() >= PAR_MIN_ELEMS {
            x.par_chunks(block)
                .zip(g.par_chunks(block))
                .map(|p| widest(|| partial(p)))
                .collect()
        } else {
            widest(|| x.chunks(block).zip(g.chunks(block)).map(partial).collect())
        };
        let mut out = vec![0f32; d];
        for part in parts {
            out.iter_mut().zip(part).for_each(|(o, p)| *o += p);
        }
        Ok((CpuStorage::F32(out), Shape::from(d)))
    }
}

/// FLUX's RMSNorm (`x / rms(x) · scale`) over the last axis: one fused op on CPU f32, with the scale's gradient
/// when it is trained.
pub fn rms_norm(x: &Tensor, scale: &Tensor, eps: f64) -> Result<Tensor> {
    if is_narrow(x) {
        return rms_norm(&x.to_dtype(DType::F32)?, scale, eps)?.to_dtype(x.dtype());
    }
    if !fast_path(x) || scale.rank() != 1 {
        return rms_norm_reference(x, scale, eps);
    }
    if scale.is_variable() && fast_path(scale) {
        return x.contiguous()?.apply_op2(scale, RmsNormTrainable { eps: eps as f32 });
    }
    let op = RmsNorm {
        scale: scale.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        eps: eps as f32,
    };
    x.contiguous()?.apply_op1(op)
}

// ---------------------------------------------------------------------------------------------------------------
// GELU, tanh approximation

struct Gelu;
struct GeluGrad;

const SQRT_2_OVER_PI: f32 = 0.797_884_6;
const GELU_C: f32 = 0.044_715;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh"
    }

    /// `½x(1 + tanh u) = x·σ(2u)`, `u = √(2/π)(x + c·x³)`: one `exp` instead of libm's slower `tanh`.
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        let out = map_rows(x, last_dim(l), |row, o| {
            for (oi, &v) in o.iter_mut().zip(row) {
                *oi = -2.0 * SQRT_2_OVER_PI * (v + GELU_C * v * v * v);
            }
            exp_in_place(o);
            for (oi, &v) in o.iter_mut().zip(row) {
                *oi = v / (1.0 + *oi);
            }
        });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(x.apply_op2_no_bwd(&g.contiguous()?, &GeluGrad)?))
    }
}

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "fused-gelu-tanh-grad"
    }

    /// `d/dx = ½(1 + t) + ½x(1 − t²)·u'` with `t = tanh u`; in terms of `s = σ(2u) = ½(1 + t)`:
    /// `d/dx = s + 2x·s(1 − s)·u'`, `u' = √(2/π)(1 + 3c·x²)`.
    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<(CpuStorage, Shape)> {
        same_shape(l1, l2, self.name())?;
        let x = contiguous_f32(s1, l1, self.name())?;
        let g = contiguous_f32(s2, l2, self.name())?;
        let out = map_rows2(x, g, last_dim(l1), |x, g, o| {
            for (oi, &v) in o.iter_mut().zip(x) {
                *oi = -2.0 * SQRT_2_OVER_PI * (v + GELU_C * v * v * v);
            }
            exp_in_place(o);
            for ((oi, &v), &gi) in o.iter_mut().zip(x).zip(g) {
                let s = 1.0 / (1.0 + *oi);
                let du = SQRT_2_OVER_PI * (1.0 + 3.0 * GELU_C * v * v);
                *oi = gi * (s + 2.0 * v * s * (1.0 - s) * du);
            }
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }
}

/// candle's GELU (tanh approximation, as FLUX's `GELU(approximate="tanh")`).
pub fn gelu_reference(x: &Tensor) -> Result<Tensor> {
    x.gelu()
}

/// GELU with the tanh approximation, fused with its backward.
pub fn gelu_tanh(x: &Tensor) -> Result<Tensor> {
    if fast_path(x) {
        x.contiguous()?.apply_op1(Gelu)
    } else {
        gelu_reference(x)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// adaLN modulation: y = x·(1 + scale) + shift, and gates y = x·gate, with per-(batch, channel) vectors

/// `y = x·(offset + s) (+ t)` for `x` [B, N, D] and per-batch vectors `s`, `t` [B, 1, D]: adaLN's scale-shift
/// (`offset` 1, with a shift) and its gate (`offset` 0, no shift) as one pass. The backward reduces over the
/// tokens in one pass per batch row (candle's broadcast backward is a strided reduction), and only for the vectors
/// that are part of a graph (pretraining: the modulation is trained; LoRA runs: it is frozen).
struct Modulate {
    offset: f32,
}

/// The vectors of a [B, 1, D] tensor as one contiguous f32 buffer.
fn per_batch(t: &Tensor, b: usize, d: usize) -> Result<Vec<f32>> {
    if t.dims() != [b, 1, d] {
        candle_core::bail!("modulate: expected [{b}, 1, {d}], got {:?}", t.dims());
    }
    t.flatten_all()?.to_vec1::<f32>()
}

impl Modulate {
    fn run(&self, x: &[f32], dims: &[usize], s: &[f32], t: Option<&[f32]>) -> Result<Vec<f32>> {
        let &[_, n, d] = dims else {
            candle_core::bail!("modulate: expected [B, N, D], got {dims:?}");
        };
        let off = self.offset;
        if d == 0 {
            return Ok(Vec::new());
        }
        let mut out = vec![0f32; x.len()];
        let row = |(r, (o, xs)): (usize, (&mut [f32], &[f32]))| {
            let bi = r / n.max(1);
            let sv = &s[bi * d..(bi + 1) * d];
            match t {
                Some(t) => {
                    let tv = &t[bi * d..(bi + 1) * d];
                    for i in 0..d {
                        o[i] = xs[i] * (off + sv[i]) + tv[i];
                    }
                }
                None => {
                    for i in 0..d {
                        o[i] = xs[i] * (off + sv[i]);
                    }
                }
            }
        };
        if x.len() >= PAR_MIN_ELEMS {
            out.par_chunks_mut(d)
                .zip(x.par_chunks(d))
                .enumerate()
                .for_each(|r| widest(|| row(r)));
        } else {
            widest(|| out.chunks_mut(d).zip(x.chunks(d)).enumerate().for_each(row));
        }
        Ok(out)
    }
}

impl CustomOp3 for Modulate {
    fn name(&self) -> &'static str {
        "modulate"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        ss: &CpuStorage,
        ls: &Layout,
        st: &CpuStorage,
        lt: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(sx, lx, "modulate")?;
        let s = contiguous_f32(ss, ls, "modulate")?;
        let t = contiguous_f32(st, lt, "modulate")?;
        let out = self.run(x, lx.dims(), s, Some(t))?;
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        s: &Tensor,
        t: &Tensor,
        _y: &Tensor,
        g: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (gx, gs, gt) = modulate_grads(self.offset, x, s, Some(t), g)?;
        Ok((gx, gs, gt))
    }
}

impl CustomOp2 for Modulate {
    fn name(&self) -> &'static str {
        "gate"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout, ss: &CpuStorage, ls: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(sx, lx, "gate")?;
        let s = contiguous_f32(ss, ls, "gate")?;
        let out = self.run(x, lx.dims(), s, None)?;
        Ok((CpuStorage::F32(out), lx.shape().clone()))
    }

    fn bwd(&self, x: &Tensor, s: &Tensor, _y: &Tensor, g: &Tensor) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (gx, gs, _) = modulate_grads(self.offset, x, s, None, g)?;
        Ok((gx, gs))
    }
}

/// Gradients of `y = x·(offset + s) (+ t)`: `∂x = g·(offset + s)`, `∂s = Σ_n g·x`, `∂t = Σ_n g` (the last two only
/// for vectors in a graph).
fn modulate_grads(
    offset: f32,
    x: &Tensor,
    s: &Tensor,
    t: Option<&Tensor>,
    g: &Tensor,
) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
    let (b, n, d) = x.dims3()?;
    let sv = per_batch(s, b, d)?;
    let gv = g.flatten_all()?.to_vec1::<f32>()?;
    let gx = Modulate { offset }.run(&gv, &[b, n, d], &sv, None)?;
    let gx = Tensor::from_vec(gx, (b, n, d), x.device())?;
    let want_s = s.track_op();
    let want_t = t.is_some_and(Tensor::track_op);
    if !want_s && !want_t {
        return Ok((Some(gx), None, None));
    }
    let xv = if want_s {
        x.flatten_all()?.to_vec1::<f32>()?
    } else {
        Vec::new()
    };
    // Per batch row: Σ over tokens of g·x and of g.
    let sums: Vec<(Vec<f32>, Vec<f32>)> = (0..b)
        .into_par_iter()
        .map(|bi| {
            widest(|| {
                let (mut ss, mut ts) = (vec![0f32; d], vec![0f32; d]);
                for ni in 0..n {
                    let at = (bi * n + ni) * d;
                    let grow = &gv[at..at + d];
                    if want_s {
                        let xrow = &xv[at..at + d];
                        for i in 0..d {
                            ss[i] += grow[i] * xrow[i];
                        }
                    }
                    if want_t {
                        for i in 0..d {
                            ts[i] += grow[i];
                        }
                    }
                }
                (ss, ts)
            })
        })
        .collect();
    let (ss, ts): (Vec<Vec<f32>>, Vec<Vec<f32>>) = sums.into_iter().unzip();
    let dev = x.device();
    let gs = want_s
        .then(|| Tensor::from_vec(ss.concat(), (b, 1, d), dev))
        .transpose()?;
    let gt = want_t
        .then(|| Tensor::from_vec(ts.concat(), (b, 1, d), dev))
        .transpose()?;
    Ok((Some(gx), gs, gt))
}

/// candle's adaLN scale-shift `x·(1 + scale) + shift`.
pub fn modulate_reference(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    x.broadcast_mul(&(scale + 1.0)?)?.broadcast_add(shift)
}

/// adaLN's scale-shift `x·(1 + scale) + shift` for `x` [B, N, D] and `scale`, `shift` [B, 1, D], fused.
pub fn modulate(x: &Tensor, scale: &Tensor, shift: &Tensor) -> Result<Tensor> {
    if fast_path(x) && fast_path(scale) && fast_path(shift) && x.rank() == 3 {
        x.contiguous()?
            .apply_op3(&scale.contiguous()?, &shift.contiguous()?, Modulate { offset: 1.0 })
    } else {
        modulate_reference(x, scale, shift)
    }
}

/// A gate `x·gate` for `x` [B, N, D] and `gate` [B, 1, D], fused.
pub fn gate(x: &Tensor, gate: &Tensor) -> Result<Tensor> {
    if fast_path(x) && fast_path(gate) && x.rank() == 3 {
        x.contiguous()?.apply_op2(&gate.contiguous()?, Modulate { offset: 0.0 })
    } else {
        x.broadcast_mul(gate)
    }
}

// ---------------------------------------------------------------------------------------------------------------
// RoPE on interleaved pairs

/// Rotates channel pairs `(2i, 2i+1)` of `x` [B, H, N, D] by per-(batch, token, pair) angles given as cos/sin
/// [B, N, D/2]. The backward is the rotation by the opposite angle.
struct Rope {
    cos: Vec<f32>,
    sin: Vec<f32>,
    batch: usize,
    tokens: usize,
    half: usize,
}

impl Rope {
    fn rotate(&self, x: &[f32], dims: &[usize], sign: f32) -> Result<Vec<f32>> {
        let &[b, h, n, d] = dims else {
            candle_core::bail!("rope: expected [B, H, N, D], got {dims:?}");
        };
        if b != self.batch || n != self.tokens || d != 2 * self.half {
            candle_core::bail!(
                "rope: x {dims:?} does not match angles [{}, {}, {}]",
                self.batch,
                self.tokens,
                self.half
            );
        }
        let mut out = vec![0f32; x.len()];
        let rotate_head = |(bh, (o, xs)): (usize, (&mut [f32], &[f32]))| {
            let bi = bh / h;
            for t in 0..n {
                let angles = (bi * n + t) * self.half;
                let (cos, sin) = (
                    &self.cos[angles..angles + self.half],
                    &self.sin[angles..angles + self.half],
                );
                let row = &xs[t * d..(t + 1) * d];
                let orow = &mut o[t * d..(t + 1) * d];
                for i in 0..self.half {
                    let (x0, x1) = (row[2 * i], row[2 * i + 1]);
                    let (c, s) = (cos[i], sign * sin[i]);
                    orow[2 * i] = c * x0 - s * x1;
                    orow[2 * i + 1] = s * x0 + c * x1;
                }
            }
        };
        let per_head = n * d;
        if per_head == 0 {
            return Ok(out);
        }
        if x.len() >= PAR_MIN_ELEMS {
            out.par_chunks_mut(per_head)
                .zip(x.par_chunks(per_head))
                .enumerate()
                .for_each(|h| widest(|| rotate_head(h)));
        } else {
            widest(|| {
                out.chunks_mut(per_head)
                    .zip(x.chunks(per_head))
                    .enumerate()
                    .for_each(rotate_head)
            });
        }
        Ok(out)
    }
}

struct RopeFwd(std::sync::Arc<Rope>);
struct RopeBwd(std::sync::Arc<Rope>);

impl CustomOp1 for RopeFwd {
    fn name(&self) -> &'static str {
        "fused-rope"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        Ok((CpuStorage::F32(self.0.rotate(x, l.dims(), 1.0)?), l.shape().clone()))
    }

    fn bwd(&self, _x: &Tensor, _y: &Tensor, g: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(g.contiguous()?.apply_op1_no_bwd(&RopeBwd(self.0.clone()))?))
    }
}

impl CustomOp1 for RopeBwd {
    fn name(&self) -> &'static str {
        "fused-rope-grad"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = contiguous_f32(s, l, self.name())?;
        Ok((CpuStorage::F32(self.0.rotate(x, l.dims(), -1.0)?), l.shape().clone()))
    }
}

/// Precomputed angles for [`rope_interleaved`]: cos/sin [B, N, D/2] read once per forward, shared by all blocks.
#[derive(Clone)]
pub struct RopeAngles(Option<std::sync::Arc<Rope>>);

impl std::fmt::Debug for RopeAngles {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RopeAngles")
    }
}

impl RopeAngles {
    /// Angles from cos/sin tensors [B, N, D/2] (None off the CPU fast path).
    pub fn new(cos: &Tensor, sin: &Tensor) -> Result<Self> {
        if !fast_path(cos) {
            return Ok(Self(None));
        }
        let (batch, tokens, half) = cos.dims3()?;
        Ok(Self(Some(std::sync::Arc::new(Rope {
            cos: cos.flatten_all()?.to_vec1::<f32>()?,
            sin: sin.flatten_all()?.to_vec1::<f32>()?,
            batch,
            tokens,
            half,
        }))))
    }

    /// Rotates `x` [B, H, N, D] with the fused op, or `None` when the fast path does not apply.
    pub fn apply(&self, x: &Tensor) -> Option<Result<Tensor>> {
        let rope = self.0.as_ref()?;
        if !fast_path(x) {
            return None;
        }
        Some(x.contiguous().and_then(|x| x.apply_op1(RopeFwd(rope.clone()))))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::testing::random_tensor;
    use candle_core::{Device, Var};

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    /// Compares a fused op with its elementary twin: values, and the gradient of `Σ y ⊙ c` for a random `c`.
    fn check(
        shape: &[usize],
        seed: u64,
        fused: impl Fn(&Tensor) -> Result<Tensor>,
        reference: impl Fn(&Tensor) -> Result<Tensor>,
        tol: f32,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&random_tensor(shape, 1.5, seed, &dev)?)?;
        let c = random_tensor(shape, 1.0, seed + 1, &dev)?;
        let (yf, yr) = (fused(x.as_tensor())?, reference(x.as_tensor())?);
        assert!(
            max_abs_diff(&yf, &yr)? < tol,
            "values differ by {}",
            max_abs_diff(&yf, &yr)?
        );
        let gf = (yf * &c)?.sum_all()?.backward()?;
        let gr = (yr * &c)?.sum_all()?.backward()?;
        let (gf, gr) = (
            gf.get(x.as_tensor()).expect("fused grad"),
            gr.get(x.as_tensor()).expect("reference grad"),
        );
        assert!(
            max_abs_diff(gf, gr)? < tol,
            "gradients differ by {}",
            max_abs_diff(gf, gr)?
        );
        Ok(())
    }

    #[test]
    fn frozen_matmul_matches_matmul_and_its_input_gradient() -> Result<()> {
        let dev = Device::Cpu;
        let x = Var::from_tensor(&Tensor::new(&[[1f32, 2., 3.], [-1., 0., 4.]], &dev)?)?;
        let w = Tensor::new(&[[0.5f32, -1., 2.], [1., 1., 1.], [0., 3., -2.], [2., 0., 1.]], &dev)?;
        let y = frozen_matmul_t(x.as_tensor(), &w)?;
        let reference = x.as_tensor().matmul(&w.t()?)?;
        assert_eq!(y.to_vec2::<f32>()?, reference.to_vec2::<f32>()?);
        // L = Σ y ⊙ c with c = [[1,2,3,4],[5,6,7,8]] → ∂L/∂x = c·W.
        let c = Tensor::new(&[[1f32, 2., 3., 4.], [5., 6., 7., 8.]], &dev)?;
        let grads = (y * &c)?.sum_all()?.backward()?;
        let gx = grads.get(x.as_tensor()).map(|g| g.to_vec2::<f32>());
        assert_eq!(gx.transpose()?, Some(c.matmul(&w)?.to_vec2::<f32>()?));
        assert!(grads.get(&w).is_none(), "the frozen weight must get no gradient");
        // A trainable weight takes the plain matmul and gets its gradient.
        let wv = Var::from_tensor(&w)?;
        let grads = (frozen_matmul_t(x.as_tensor(), wv.as_tensor())? * &c)?
            .sum_all()?
            .backward()?;
        assert!(grads.get(wv.as_tensor()).is_some());
        Ok(())
    }

    /// The fused linear (with and without LoRA) against the elementary-op layer: values and every gradient.
    #[test]
    fn fused_linear_matches_elementary_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, n, r) = (37, 24, 20, 4);
        let w = random_tensor(&[n, k], 0.3, 20, &dev)?;
        let bias = random_tensor(&[n], 0.3, 21, &dev)?;
        let x = Var::from_tensor(&random_tensor(&[m, k], 1.0, 22, &dev)?)?;
        let a = Var::from_tensor(&random_tensor(&[r, k], 0.3, 23, &dev)?)?;
        let b = Var::from_tensor(&random_tensor(&[n, r], 0.3, 24, &dev)?)?;
        let c = random_tensor(&[m, n], 1.0, 25, &dev)?;
        let scale = 0.75;
        let fused = fused_linear(
            x.as_tensor(),
            &w,
            Some(&bias),
            Some((a.as_tensor(), b.as_tensor(), scale)),
        )
        .expect("fast path")?;
        let reference = (x.as_tensor().matmul(&w.t()?)?.broadcast_add(&bias)?
            + (x.as_tensor().matmul(&a.as_tensor().t()?)?.matmul(&b.as_tensor().t()?)? * scale)?)?;
        assert!(max_abs_diff(&fused, &reference)? < 1e-5);
        let gf = (fused * &c)?.sum_all()?.backward()?;
        let gr = (reference * &c)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("A", &a), ("B", &b)] {
            let (f, r) = (gf.get(v.as_tensor()).expect(name), gr.get(v.as_tensor()).expect(name));
            assert!(max_abs_diff(f, r)? < 1e-4, "{name}: {}", max_abs_diff(f, r)?);
        }
        assert!(gf.get(&w).is_none() && gf.get(&bias).is_none());
        // Gradients must not reference the forward graph (an optimiser keeping them would keep the graph alive).
        for v in [&x, &a, &b] {
            assert!(
                !gf.get(v.as_tensor()).expect("grad").track_op(),
                "a gradient carries the graph"
            );
        }
        let plain = fused_linear(x.as_tensor(), &w, None, None).expect("fast path")?;
        assert!(max_abs_diff(&plain, &x.as_tensor().matmul(&w.t()?)?)? < 1e-5);
        // A trainable weight is not for the fused path.
        let wv = Var::from_tensor(&w)?;
        assert!(fused_linear(x.as_tensor(), wv.as_tensor(), None, None).is_none());
        Ok(())
    }

    /// The trainable linear against candle's matmul + broadcast-add: values and the gradients of x, W and b.
    #[test]
    fn trainable_linear_matches_elementary_ops() -> Result<()> {
        let dev = Device::Cpu;
        let (m, k, n) = (37, 24, 20);
        let w = Var::from_tensor(&random_tensor(&[n, k], 0.3, 30, &dev)?)?;
        let b = Var::from_tensor(&random_tensor(&[n], 0.3, 31, &dev)?)?;
        let x = Var::from_tensor(&random_tensor(&[m, k], 1.0, 32, &dev)?)?;
        let c = random_tensor(&[m, n], 1.0, 33, &dev)?;
        let fused = trainable_linear(x.as_tensor(), w.as_tensor(), Some(b.as_tensor())).expect("fast path")?;
        let reference = x
            .as_tensor()
            .matmul(&w.as_tensor().t()?)?
            .broadcast_add(b.as_tensor())?;
        assert!(max_abs_diff(&fused, &reference)? < 1e-5);
        let gf = (fused * &c)?.sum_all()?.backward()?;
        let gr = (reference * &c)?.sum_all()?.backward()?;
        for (name, v) in [("x", &x), ("W", &w), ("b", &b)] {
            let (f, r) = (gf.get(v.as_tensor()).expect(name), gr.get(v.as_tensor()).expect(name));
            assert_eq!(f.dims(), v.dims(), "{name}");
            assert!(max_abs_diff(f, r)? < 1e-4, "{name}: {}", max_abs_diff(f, r)?);
            assert!(!f.track_op(), "{name}: a gradient carries the graph");
        }
        // Frozen weights and a missing bias are not for this path.
        assert!(trainable_linear(x.as_tensor(), w.as_tensor(), None).is_none());
        assert!(trainable_linear(x.as_tensor(), &w.as_tensor().detach(), Some(b.as_tensor())).is_none());
        Ok(())
    }

    /// The fused scale-shift and gate against candle's broadcasts: values and the gradients of x, scale, shift
    /// (when they are in a graph), at the parallel size too; frozen vectors get none.
    #[test]
    fn fused_modulate_and_gate_match_broadcast_ops() -> Result<()> {
        let dev = Device::Cpu;
        for (b, n, d, seed) in [(2, 5, 8, 40), (3, 70, 96, 50)] {
            let x = Var::from_tensor(&random_tensor(&[b, n, d], 1.0, seed, &dev)?)?;
            let s = Var::from_tensor(&random_tensor(&[b, 1, d], 0.5, seed + 1, &dev)?)?;
            let t = Var::from_tensor(&random_tensor(&[b, 1, d], 0.5, seed + 2, &dev)?)?;
            let c = random_tensor(&[b, n, d], 1.0, seed + 3, &dev)?;
            let (xs, ss, ts) = (x.as_tensor(), s.as_tensor(), t.as_tensor());
            for (fused, reference) in [
                (modulate(xs, ss, ts)?, modulate_reference(xs, ss, ts)?),
                (gate(xs, ss)?, xs.broadcast_mul(ss)?),
            ] {
                assert!(max_abs_diff(&fused, &reference)? < 1e-5);
                let gf = (fused * &c)?.sum_all()?.backward()?;
                let gr = (reference * &c)?.sum_all()?.backward()?;
                for (name, v) in [("x", &x), ("scale", &s), ("shift", &t)] {
                    match (gf.get(v.as_tensor()), gr.get(v.as_tensor())) {
                        (Some(f), Some(r)) => {
                            assert_eq!(f.dims(), v.dims(), "{name}");
                            assert!(max_abs_diff(f, r)? < 1e-3, "{name}: {}", max_abs_diff(f, r)?);
                        }
                        (None, None) => {}
                        (f, r) => panic!("{name}: fused {:?} vs reference {:?}", f.is_some(), r.is_some()),
                    }
                }
            }
            // Frozen vectors: only x gets a gradient.
            let frozen = modulate(xs, &ss.detach(), &ts.detach())?;
            let g = (frozen * &c)?.sum_all()?.backward()?;
            assert!(g.get(xs).is_some() && g.get(ss).is_none() && g.get(ts).is_none());
        }
        Ok(())
    }

    #[test]
    fn mismatched_inner_dimensions_are_an_error() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::zeros((2, 3), DType::F32, &dev)?;
        let w = Tensor::zeros((4, 2), DType::F32, &dev)?;
        assert!(frozen_matmul_t(&x, &w).is_err());
        Ok(())
    }

    #[test]
    fn fused_softmax_matches_elementary_ops() -> Result<()> {
        check(&[2, 3, 7], 1, softmax_last_dim, softmax_reference, 1e-6)?;
        check(&[4, 64, 130], 2, softmax_last_dim, softmax_reference, 1e-6) // parallel path
    }

    #[test]
    fn fused_layer_norm_matches_elementary_ops() -> Result<()> {
        let eps = 1e-6;
        check(
            &[2, 5, 8],
            3,
            |x| layer_norm(x, eps),
            |x| layer_norm_reference(x, eps),
            2e-5,
        )?;
        check(
            &[2, 100, 256],
            4,
            |x| layer_norm(x, eps),
            |x| layer_norm_reference(x, eps),
            2e-5,
        )
    }

    #[test]
    fn fused_rms_norm_matches_elementary_ops() -> Result<()> {
        let dev = Device::Cpu;
        let scale = random_tensor(&[16], 1.0, 9, &dev)?;
        let eps = 1e-6;
        check(
            &[2, 2, 5, 16],
            5,
            |x| rms_norm(x, &scale, eps),
            |x| rms_norm_reference(x, &scale, eps),
            2e-5,
        )?;
        check(
            &[2, 4, 300, 16],
            6,
            |x| rms_norm(x, &scale, eps),
            |x| rms_norm_reference(x, &scale, eps),
            2e-5,
        )
    }

    /// A trained RMSNorm scale: the value and the gradients of x and of the scale against the elementary ops, at
    /// the small and the parallel size.
    #[test]
    fn fused_rms_norm_trains_its_scale() -> Result<()> {
        let dev = Device::Cpu;
        for (shape, seed) in [(vec![2, 2, 5, 16], 60), (vec![2, 4, 300, 16], 70)] {
            let scale = Var::from_tensor(&random_tensor(&[16], 1.0, seed, &dev)?)?;
            let x = Var::from_tensor(&random_tensor(&shape, 1.0, seed + 1, &dev)?)?;
            let c = random_tensor(&shape, 1.0, seed + 2, &dev)?;
            let fused = rms_norm(x.as_tensor(), scale.as_tensor(), 1e-6)?;
            let reference = rms_norm_reference(x.as_tensor(), scale.as_tensor(), 1e-6)?;
            assert!(max_abs_diff(&fused, &reference)? < 2e-5);
            let gf = (fused * &c)?.sum_all()?.backward()?;
            let gr = (reference * &c)?.sum_all()?.backward()?;
            for (name, v) in [("x", &x), ("scale", &scale)] {
                let (f, r) = (gf.get(v.as_tensor()).expect(name), gr.get(v.as_tensor()).expect(name));
                assert_eq!(f.dims(), v.dims(), "{name}");
                let tol = 1e-4 * (1.0 + r.abs()?.max_all()?.to_scalar::<f32>()?);
                assert!(max_abs_diff(f, r)? < tol, "{name}: {}", max_abs_diff(f, r)?);
                assert!(!f.track_op(), "{name}: a gradient carries the graph");
            }
        }
        Ok(())
    }

    /// The vectorised `exp` against libm's over the range softmax and GELU feed it, at a ragged length (the tail
    /// lanes), and its limits: overflow to ∞, underflow to 0, NaN kept.
    #[test]
    fn exp_in_place_is_libm_exp() {
        // Every compiled variant this CPU can run, and the dispatcher.
        type Exp = fn(&mut [f32]);
        let mut variants: Vec<(&str, Exp)> = vec![("dispatch", exp_in_place), ("baseline", exp_slice)];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                variants.push(("avx512", |xs| unsafe { run_avx512(|| exp_slice(xs)) }));
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                variants.push(("avx2", |xs| unsafe { run_avx2(|| exp_slice(xs)) }));
            }
        }
        for (name, exp) in variants {
            // The range softmax and GELU feed it, then across the subnormals (−103.9 < x < −87.3) where the error
            // is absolute, at ragged lengths (the tail lanes).
            for xs in [
                (0..2003).map(|i| -87.0 + i as f32 * 0.0873).collect::<Vec<f32>>(),
                (0..101).map(|i| -104.0 + i as f32 * 0.17).collect(),
            ] {
                let mut ys = xs.clone();
                exp(&mut ys);
                for (&x, &y) in xs.iter().zip(&ys) {
                    let e = x.exp();
                    assert!(
                        (y - e).abs() <= 4.0 * f32::EPSILON * e.max(f32::MIN_POSITIVE),
                        "{name}: exp({x}) = {y}, libm {e}"
                    );
                }
            }
            let mut edge = [
                -1e4f32,
                -200.0,
                0.0,
                100.0,
                1e4,
                f32::NAN,
                f32::INFINITY,
                f32::NEG_INFINITY,
                1.0,
                88.7,
                88.8,
            ];
            exp(&mut edge);
            assert_eq!(&edge[..5], &[0.0, 0.0, 1.0, f32::INFINITY, f32::INFINITY], "{name}");
            assert!(edge[5].is_nan(), "{name}");
            assert_eq!(&edge[6..8], &[f32::INFINITY, 0.0], "{name}");
            assert!(
                (edge[8] - std::f32::consts::E).abs() <= 2.0 * f32::EPSILON * std::f32::consts::E,
                "{name}"
            );
            assert!(
                (edge[9] / 88.7f32.exp() - 1.0).abs() < 4.0 * f32::EPSILON,
                "{name}: {}",
                edge[9]
            );
            assert_eq!(edge[10], f32::INFINITY, "{name}");
        }
    }

    #[test]
    fn fused_gelu_matches_candle_gelu() -> Result<()> {
        let extremes = Tensor::new(&[-1e4f32, -60., -5., 0., 5., 60., 1e4], &Device::Cpu)?;
        let y = gelu_tanh(&extremes)?.to_vec1::<f32>()?;
        assert_eq!(y, vec![-0.0, -0.0, y[2], 0.0, y[4], 60.0, 1e4]);
        assert!(y.iter().all(|v| v.is_finite()));
        check(&[3, 11], 7, gelu_tanh, gelu_reference, 1e-5)?;
        check(&[2, 300, 64], 8, gelu_tanh, gelu_reference, 1e-5)
    }

    #[test]
    fn fused_rope_matches_the_rotation_and_inverts_in_backward() -> Result<()> {
        let dev = Device::Cpu;
        let (b, h, n, d) = (2, 3, 5, 8);
        let angles = random_tensor(&[b, n, d / 2], 2.0, 10, &dev)?;
        let (cos, sin) = (angles.cos()?, angles.sin()?);
        let rope = RopeAngles::new(&cos, &sin)?;
        let reference = |x: &Tensor| -> Result<Tensor> {
            let pairs = x.reshape((b, h, n, d / 2, 2))?;
            let (x0, x1) = (pairs.narrow(D::Minus1, 0, 1)?, pairs.narrow(D::Minus1, 1, 1)?);
            let c = cos.unsqueeze(1)?.unsqueeze(D::Minus1)?;
            let s = sin.unsqueeze(1)?.unsqueeze(D::Minus1)?;
            let o0 = (x0.broadcast_mul(&c)? - x1.broadcast_mul(&s)?)?;
            let o1 = (x0.broadcast_mul(&s)? + x1.broadcast_mul(&c)?)?;
            Tensor::cat(&[o0, o1], D::Minus1)?.reshape((b, h, n, d))
        };
        let fused = |x: &Tensor| rope.apply(x).expect("fast path applies");
        check(&[b, h, n, d], 11, fused, reference, 1e-5)?;
        let bad = Tensor::zeros((b, h, n + 1, d), DType::F32, &dev)?;
        assert!(rope.apply(&bad).expect("fast path").is_err());
        Ok(())
    }
}
