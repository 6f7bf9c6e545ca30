//! Data-parallel training: the collective a run needs, behind one small trait.
//!
//! Every rank holds the whole model and LoRA. At optimiser step `s` with `train.grad_accum = A` and a world of
//! `W` ranks, rank `r` computes the gradients of pairs `(s − 1)·A·W + r·A + 1 ..= (s − 1)·A·W + (r + 1)·A`
//! (disjoint shards; the same pairs, in the same order, that one rank with `grad_accum = A·W` would take), averages
//! them, and [`Collective::all_reduce_mean`] makes every rank hold the mean over the world. Clipping and AdamW then
//! run on identical gradients, so every rank's LoRA stays identical without broadcasting weights.
//!
//! [`Solo`] is the world of one; [`LocalGroup`] runs ranks as threads of one process (tests, and several models
//! on one machine); [`TcpGroup`] joins ranks that are processes (`focusdpo train --ranks N`, or an external
//! launcher's `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT`) through rank 0 over TCP. Both reduce in rank order,
//! so their mean is the same floating-point sum as one rank's accumulation.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

use candle_core::{DType, Tensor};

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

/// A [`CollectiveError::Group`] of `rank`.
fn group_error(rank: usize, message: impl Into<String>) -> CollectiveError {
    CollectiveError::Group {
        rank,
        message: message.into(),
    }
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
    /// Whether training reduces through it at all: every world but [`Solo`] — a launcher's world of one too, so
    /// that a one-GPU world runs the same path (NCCL included) as eight.
    fn reduces(&self) -> bool {
        true
    }
    /// Whether `flag` holds on any rank; every rank calls it at the same point (the training loop asks it whether
    /// any rank was asked to stop, so that all stop after the same step).
    fn any(&self, flag: bool) -> Result<bool, CollectiveError> {
        let mut t = vec![Tensor::new(
            &[if flag { 1f32 } else { 0.0 }],
            &candle_core::Device::Cpu,
        )?];
        self.all_reduce_mean(&mut t)?;
        Ok(t[0].to_vec1::<f32>()?.first().is_some_and(|v| *v > 0.0))
    }
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

    fn reduces(&self) -> bool {
        false
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
        group_error(self.rank, message)
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

/// Ranks that are processes, joined through rank 0 over TCP: every rank sends its tensors to rank 0, which sums
/// them in rank order, divides by the world size and sends the mean back. For CPU worlds (and tests); GPUs would
/// use NCCL behind the same trait.
pub struct TcpGroup {
    rank: usize,
    world: usize,
    /// Rank 0: a stream to every other rank (index `r − 1`); other ranks: the stream to rank 0.
    peers: Mutex<Vec<TcpStream>>,
}

/// The world this process belongs to, from the variables launchers set (`torchrun`, `srun` wrappers, `focusdpo
/// train --ranks N`): `RANK`, `WORLD_SIZE`, `MASTER_ADDR` (default 127.0.0.1), `MASTER_PORT` (default 29500).
/// `None` without `WORLD_SIZE`; a world of one needs no connection.
pub fn world_from_env() -> Result<Option<TcpGroup>, CollectiveError> {
    let var = |k: &str| std::env::var(k).ok().filter(|v| !v.trim().is_empty());
    let Some(world) = var("WORLD_SIZE") else {
        return Ok(None);
    };
    let bad = |message: String| group_error(0, message);
    let world: usize = world
        .trim()
        .parse()
        .map_err(|_| bad(format!("WORLD_SIZE={world}: not a number")))?;
    let rank: usize = var("RANK")
        .unwrap_or_else(|| "0".into())
        .trim()
        .parse()
        .map_err(|_| bad("RANK: not a number".into()))?;
    if world == 0 {
        return Err(bad("WORLD_SIZE=0: a world has at least one rank".into()));
    }
    if rank >= world {
        return Err(bad(format!("RANK={rank} is not below WORLD_SIZE={world}")));
    }
    let addr = format!(
        "{}:{}",
        var("MASTER_ADDR").unwrap_or_else(|| "127.0.0.1".into()),
        var("MASTER_PORT").unwrap_or_else(|| "29500".into())
    );
    if world == 1 {
        return Ok(Some(TcpGroup {
            rank: 0,
            world: 1,
            peers: Mutex::new(Vec::new()),
        }));
    }
    TcpGroup::connect(rank, world, &addr, Duration::from_secs(120)).map(Some)
}

fn write_tensors(stream: &mut TcpStream, values: &[Vec<f32>]) -> std::io::Result<()> {
    let mut bytes = Vec::with_capacity(8 + values.iter().map(|v| 8 + 4 * v.len()).sum::<usize>());
    bytes.extend((values.len() as u64).to_le_bytes());
    for v in values {
        bytes.extend((v.len() as u64).to_le_bytes());
        for x in v {
            bytes.extend(x.to_le_bytes());
        }
    }
    stream.write_all(&bytes)?;
    stream.flush()
}

fn read_u64(stream: &mut TcpStream) -> std::io::Result<u64> {
    let mut b = [0u8; 8];
    stream.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// Tensors of at most this many values in all are accepted from a peer (a corrupt length cannot allocate
/// terabytes).
const MAX_VALUES: u64 = 1 << 34;

fn read_tensors(stream: &mut TcpStream) -> std::io::Result<Vec<Vec<f32>>> {
    let n = read_u64(stream)?;
    let invalid = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    if n > 1 << 20 {
        return Err(invalid("too many tensors"));
    }
    let mut out = Vec::with_capacity(n as usize);
    let mut total = 0u64;
    for _ in 0..n {
        let len = read_u64(stream)?;
        total += len;
        if total > MAX_VALUES {
            return Err(invalid("tensors too large"));
        }
        let mut raw = vec![0u8; len as usize * 4];
        stream.read_exact(&mut raw)?;
        out.push(
            raw.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
        );
    }
    Ok(out)
}

impl TcpGroup {
    /// Joins rank `rank` of `world` at `addr` (rank 0 listens there; the others connect, retrying until
    /// `wait`).
    pub fn connect(rank: usize, world: usize, addr: &str, wait: Duration) -> Result<TcpGroup, CollectiveError> {
        let err = |message: String| group_error(rank, message);
        let peers = if rank == 0 {
            let listener = TcpListener::bind(addr).map_err(|e| err(format!("listening on {addr}: {e}")))?;
            let mut slots: Vec<Option<TcpStream>> = (1..world).map(|_| None).collect();
            for _ in 1..world {
                let (mut s, _) = listener.accept().map_err(|e| err(format!("accepting a rank: {e}")))?;
                let r = read_u64(&mut s).map_err(|e| err(format!("a rank's hello: {e}")))? as usize;
                match slots.get_mut(r.wrapping_sub(1)) {
                    Some(slot @ None) => *slot = Some(s),
                    _ => return Err(err(format!("rank {r} joined twice or is not below WORLD_SIZE={world}"))),
                }
            }
            slots.into_iter().flatten().collect()
        } else {
            let start = Instant::now();
            let mut s = loop {
                match TcpStream::connect(addr) {
                    Ok(s) => break s,
                    Err(e) if start.elapsed() > wait => {
                        return Err(err(format!(
                            "rank 0 at {addr} did not answer in {} s: {e}",
                            wait.as_secs()
                        )));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(100)),
                }
            };
            s.write_all(&(rank as u64).to_le_bytes())
                .map_err(|e| err(format!("hello to rank 0: {e}")))?;
            vec![s]
        };
        for p in &peers {
            let _ = p.set_nodelay(true);
        }
        Ok(TcpGroup {
            rank,
            world,
            peers: Mutex::new(peers),
        })
    }
}

impl Collective for TcpGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        let mut peers = self.lock_peers()?;
        let mine = tensors
            .iter()
            .map(|t| t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let mean = if self.rank == 0 {
            let mut sum = mine;
            for (i, p) in peers.iter_mut().enumerate() {
                let theirs = read_tensors(p).map_err(|e| self.gone(i + 1, e))?;
                if theirs.len() != sum.len() || theirs.iter().zip(&sum).any(|(a, b)| a.len() != b.len()) {
                    return Err(self.error(format!("rank {} passed a different tensor list", i + 1)));
                }
                for (s, t) in sum.iter_mut().zip(&theirs) {
                    s.iter_mut().zip(t).for_each(|(a, b)| *a += b);
                }
            }
            let scale = (1.0 / self.world as f64) as f32;
            sum.iter_mut()
                .for_each(|v| v.iter_mut().for_each(|x| *x = *x * scale + 0.0));
            self.send_to_all(&mut peers, &sum)?;
            sum
        } else {
            let p = self.rank0(&mut peers)?;
            write_tensors(p, &mine).map_err(|e| self.gone(0, e))?;
            let back = read_tensors(p).map_err(|e| self.gone(0, e))?;
            if back.len() != tensors.len() {
                return Err(self.error("rank 0 answered a different tensor list"));
            }
            back
        };
        for (t, v) in tensors.iter_mut().zip(mean) {
            *t = Tensor::from_vec(v, t.shape(), t.device())?.to_dtype(t.dtype())?;
        }
        Ok(())
    }
}

impl TcpGroup {
    fn error(&self, message: impl Into<String>) -> CollectiveError {
        group_error(self.rank, message)
    }

    /// The error for a peer whose connection broke.
    fn gone(&self, peer: usize, e: std::io::Error) -> CollectiveError {
        self.error(format!("rank {peer} is gone: {e}"))
    }

    fn lock_peers(&self) -> Result<std::sync::MutexGuard<'_, Vec<TcpStream>>, CollectiveError> {
        self.peers.lock().map_err(|_| self.error("poisoned connection lock"))
    }

    /// Rank 0: sends `values` to every other rank.
    fn send_to_all(&self, peers: &mut [TcpStream], values: &[Vec<f32>]) -> Result<(), CollectiveError> {
        for (i, p) in peers.iter_mut().enumerate() {
            write_tensors(p, values).map_err(|e| self.gone(i + 1, e))?;
        }
        Ok(())
    }

    /// Another rank: its connection to rank 0.
    fn rank0<'a>(&self, peers: &'a mut [TcpStream]) -> Result<&'a mut TcpStream, CollectiveError> {
        peers.first_mut().ok_or_else(|| self.error("no connection to rank 0"))
    }

    /// Sends rank 0's `bytes` to every rank (others pass anything; every rank gets rank 0's).
    pub fn broadcast_bytes(&self, bytes: &[u8]) -> Result<Vec<u8>, CollectiveError> {
        let mut peers = self.lock_peers()?;
        let as_f32 = vec![bytes.iter().map(|&b| f32::from(b)).collect::<Vec<f32>>()];
        if self.rank == 0 {
            self.send_to_all(&mut peers, &as_f32)?;
            Ok(bytes.to_vec())
        } else {
            let got = read_tensors(self.rank0(&mut peers)?).map_err(|e| self.gone(0, e))?;
            Ok(got
                .into_iter()
                .next()
                .unwrap_or_default()
                .into_iter()
                .map(|v| v.clamp(0.0, 255.0) as u8)
                .collect())
        }
    }
}

