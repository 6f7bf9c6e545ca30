//! Optimisation: AdamW with a checkpointable state, global gradient-norm clipping and the learning-rate schedule.
//!
//! [`AdamW`] performs exactly the update of `candle_nn::AdamW` (a test checks them step by step), but its moments
//! and step count can be saved and restored: candle keeps them private, and a resumed run must continue with the
//! same optimiser state to reproduce an uninterrupted one.
//!
//! On the CPU with f32 tensors the update runs in place, one pass over each of `m`, `v` and the weight (see
//! [`fused`]), instead of a dozen tensor ops that each allocate a tensor the size of the weight; other devices and
//! dtypes take the tensor-op path. Both compute the same f32 operations in the same order, so they agree bit for
//! bit (a test checks it). The gradient-norm clip folds into the update as a scale on the gradient.

use std::collections::HashMap;

use candle_core::{Result, Tensor, Var, backprop::GradStore};
use serde::{Deserialize, Serialize};

use crate::train::config::{LrDecay, OptimConfig};

/// AdamW hyper-parameters (PyTorch defaults except the learning rate).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdamWParams {
    /// Peak learning rate (after warm-up).
    pub lr: f64,
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWParams {
    fn default() -> Self {
        Self {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

/// AdamW over named variables, with savable state.
#[derive(Debug)]
pub struct AdamW {
    vars: Vec<(String, Var)>,
    m: Vec<Tensor>,
    v: Vec<Tensor>,
    step: u64,
    params: AdamWParams,
}

impl AdamW {
    /// A fresh optimiser (zero moments) for `vars`.
    pub fn new(vars: Vec<(String, Var)>, params: AdamWParams) -> Result<Self> {
        // Separate storage for every moment: the CPU path updates them in place.
        let m = vars.iter().map(|(_, v)| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        let v = vars.iter().map(|(_, v)| v.zeros_like()).collect::<Result<Vec<_>>>()?;
        Ok(Self {
            vars,
            m,
            v,
            step: 0,
            params,
        })
    }

    /// Changes the learning rate (for warm-up).
    pub fn set_lr(&mut self, lr: f64) {
        self.params.lr = lr;
    }

    /// Updates completed so far.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// One update from `grads`; variables without a gradient are left unchanged.
    pub fn step(&mut self, grads: &GradStore) -> Result<()> {
        self.step_scaled(grads, 1.0)
    }

    /// One update from `grads` multiplied by `grad_scale` (the factor of a gradient-norm clip, see [`clip_scale`]),
    /// without writing the scaled gradients anywhere.
    pub fn step_scaled(&mut self, grads: &GradStore, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let AdamWParams {
            lr,
            beta1,
            beta2,
            eps,
            weight_decay,
        } = self.params;
        let t = i32::try_from(self.step).unwrap_or(i32::MAX);
        let scale_m = 1.0 / (1.0 - beta1.powi(t));
        let scale_v = 1.0 / (1.0 - beta2.powi(t));
        for (i, (_, var)) in self.vars.iter().enumerate() {
            let Some(g) = grads.get(var.as_tensor()) else {
                continue;
            };
            // A gradient may still reference the step's graph; the moments must not keep it alive.
            let g = g.detach();
            if fused::applies(&[var.as_tensor(), &g, &self.m[i], &self.v[i]]) {
                let g = g.contiguous()?;
                let scale = grad_scale as f32;
                self.m[i].inplace_op2(&g, &fused::Blend::new(beta1, 1.0 - beta1, scale, false))?;
                self.v[i].inplace_op2(&g, &fused::Blend::new(beta2, 1.0 - beta2, scale, true))?;
                let update = fused::AdamWUpdate {
                    decay: (1.0 - lr * weight_decay) as f32,
                    lr: lr as f32,
                    scale_m: scale_m as f32,
                    scale_v: scale_v as f32,
                    eps: eps as f32,
                };
                var.as_tensor().inplace_op3(&self.m[i], &self.v[i], &update)?;
                continue;
            }
            let g = &if grad_scale == 1.0 {
                g
            } else {
                g.affine(grad_scale, 0.0)?
            };
            let m = ((&self.m[i] * beta1)? + (g * (1.0 - beta1))?)?;
            let v = ((&self.v[i] * beta2)? + (g.sqr()? * (1.0 - beta2))?)?;
            let update = ((&m * scale_m)? / ((&v * scale_v)?.sqrt()? + eps)?)?;
            let next = ((var.as_tensor() * (1.0 - lr * weight_decay))? - (update * lr)?)?;
            var.set(&next)?;
            self.m[i] = m.detach();
            self.v[i] = v.detach();
        }
        Ok(())
    }

    /// The state as named tensors: `<name>.exp_avg`, `<name>.exp_avg_sq` and `step` (a 1-element f64 tensor).
    pub fn state_tensors(&self) -> Result<Vec<(String, Tensor)>> {
        let device = self.m.first().map_or(candle_core::Device::Cpu, |t| t.device().clone());
        let mut out = vec![("step".to_string(), Tensor::new(&[self.step as f64], &device)?)];
        for (i, (name, _)) in self.vars.iter().enumerate() {
            out.push((format!("{name}.exp_avg"), self.m[i].clone()));
            out.push((format!("{name}.exp_avg_sq"), self.v[i].clone()));
        }
        Ok(out)
    }

    /// Restores a state written by [`Self::state_tensors`]; every moment must be present with the variable's shape.
    /// Nothing changes when the state does not fit.
    pub fn load_state(&mut self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let step = tensors
            .get("step")
            .ok_or_else(|| candle_core::Error::msg("optimizer state has no `step`"))?
            .flatten_all()?
            .to_dtype(candle_core::DType::F64)?
            .to_vec1::<f64>()?;
        let step = match step.as_slice() {
            [s] if *s >= 0.0 && s.fract() == 0.0 => *s as u64,
            _ => candle_core::bail!("optimizer state `step` must be one non-negative integer, got {step:?}"),
        };
        let mut m = Vec::with_capacity(self.vars.len());
        let mut v = Vec::with_capacity(self.vars.len());
        for (name, var) in &self.vars {
            for (suffix, out) in [("exp_avg", &mut m), ("exp_avg_sq", &mut v)] {
                let key = format!("{name}.{suffix}");
                let t = tensors
                    .get(&key)
                    .ok_or_else(|| candle_core::Error::msg(format!("optimizer state has no `{key}`")))?;
                if t.dims() != var.dims() {
                    candle_core::bail!(
                        "optimizer state `{key}` is {:?}, the variable is {:?}",
                        t.dims(),
                        var.dims()
                    );
                }
                // A copy: the CPU path updates the moments in place, and the caller's tensors must not change.
                out.push(t.to_dtype(var.dtype())?.to_device(var.device())?.copy()?);
            }
        }
        self.m = m;
        self.v = v;
        self.step = step;
        Ok(())
    }
}

/// The learning rate of optimiser step `step` (counting from 1) of a run of `total_steps`: a linear warm-up from 0
/// to the peak `optim.adamw.lr` over `warmup_steps`, then held (`decay = constant`) or decayed to 0 at `total_steps`
/// from the later of the warm-up's end and `decay_from` — as diffusers' `get_linear_schedule_with_warmup` and
/// `get_cosine_schedule_with_warmup` (half a cycle) do with their 0-based step `s − 1`: the first decayed step
/// keeps the peak and the last gets `peak / (total − start)` (linear).
pub fn lr_at(step: u64, total_steps: u64, optim: &OptimConfig) -> f64 {
    let peak = optim.adamw.lr;
    let warmup = optim.warmup_steps;
    if warmup > 0 && step < warmup {
        return peak * step as f64 / warmup as f64;
    }
    let start = warmup.max(optim.decay_from);
    let done = step.saturating_sub(1);
    if optim.decay == LrDecay::Constant || done <= start || total_steps <= start {
        return peak;
    }
    let progress = ((done - start) as f64 / (total_steps - start) as f64).min(1.0);
    let factor = match optim.decay {
        LrDecay::Constant => 1.0,
        LrDecay::Linear => 1.0 - progress,
        LrDecay::Cosine => 0.5 * (1.0 + (std::f64::consts::PI * progress).cos()),
    };
    peak * factor
}

/// The global L2 norm of the gradients of `vars` (vars without a gradient count as zero). CPU f32 gradients are
/// summed in f64 in one pass ([`fused::sum_squares`]); others by tensor ops.
pub fn grad_norm(grads: &GradStore, vars: &[Var]) -> Result<f64> {
    let mut sum_sq = 0.0f64;
    for v in vars {
        if let Some(g) = grads.get(v.as_tensor()) {
            sum_sq += match fused::sum_squares(g) {
                Some(s) => s,
                None => f64::from(
                    g.sqr()?
                        .sum_all()?
                        .to_dtype(candle_core::DType::F32)?
                        .to_scalar::<f32>()?,
                ),
            };
        }
    }
    Ok(sum_sq.sqrt())
}

/// The factor a gradient-norm clip to `max_norm` multiplies the gradients by (PyTorch's `clip_grad_norm_`), for a
/// pre-clip `norm`: 1 when the norm is within the limit, not finite (the caller stops the run instead: NaN/Inf
/// guard) or the clip is off (`max_norm ≤ 0`). [`AdamW::step_scaled`] applies it without rewriting the gradients.
pub fn clip_scale(norm: f64, max_norm: f64) -> f64 {
    if !norm.is_finite() || norm <= max_norm || max_norm <= 0.0 {
        1.0
    } else {
        max_norm / (norm + 1e-6)
    }
}

/// In-place element-wise kernels for CPU f32 tensors: the optimiser's and the EMA's updates as one pass each.
pub mod fused {
    use candle_core::{CpuStorage, InplaceOp2, InplaceOp3, Layout, Result, Tensor, bail};
    use rayon::prelude::*;

    use crate::model::ops::{contiguous_f32, contiguous_f32_mut, widest};

    /// Elements per parallel task: large enough that rayon's overhead is small, and a fixed split, so a sum is
    /// the same whatever the number of threads.
    const CHUNK: usize = 1 << 15;

    /// Whether every tensor is on the CPU in f32 (the fused kernels' domain); layouts are checked by the kernels.
    pub fn applies(tensors: &[&Tensor]) -> bool {
        tensors
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == candle_core::DType::F32)
    }

    fn same_len(op: &str, a: usize, b: usize) -> Result<()> {
        if a != b {
            bail!("{op}: {a} elements against {b}")
        }
        Ok(())
    }

    /// `dst ← a·dst + b·(s·x)` (or `b·(s·x)²`): an AdamW moment, or an EMA with `s = 1`. The operations are those
    /// of the tensor-op path in its order, in f32.
    pub struct Blend {
        a: f32,
        b: f32,
        scale: f32,
        square: bool,
    }

    impl Blend {
        /// `a·dst + b·(scale·x)`, squared before `b` when `square`.
        pub fn new(a: f64, b: f64, scale: f32, square: bool) -> Self {
            Self {
                a: a as f32,
                b: b as f32,
                scale,
                square,
            }
        }
    }

    impl InplaceOp2 for Blend {
        fn name(&self) -> &'static str {
            "fused-blend"
        }

        fn cpu_fwd(&self, s1: &mut CpuStorage, l1: &Layout, s2: &CpuStorage, l2: &Layout) -> Result<()> {
            let dst = contiguous_f32_mut(s1, l1, self.name())?;
            let x = contiguous_f32(s2, l2, self.name())?;
            same_len(self.name(), dst.len(), x.len())?;
            let &Self { a, b, scale, square } = self;
            dst.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(d, x)| {
                widest(|| {
                    for (d, &x) in d.iter_mut().zip(x) {
                        let x = if scale == 1.0 { x } else { x * scale };
                        let x = if square { x * x } else { x };
                        *d = *d * a + x * b;
                    }
                })
            });
            Ok(())
        }
    }

    /// `w ← w·decay − lr·(m·scale_m) / (√(v·scale_v) + ε)`: AdamW's step from its updated moments.
    pub struct AdamWUpdate {
        /// `1 − lr·weight_decay`.
        pub decay: f32,
        /// The learning rate.
        pub lr: f32,
        /// `1 / (1 − β₁ᵗ)`.
        pub scale_m: f32,
        /// `1 / (1 − β₂ᵗ)`.
        pub scale_v: f32,
        /// ε.
        pub eps: f32,
    }

    impl InplaceOp3 for AdamWUpdate {
        fn name(&self) -> &'static str {
            "fused-adamw"
        }

        fn cpu_fwd(
            &self,
            s1: &mut CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
        ) -> Result<()> {
            let w = contiguous_f32_mut(s1, l1, self.name())?;
            let m = contiguous_f32(s2, l2, self.name())?;
            let v = contiguous_f32(s3, l3, self.name())?;
            same_len(self.name(), w.len(), m.len())?;
            same_len(self.name(), w.len(), v.len())?;
            let &Self {
                decay,
                lr,
                scale_m,
                scale_v,
                eps,
            } = self;
            w.par_chunks_mut(CHUNK)
                .zip(m.par_chunks(CHUNK).zip(v.par_chunks(CHUNK)))
                .for_each(|(w, (m, v))| {
                    widest(|| {
                        for ((w, &m), &v) in w.iter_mut().zip(m).zip(v) {
                            let update = (m * scale_m) / ((v * scale_v).sqrt() + eps);
                            *w = *w * decay - update * lr;
                        }
                    })
                });
            Ok(())
        }
    }

    /// `Σ x²` in f64 over a CPU f32 tensor in one pass (chunk sums added in order: the same value whatever the
    /// threads); `None` for other devices and dtypes.
    pub fn sum_squares(t: &Tensor) -> Option<f64> {
        if !applies(&[t]) {
            return None;
        }
        let t = t.contiguous().ok()?;
        let (storage, layout) = t.storage_and_layout();
        let candle_core::Storage::Cpu(CpuStorage::F32(data)) = &*storage else {
            return None;
        };
        let (a, b) = layout.contiguous_offsets()?;
        let partial: Vec<f64> = data[a..b]
            .par_chunks(CHUNK)
            .map(|c| c.iter().map(|&x| f64::from(x) * f64::from(x)).sum())
            .collect();
        Some(partial.iter().sum())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// Runs our AdamW and candle's side by side on `Σ (w − target)²` in `dtype` for five steps with weight decay
    /// and a changing lr, asserting after each that the weights differ by at most `tol`; returns ours.
    fn against_candle(dtype: candle_core::DType, tol: f64) -> Result<(Var, AdamW, Tensor)> {
        use candle_nn::Optimizer;
        let d = Device::Cpu;
        let init = Tensor::new(&[[0.5f32, -1.0], [2.0, 0.1]], &d)?.to_dtype(dtype)?;
        let ours_v = Var::from_tensor(&init)?;
        let theirs_v = Var::from_tensor(&init)?;
        let params = AdamWParams {
            lr: 0.05,
            weight_decay: 0.1,
            ..AdamWParams::default()
        };
        let mut ours = AdamW::new(vec![("w".into(), ours_v.clone())], params)?;
        let mut theirs = candle_nn::AdamW::new(
            vec![theirs_v.clone()],
            candle_nn::ParamsAdamW {
                lr: 0.05,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
        )?;
        let target = Tensor::new(&[[1f32, 1.0], [-1.0, 0.0]], &d)?.to_dtype(dtype)?;
        let loss_of = |v: &Var| -> Result<Tensor> { (v.as_tensor() - &target)?.sqr()?.sum_all() };
        for step in 0..5 {
            let lr = 0.05 / (1.0 + step as f64);
            ours.set_lr(lr);
            theirs.set_learning_rate(lr);
            ours.step(&loss_of(&ours_v)?.backward()?)?;
            theirs.step(&loss_of(&theirs_v)?.backward()?)?;
            let diff = (ours_v.as_tensor() - theirs_v.as_tensor())?
                .abs()?
                .max_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            assert!(diff <= tol, "{dtype:?}, step {step}: {diff}");
        }
        Ok((ours_v, ours, target))
    }

    /// Our AdamW must reproduce candle's, update for update (with weight decay and a changing lr).
    #[test]
    fn adamw_matches_candle_adamw_and_restores_its_state() -> Result<()> {
        let d = Device::Cpu;
        let (ours_v, mut ours, target) = against_candle(candle_core::DType::F32, 1e-6)?;
        let params = ours.params;
        let loss_of = |v: &Var| -> Result<Tensor> { (v.as_tensor() - &target)?.sqr()?.sum_all() };
        // The moments hold values, never a graph (that leaked ~250 MB per training step once).
        assert!(ours.m.iter().chain(&ours.v).all(|t| !t.track_op()));
        // Save, perturb a copy, restore: the restored optimiser continues exactly like the original.
        let state: HashMap<String, Tensor> = ours.state_tensors()?.into_iter().collect();
        let copy_v = Var::from_tensor(ours_v.as_tensor())?;
        let mut restored = AdamW::new(vec![("w".into(), copy_v.clone())], params)?;
        restored.load_state(&state)?;
        assert_eq!(restored.steps(), 5);
        ours.step(&loss_of(&ours_v)?.backward()?)?;
        restored.step(&loss_of(&copy_v)?.backward()?)?;
        let diff = (ours_v.as_tensor() - copy_v.as_tensor())?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        // A state for another shape is refused and leaves the optimiser as it was.
        let other = Var::from_tensor(&Tensor::zeros(3, candle_core::DType::F32, &d)?)?;
        let mut wrong = AdamW::new(vec![("w".into(), other)], params)?;
        assert!(wrong.load_state(&state).is_err());
        assert_eq!(wrong.steps(), 0);
        Ok(())
    }

    /// The in-place CPU path computes what the tensor-op path computes (the same f32 tensor ops, written out
    /// here), bit for bit: moments and weights over several chunks of the kernels, with a clip scale and weight
    /// decay; then the EMA's blend and the squared-sum reduction.
    #[test]
    fn fused_update_equals_the_tensor_ops() -> Result<()> {
        let d = Device::Cpu;
        let n = 3 * (1 << 15) + 17;
        let mut rng = crate::rng::stream_rng(7, 0, 0);
        let w0 = Tensor::from_vec(crate::rng::normal_vec(&mut rng, n), n, &d)?;
        let grads_of = |rng: &mut rand_chacha::ChaCha8Rng| -> Result<Tensor> {
            Tensor::from_vec(crate::rng::normal_vec(rng, n), n, &d)
        };
        let params = AdamWParams {
            lr: 1e-2,
            weight_decay: 0.05,
            ..AdamWParams::default()
        };
        let var = Var::from_tensor(&w0)?;
        let mut opt = AdamW::new(vec![("w".into(), var.clone())], params)?;
        let (mut m, mut v, mut w) = (w0.zeros_like()?, w0.zeros_like()?, w0.clone());
        for t in 1..=3 {
            let g = grads_of(&mut rng)?;
            let scale = 0.3;
            // The optimiser reads the gradient of its variable from a store.
            let mut store = (var.as_tensor() * 0.0)?.sum_all()?.backward()?;
            store.insert(var.as_tensor(), g.clone());
            opt.step_scaled(&store, scale)?;
            // The same formula as tensor ops, in f32.
            let (b1, b2) = (params.beta1, params.beta2);
            let gs = g.affine(scale, 0.0)?;
            m = ((&m * b1)? + (&gs * (1.0 - b1))?)?;
            v = ((&v * b2)? + (gs.sqr()? * (1.0 - b2))?)?;
            let update =
                ((&m * (1.0 / (1.0 - b1.powi(t))))? / ((&v * (1.0 / (1.0 - b2.powi(t))))?.sqrt()? + params.eps)?)?;
            w = ((&w * (1.0 - params.lr * params.weight_decay))? - (update * params.lr)?)?;
            assert_eq!(opt.m[0].to_vec1::<f32>()?, m.to_vec1::<f32>()?, "m, step {t}");
            assert_eq!(opt.v[0].to_vec1::<f32>()?, v.to_vec1::<f32>()?, "v, step {t}");
            assert_eq!(var.as_tensor().to_vec1::<f32>()?, w.to_vec1::<f32>()?, "w, step {t}");
        }
        // The EMA's blend and the squared-sum reduction.
        let e = w0.copy()?;
        e.inplace_op2(var.as_tensor(), &fused::Blend::new(0.99, 0.01, 1.0, false))?;
        let expect = ((&w0 * 0.99)? + (var.as_tensor() * 0.01)?)?;
        assert_eq!(e.to_vec1::<f32>()?, expect.to_vec1::<f32>()?);
        let xs = w0.to_vec1::<f32>()?;
        let by_hand: f64 = xs.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
        let fused = fused::sum_squares(&w0).expect("f32 on the CPU");
        assert!((fused - by_hand).abs() < 1e-9 * by_hand, "{fused} vs {by_hand}");
        assert!(fused::sum_squares(&w0.to_dtype(candle_core::DType::F64)?).is_none());
        Ok(())
    }

    /// Other dtypes take the tensor-op path and still match candle's AdamW.
    #[test]
    fn tensor_op_path_for_other_dtypes() -> Result<()> {
        against_candle(candle_core::DType::F64, 1e-12).map(|_| ())
    }

    #[test]
    fn warmup_is_linear_then_flat() {
        let o = |warmup_steps| OptimConfig {
            adamw: AdamWParams {
                lr: 1e-4,
                ..AdamWParams::default()
            },
            warmup_steps,
            ..OptimConfig::default()
        };
        assert_eq!(lr_at(1, 100, &o(4)), 2.5e-5);
        assert_eq!(lr_at(4, 100, &o(4)), 1e-4);
        assert_eq!(lr_at(100, 100, &o(4)), 1e-4);
        assert_eq!(lr_at(1, 100, &o(0)), 1e-4);
    }

    /// Hand-computed: peak 1, 2 warm-up steps, 10 steps in all, decay after step 6 (`decay_from`), so the 0-based
    /// steps 6..9 have progress 0, 1/4, 2/4, 3/4 — diffusers' schedules with 6 warm-up steps give the same.
    #[test]
    fn linear_and_cosine_decay_by_hand() {
        let o = |decay| OptimConfig {
            adamw: AdamWParams {
                lr: 1.0,
                ..AdamWParams::default()
            },
            warmup_steps: 2,
            decay,
            decay_from: 6,
            ..OptimConfig::default()
        };
        let run = |decay| (1..=10).map(|s| lr_at(s, 10, &o(decay))).collect::<Vec<_>>();
        assert_eq!(
            run(LrDecay::Linear),
            [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 0.75, 0.5, 0.25]
        );
        let c = run(LrDecay::Cosine);
        let half = std::f64::consts::FRAC_1_SQRT_2;
        let want = [
            0.5,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            1.0,
            0.5 + 0.5 * half,
            0.5,
            0.5 - 0.5 * half,
        ];
        for (s, (got, want)) in c.iter().zip(want).enumerate() {
            assert!((got - want).abs() < 1e-12, "step {}: {got} vs {want}", s + 1);
        }
        assert_eq!(
            run(LrDecay::Constant),
            [0.5, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0, 1.0]
        );
        // decay_from 0: the decay starts at the end of the warm-up (0-based step 2 keeps the peak, 9 gets 1/8).
        let from_warmup = OptimConfig {
            decay_from: 0,
            ..o(LrDecay::Linear)
        };
        assert_eq!(lr_at(3, 10, &from_warmup), 1.0);
        assert_eq!(lr_at(10, 10, &from_warmup), 0.125);
        // Past the last step (a run continued with more steps than its schedule) the rate stays at 0.
        assert_eq!(lr_at(12, 10, &from_warmup), 0.0);
    }

    #[test]
    fn a_decay_that_never_starts_is_refused() {
        let o = OptimConfig {
            decay: LrDecay::Cosine,
            decay_from: 500,
            ..OptimConfig::default()
        };
        let e = o.check_schedule(500).unwrap_err().to_string();
        assert!(e.contains("optim.decay_from") && e.contains("500"), "{e}");
        assert!(o.check_schedule(501).is_ok());
        let constant = OptimConfig {
            decay_from: 500,
            ..OptimConfig::default()
        };
        assert!(constant.check_schedule(10).is_ok());
    }

    #[test]
    fn clipping_hand_computed() -> Result<()> {
        let d = Device::Cpu;
        // loss = 3a + 4b → grads (3, 4), norm 5.
        let a = Var::new(&[1.0f32], &d)?;
        let b = Var::new(&[1.0f32], &d)?;
        let loss = (a.as_tensor().affine(3.0, 0.0)? + b.as_tensor().affine(4.0, 0.0)?)?.sum_all()?;
        let grads = loss.backward()?;
        let vars = [a.clone(), b.clone()];
        let before = grad_norm(&grads, &vars)?;
        assert!((before - 5.0).abs() < 1e-6);
        let scale = clip_scale(before, 1.0);
        let (ga, gb) = (3.0 * scale, 4.0 * scale);
        assert!((ga - 0.6).abs() < 1e-5 && (gb - 0.8).abs() < 1e-5, "{ga} {gb}");
        assert!((before * scale - 1.0).abs() < 1e-5);
        // Below the limit, or the clip off: untouched.
        assert_eq!(clip_scale(1.0, 10.0), 1.0);
        assert_eq!(clip_scale(5.0, 0.0), 1.0);
        Ok(())
    }

    #[test]
    fn non_finite_norm_is_reported_not_scaled() -> Result<()> {
        let d = Device::Cpu;
        let a = Var::new(&[f32::INFINITY], &d)?;
        let loss = a.as_tensor().sqr()?.sum_all()?;
        let grads = loss.backward()?;
        let norm = grad_norm(&grads, &[a])?;
        assert!(!norm.is_finite());
        assert_eq!(clip_scale(norm, 1.0), 1.0);
        Ok(())
    }
}
