//! Block checkpointing (`train.checkpoint_blocks`): a block's forward keeps only its inputs; backward runs the
//! block again, with its graph, to get the gradients.
//!
//! candle has no checkpointing, and a custom op returns gradients for its (at most three) tensor arguments only.
//! So a checkpointed block is one candle op over its inputs whose value is computed beforehand without a graph
//! ([`without_graph`]: the LoRA adapters read detached), and whose backward recomputes the block from detached
//! copies of the inputs, back-propagates the incoming gradient through that fresh graph, returns the inputs'
//! gradients to candle and puts the gradients of the block's LoRA variables into a [`CheckpointGrads`] that the
//! training step adds to the gradients of its `backward()` ([`CheckpointGrads::merge_into`]). Peak activation
//! memory is then the block inputs of every block plus one block's graph at a time.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Storage, Tensor, TensorId, Var};

thread_local! {
    static NO_GRAPH: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with LoRA adapters read detached, so that a forward builds no graph (and frees its activations as it
/// goes) even though the adapters are trainable variables.
pub fn without_graph<T>(f: impl FnOnce() -> T) -> T {
    let previous = NO_GRAPH.with(|c| c.replace(true));
    let out = f();
    NO_GRAPH.with(|c| c.set(previous));
    out
}

/// Whether adapters are read detached on this thread ([`without_graph`]).
pub fn graph_disabled() -> bool {
    NO_GRAPH.with(Cell::get)
}

/// Gradients of LoRA variables inside checkpointed blocks, filled during `backward()`.
#[derive(Debug, Default)]
pub struct CheckpointGrads {
    grads: Mutex<HashMap<TensorId, Tensor>>,
}

impl CheckpointGrads {
    fn add(&self, var: &Var, grad: &Tensor) -> Result<()> {
        let mut grads = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint gradients: poisoned lock".into()))?;
        let id = var.as_tensor().id();
        let sum = match grads.remove(&id) {
            Some(g) => (g + grad)?,
            None => grad.clone(),
        };
        grads.insert(id, sum);
        Ok(())
    }

    /// Adds the collected gradients of `vars` to `store` (the gradients of the step's `backward()`), and clears.
    pub fn merge_into(&self, store: &mut GradStore, vars: &[Var]) -> Result<()> {
        let mut grads = self
            .grads
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint gradients: poisoned lock".into()))?;
        for var in vars {
            if let Some(g) = grads.remove(&var.as_tensor().id()) {
                add_grad(store, var, g)?;
            }
        }
        grads.clear();
        Ok(())
    }
}

/// Adds `grad` to `var`'s gradient in `store` (`existing + grad`; sets it when there is none).
pub fn add_grad(store: &mut GradStore, var: &Var, grad: Tensor) -> Result<()> {
    let sum = match store.remove(var.as_tensor()) {
        Some(existing) => (existing + grad)?,
        None => grad,
    };
    store.insert(var.as_tensor(), sum);
    Ok(())
}

/// Moves the gradients of `vars` from `from` into `into`, adding them to those already there ([`add_grad`]).
pub fn add_grads(into: &mut GradStore, from: &mut GradStore, vars: &[Var]) -> Result<()> {
    for var in vars {
        if let Some(g) = from.remove(var.as_tensor()) {
            add_grad(into, var, g)?;
        }
    }
    Ok(())
}

/// A value computed before its candle op runs (without a graph), handed to candle once by the op's forward: how
/// a checkpointed block and the chunked attention ([`super::attention`]) become single ops whose backward
/// recomputes.
pub(crate) struct Precomputed {
    value: Mutex<Option<Tensor>>,
    what: &'static str,
}

impl Precomputed {
    /// Holding `value`; `what` names the op in errors.
    pub(crate) fn new(value: Tensor, what: &'static str) -> Self {
        Self {
            value: Mutex::new(Some(value)),
            what,
        }
    }

    fn take(&self) -> Result<Tensor> {
        self.value
            .lock()
            .map_err(|_| candle_core::Error::Msg(format!("{}: poisoned lock", self.what)))?
            .take()
            .ok_or_else(|| candle_core::Error::Msg(format!("{}: forward ran twice", self.what)))
    }

    /// The value as the op's CPU output.
    pub(crate) fn cpu(&self) -> Result<(CpuStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        let Storage::Cpu(s) = &*storage else {
            candle_core::bail!("{}: the output is not on the CPU", self.what);
        };
        Ok((s.try_clone(layout)?, value.shape().clone()))
    }

    /// The value as the op's CUDA output.
    #[cfg(feature = "cuda")]
    pub(crate) fn cuda(&self) -> Result<(candle_core::CudaStorage, Shape)> {
        let value = self.take()?;
        let (storage, layout) = value.storage_and_layout();
        let Storage::Cuda(s) = &*storage else {
            candle_core::bail!("{}: the output is not on the GPU", self.what);
        };
        Ok((s.try_clone(layout)?, value.shape().clone()))
    }
}

/// Recomputes a block from its token stream and conditioning vector, with its graph.
pub type Recompute = Arc<dyn Fn(&Tensor, &Tensor) -> Result<Tensor> + Send + Sync>;

/// The output `value` (computed under [`without_graph`]) of `recompute(stream, vec)`, linked to both so that
/// backward reaches them and the block's `vars` (through `sink`). The first of `vars` is a third input of the op:
/// candle records an op in the graph only when an input is tracked, and the block's inputs need not be (the
/// first block's come from frozen embedders). `vars` must not be empty.
pub fn checkpointed(
    stream: &Tensor,
    vec: &Tensor,
    value: Tensor,
    recompute: Recompute,
    vars: Vec<Var>,
    sink: Arc<CheckpointGrads>,
) -> Result<Tensor> {
    let Some(anchor) = vars.first().map(|v| v.as_tensor().clone()) else {
        candle_core::bail!("checkpointed block without trainable variables");
    };
    stream.apply_op3_arc(
        vec,
        &anchor,
        Arc::new(Box::new(Checkpointed {
            value: Precomputed::new(value.contiguous()?, "checkpointed block"),
            recompute,
            vars,
            sink,
        })),
    )
}

struct Checkpointed {
    /// The precomputed output, handed to candle once by the forward.
    value: Precomputed,
    recompute: Recompute,
    vars: Vec<Var>,
    sink: Arc<CheckpointGrads>,
}

impl CustomOp3 for Checkpointed {
    fn name(&self) -> &'static str {
        "checkpointed-block"
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

    fn bwd(
        &self,
        stream: &Tensor,
        vec: &Tensor,
        _anchor: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (vs, vv) = (Var::from_tensor(&stream.detach())?, Var::from_tensor(&vec.detach())?);
        let out = (self.recompute)(vs.as_tensor(), vv.as_tensor())?;
        super::memory::trace_point(stream.device());
        let grads = (out * grad.detach())?.sum_all()?.backward()?;
        super::memory::trace_point(stream.device());
        // The variables' gradients go to the sink (the anchor's included), not through candle.
        for var in &self.vars {
            if let Some(g) = grads.get(var.as_tensor()) {
                self.sink.add(var, g)?;
            }
        }
        let get = |v: &Var| grads.get(v.as_tensor()).cloned();
        Ok((get(&vs), get(&vv), None))
    }
}