/// Ranks on GPUs, reduced by NCCL (`ncclAvg`) on the device; rank 0's NCCL id reaches the others through a
/// [`TcpGroup`] (the same `RANK`/`WORLD_SIZE`/`MASTER_ADDR`/`MASTER_PORT` rendezvous).
#[cfg(feature = "nccl")]
pub struct NcclGroup {
    rank: usize,
    world: usize,
    comm: Mutex<SendComm>,
    /// This rank's GPU: tensors elsewhere (the CPU scalars of the resume and stop agreements) travel through it.
    device: candle_core::Device,
}

#[cfg(feature = "nccl")]
struct SendComm(std::sync::Arc<candle_core::cuda_backend::cudarc::nccl::safe::Comm>);

// An NCCL communicator may be used from any thread, one call at a time (the Mutex).
#[cfg(feature = "nccl")]
unsafe impl Send for SendComm {}

#[cfg(feature = "nccl")]
impl NcclGroup {
    /// Joins the NCCL world of `tcp`'s ranks on `device` (this rank's GPU).
    pub fn new(tcp: &TcpGroup, device: &candle_core::Device) -> Result<NcclGroup, CollectiveError> {
        use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id};
        let err = |message: String| group_error(tcp.rank, message);
        let cuda = device.as_cuda_device()?;
        let id = if tcp.rank == 0 {
            Id::new().map_err(|e| err(format!("NCCL id: {e:?}")))?
        } else {
            Id::uninit([0; 128])
        };
        let mine: Vec<u8> = id.internal().iter().map(|&c| c as u8).collect();
        let shared = tcp.broadcast_bytes(&mine)?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (d, s) in internal.iter_mut().zip(&shared) {
            *d = *s as std::ffi::c_char;
        }
        let comm = Comm::from_rank(cuda.cuda_stream(), tcp.rank, tcp.world, Id::uninit(internal))
            .map_err(|e| err(format!("NCCL communicator: {e:?}")))?;
        Ok(NcclGroup {
            rank: tcp.rank,
            world: tcp.world,
            comm: Mutex::new(SendComm(std::sync::Arc::new(comm))),
            device: device.clone(),
        })
    }
}

