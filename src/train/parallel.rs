//! Data-parallel training: the collective a run needs, behind one small trait.
//!
//! Every rank holds the whole model and LoRA. At optimiser step `s` with `train.grad_accum = A` and a world of
//! `W` ranks, rank `r` computes the gradients of pairs `(s − 1)·A·W + r·A + 1 ..= (s − 1)·A·W + (r + 1)·A`
//! (disjoint shards; the same pairs, in the same order, that one rank with `grad_accum = A·W` would take), averages
//! them, and [`Collective::all_reduce_mean`] makes every rank hold the mean over the world. Clipping and AdamW then
//! run on identical gradients, so every rank's LoRA stays identical without broadcasting weights.
//!
//! [`Solo`] is the world of one; [`LocalGroup`] runs ranks as threads of one process (tests, and several models
//! on one machine), reducing in rank order so that its mean is the same floating-point sum as one rank's
//! accumulation.

use std::sync::{Arc, Barrier, Mutex};

use candle_core::Tensor;

/// Errors of a collective.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// Tensor access.
    #[error(transparent)]
    Tensor(#[from] candle_core::Error),
    /// The ranks disagree (different tensor lists), or a rank died.
    #[error("data-parallel rank {rank}: {message}")]
    Group {
        /// This rank.
        rank: usize,
        /// What went wrong.
        message: String,
    },
}

/// What data-parallel training needs from the ranks.
pub trait Collective: Send {
    /// This rank, `0..world_size`.
    fn rank(&self) -> usize;
    /// Ranks in the world.
    fn world_size(&self) -> usize;
    /// Replaces every tensor by its mean over the ranks. Every rank passes the same number of tensors with the
    /// same shapes, in the same order.
    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError>;
}

/// The world of one rank: nothing to reduce.
#[derive(Clone, Copy, Debug, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }

    fn world_size(&self) -> usize {
        1
    }

    fn all_reduce_mean(&self, _: &mut [Tensor]) -> Result<(), CollectiveError> {
        Ok(())
    }
}

struct Shared {
    world: usize,
    barrier: Barrier,
    /// Each rank's contribution of the current reduction.
    slots: Mutex<Vec<Option<Vec<Tensor>>>>,
}

/// Ranks as threads of one process: [`LocalGroup::new`] gives one handle per rank, each moved to its thread.
pub struct LocalGroup {
    rank: usize,
    shared: Arc<Shared>,
}

impl LocalGroup {
    /// Handles for a world of `world` ranks (at least 1).
    pub fn new(world: usize) -> Vec<LocalGroup> {
        let world = world.max(1);
        let shared = Arc::new(Shared {
            world,
            barrier: Barrier::new(world),
            slots: Mutex::new(vec![None; world]),
        });
        (0..world)
            .map(|rank| LocalGroup {
                rank,
                shared: shared.clone(),
            })
            .collect()
    }

    fn error(&self, message: impl Into<String>) -> CollectiveError {
        CollectiveError::Group {
            rank: self.rank,
            message: message.into(),
        }
    }
}

impl Collective for LocalGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.world
    }

    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        let world = self.shared.world;
        if world == 1 {
            return Ok(());
        }
        let poisoned = || self.error("a rank panicked during a reduction");
        self.shared.slots.lock().map_err(|_| poisoned())?[self.rank] = Some(tensors.to_vec());
        self.shared.barrier.wait();
        let result = (|| {
            let slots = self.shared.slots.lock().map_err(|_| poisoned())?;
            let contributions: Vec<&Vec<Tensor>> = slots.iter().flatten().collect();
            if contributions.len() != world || contributions.iter().any(|c| c.len() != tensors.len()) {
                return Err(self.error("the ranks passed different tensor lists"));
            }
            for (i, t) in tensors.iter_mut().enumerate() {
                // In rank order on every rank: the same sum everywhere, and the same as one rank accumulating.
                let mut sum = contributions[0][i].clone();
                for c in &contributions[1..] {
                    sum = (sum + &c[i])?;
                }
                *t = sum.affine(1.0 / world as f64, 0.0)?;
            }
            Ok(())
        })();
        // Nobody refills the slots before every rank has read them.
        self.shared.barrier.wait();
        if self.rank == 0
            && let Ok(mut slots) = self.shared.slots.lock()
        {
            slots.iter_mut().for_each(|s| *s = None);
        }
        self.shared.barrier.wait();
        result
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn local_ranks_average_in_rank_order() {
        let handles = LocalGroup::new(3);
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let r = g.rank() as f32;
                        let mut t = vec![Tensor::new(&[r, 10.0 * r], &Device::Cpu).expect("tensor")];
                        g.all_reduce_mean(&mut t).expect("reduce");
                        // A second reduction reuses the slots.
                        let mut u = vec![Tensor::new(&[1.0f32 + r], &Device::Cpu).expect("tensor")];
                        g.all_reduce_mean(&mut u).expect("reduce again");
                        let mut out = t[0].to_vec1::<f32>().expect("values");
                        out.extend(u[0].to_vec1::<f32>().expect("values"));
                        out
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().expect("rank")).collect()
        });
        for r in &results {
            assert_eq!(r, &vec![1.0, 10.0, 2.0], "mean of 0, 1, 2 / 0, 10, 20 / 1, 2, 3");
        }
    }

    #[test]
    fn ranks_that_disagree_get_an_error_not_a_hang() {
        let handles = LocalGroup::new(2);
        let errors: Vec<bool> = std::thread::scope(|s| {
            let joins: Vec<_> = handles
                .into_iter()
                .map(|g| {
                    s.spawn(move || {
                        let n = g.rank() + 1;
                        let mut t: Vec<Tensor> = (0..n)
                            .map(|_| Tensor::new(&[1.0f32], &Device::Cpu).expect("tensor"))
                            .collect();
                        g.all_reduce_mean(&mut t).is_err()
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().expect("rank")).collect()
        });
        assert_eq!(errors, vec![true, true]);
    }
}