/// The all-reduce as a candle op on a contiguous f32 CUDA tensor.
#[cfg(feature = "nccl")]
struct NcclAverage(std::sync::Arc<candle_core::cuda_backend::cudarc::nccl::safe::Comm>);

#[cfg(feature = "nccl")]
impl candle_core::CustomOp1 for NcclAverage {
    fn name(&self) -> &'static str {
        "nccl-average"
    }

    fn cpu_fwd(
        &self,
        _: &candle_core::CpuStorage,
        _: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        candle_core::bail!("NCCL reduces CUDA tensors; this one is on the CPU")
    }

    fn cuda_fwd(
        &self,
        s: &candle_core::CudaStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, candle_core::Shape)> {
        use candle_core::cuda_backend::cudarc::nccl::safe::ReduceOp;
        let n = l.shape().elem_count();
        let (start, end) = l
            .contiguous_offsets()
            .ok_or_else(|| candle_core::Error::Msg("NCCL average: not contiguous".into()))?;
        let input = s.as_cuda_slice::<f32>()?.slice(start..end);
        let dev = s.device.clone();
        let mut out = unsafe { dev.alloc::<f32>(n)? };
        self.0
            .all_reduce(&input, &mut out, &ReduceOp::Avg)
            .map_err(|e| candle_core::Error::Msg(format!("NCCL all-reduce: {e:?}")))?;
        Ok((candle_core::CudaStorage::wrap_cuda_slice(out, dev), l.shape().clone()))
    }
}

#[cfg(feature = "nccl")]
impl Collective for NcclGroup {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world
    }

    fn all_reduce_mean(&self, tensors: &mut [Tensor]) -> Result<(), CollectiveError> {
        let comm = self
            .comm
            .lock()
            .map_err(|_| group_error(self.rank, "poisoned communicator lock"))?
            .0
            .clone();
        for t in tensors.iter_mut() {
            let (dtype, home) = (t.dtype(), t.device().clone());
            let reduced = t
                .to_device(&self.device)?
                .to_dtype(DType::F32)?
                .contiguous()?
                .apply_op1_no_bwd(&NcclAverage(comm.clone()))?;
            *t = reduced.to_dtype(dtype)?.to_device(&home)?;
        }
        Ok(())
    }
}

/// The collective of this process's world on `device`: NCCL between GPUs (with the `nccl` feature), TCP
/// otherwise; `None` outside a world.
pub fn world_for(device: &candle_core::Device) -> Result<Option<Box<dyn Collective + Sync>>, CollectiveError> {
    let Some(tcp) = world_from_env()? else {
        return Ok(None);
    };
    #[cfg(feature = "nccl")]
    if device.is_cuda() {
        return Ok(Some(Box::new(NcclGroup::new(&tcp, device)?)));
    }
    let _ = device;
    Ok(Some(Box::new(tcp)))
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
    fn tcp_ranks_average_like_local_ones() {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let addr = format!("127.0.0.1:{port}");
        let results: Vec<Vec<f32>> = std::thread::scope(|s| {
            let joins: Vec<_> = (0..3)
                .map(|rank| {
                    let addr = addr.clone();
                    s.spawn(move || {
                        let g = TcpGroup::connect(rank, 3, &addr, Duration::from_secs(10)).expect("joins");
                        let r = rank as f32;
                        let mut t = vec![
                            Tensor::new(&[[r, 10.0 * r]], &Device::Cpu).expect("tensor"),
                            Tensor::new(&[1.0f32 + r], &Device::Cpu).expect("tensor"),
                        ];
                        g.all_reduce_mean(&mut t).expect("reduce");
                        assert_eq!(t[0].dims(), &[1, 2], "shapes kept");
                        let mut out = t[0].flatten_all().and_then(|x| x.to_vec1::<f32>()).expect("values");
                        out.extend(t[1].to_vec1::<f32>().expect("values"));
                        out
                    })
                })
                .collect();
            joins.into_iter().map(|j| j.join().expect("rank")).collect()
        });
        for r in &results {
            assert_eq!(r, &vec![1.0, 10.0, 2.0]);
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
