//! Opening safetensors checkpoints as a candle `VarBuilder`, shared by every loader (base, autoencoder, text
//! encoders, eval embedders): small files are read into memory, large or sharded ones memory-mapped, and every
//! error names the file.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::VarBuilder;
use candle_nn::var_builder::SimpleBackend;

/// The dtype a frozen base is held in (`model.dtype`): f32 (the tiny default), or bf16 / f16, which halve the
/// memory of the weights. LoRA weights, optimiser state, masks and the loss stay f32 (activations: `model.activations`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    /// 4 bytes a weight.
    #[default]
    F32,
    /// bfloat16: 2 bytes, f32's range (FLUX.1-dev's own dtype).
    Bf16,
    /// IEEE half: 2 bytes, range ±65504.
    F16,
}

impl WeightDtype {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::Bf16 => DType::BF16,
            Self::F16 => DType::F16,
        }
    }

    /// The candle dtype's name here (any dtype other than bf16 and f16 reads as f32).
    pub fn of(dtype: DType) -> Self {
        match dtype {
            DType::BF16 => Self::Bf16,
            DType::F16 => Self::F16,
            _ => Self::F32,
        }
    }

    /// Bytes per weight.
    pub fn bytes(self) -> usize {
        self.dtype().size_in_bytes()
    }
}

impl std::fmt::Display for WeightDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::Bf16 => "bf16",
            Self::F16 => "f16",
        })
    }
}

impl std::str::FromStr for WeightDtype {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            "f16" | "float16" | "half" => Ok(Self::F16),
            other => Err(format!("`{other}` is not a weight dtype: use f32, bf16 or f16")),
        }
    }
}

/// Files up to this size are read into memory; larger ones (and shards) are memory-mapped.
const BUFFERED_MAX_BYTES: u64 = 1 << 30;

/// A checkpoint that cannot be opened; names the file.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// The file cannot be read.
    #[error("{path}: {source}")]
    Io {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid safetensors checkpoint.
    #[error("{path}: {source}")]
    Format {
        /// File.
        path: PathBuf,
        /// Cause.
        source: candle_core::Error,
    },
    /// A folder that should hold `*.safetensors` shards holds none.
    #[error("{0}: no *.safetensors file in this folder")]
    NoShards(PathBuf),
}

/// The safetensors files behind `path`: the file itself, or every `*.safetensors` in a folder (sorted, so
/// `model-00001-of-00002.safetensors` comes first).
pub fn safetensors_files(path: &Path) -> Result<Vec<PathBuf>, WeightsError> {
    let io = |source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    };
    if !path.is_dir() {
        std::fs::metadata(path).map_err(io)?;
        return Ok(vec![path.to_path_buf()]);
    }
    let mut files = Vec::new();
    for entry in std::fs::read_dir(path).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.extension().is_some_and(|e| e == "safetensors") {
            files.push(p);
        }
    }
    files.sort();
    if files.is_empty() {
        return Err(WeightsError::NoShards(path.to_path_buf()));
    }
    Ok(files)
}

/// Bytes of weights read so far while a model loads, and of how many, with the part being read: shared between
/// the thread that loads and whoever shows it (the Studio's progress bar). Loaders report into the one
/// [`track`]ed on their thread; without one, nothing is counted.
#[derive(Debug, Default)]
pub struct LoadProgress {
    read: AtomicU64,
    total: AtomicU64,
    part: Mutex<String>,
}

/// What [`LoadProgress::snapshot`] returns.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LoadSnapshot {
    /// Bytes read.
    pub read: u64,
    /// Bytes to read in all (0 when unknown).
    pub total: u64,
    /// The part being read (`transformer`, `T5`, …).
    pub part: String,
}

impl LoadProgress {
    /// Counts `bytes` more as read.
    pub fn add(&self, bytes: u64) {
        self.read.fetch_add(bytes, Ordering::Relaxed);
    }

    /// Sets the bytes to read in all.
    pub fn set_total(&self, bytes: u64) {
        self.total.store(bytes, Ordering::Relaxed);
    }

    /// Names the part being read.
    pub fn set_part(&self, part: &str) {
        if let Ok(mut p) = self.part.lock() {
            part.clone_into(&mut p);
        }
    }

    /// The current numbers.
    pub fn snapshot(&self) -> LoadSnapshot {
        LoadSnapshot {
            read: self.read.load(Ordering::Relaxed),
            total: self.total.load(Ordering::Relaxed),
            part: self.part.lock().map(|p| p.clone()).unwrap_or_default(),
        }
    }
}

thread_local! {
    static TRACKED: RefCell<Option<Arc<LoadProgress>>> = const { RefCell::new(None) };
}

/// Runs `f` with `progress` receiving the bytes every loader reads on this thread.
pub fn track<T>(progress: &Arc<LoadProgress>, f: impl FnOnce() -> T) -> T {
    let previous = TRACKED.with(|t| t.replace(Some(progress.clone())));
    let out = f();
    TRACKED.with(|t| *t.borrow_mut() = previous);
    out
}

/// The progress tracked on this thread, if any.
pub fn tracked() -> Option<Arc<LoadProgress>> {
    TRACKED.with(|t| t.borrow().clone())
}

/// Names the part being loaded, when progress is tracked on this thread.
pub fn loading_part(part: &str) {
    if let Some(p) = tracked() {
        p.set_part(part);
    }
}

/// Counts `bytes` as read, when progress is tracked on this thread.
pub fn count_read(bytes: u64) {
    if let Some(p) = tracked() {
        p.add(bytes);
    }
}

/// Total size of the files behind `path` (a file, or a folder's `*.safetensors`), 0 when unreadable.
pub fn weight_bytes(path: &Path) -> u64 {
    safetensors_files(path)
        .map(|files| {
            files
                .iter()
                .filter_map(|f| std::fs::metadata(f).ok())
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}

/// Memory-mapped weights that count the bytes of each tensor they hand out.
struct Counted {
    inner: candle_core::safetensors::MmapedSafetensors,
    progress: Arc<LoadProgress>,
}

impl Counted {
    fn count(&self, name: &str) {
        if let Ok(view) = self.inner.get(name) {
            self.progress.add(view.data().len() as u64);
        }
    }
}

impl SimpleBackend for Counted {
    fn get(&self, s: Shape, name: &str, h: candle_nn::Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = SimpleBackend::get(&self.inner, s, name, h, dtype, dev)?;
        self.count(name);
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.inner.get_unchecked(name, dtype, dev)?;
        self.count(name);
        Ok(t)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// Reads a whole file, counting the bytes as they arrive (for [`LoadProgress`]).
fn read_counted(path: &Path) -> std::io::Result<Vec<u8>> {
    use std::io::Read;
    let Some(progress) = tracked() else {
        return std::fs::read(path);
    };
    let mut f = std::fs::File::open(path)?;
    let len = f.metadata()?.len();
    let mut out = Vec::with_capacity(usize::try_from(len).unwrap_or(0));
    let mut chunk = vec![0u8; 8 << 20];
    loop {
        let n = f.read(&mut chunk)?;
        if n == 0 {
            return Ok(out);
        }
        out.extend_from_slice(&chunk[..n]);
        progress.add(n as u64);
    }
}

/// A `VarBuilder` over `files` (one checkpoint, possibly sharded), converting every tensor to `dtype`.
pub fn var_builder(files: &[PathBuf], dtype: DType, device: &Device) -> Result<VarBuilder<'static>, WeightsError> {
    let first = files.first().cloned().unwrap_or_default();
    let mut total = 0u64;
    for f in files {
        total += std::fs::metadata(f)
            .map_err(|source| WeightsError::Io {
                path: f.clone(),
                source,
            })?
            .len();
    }
    if files.len() == 1 && total <= BUFFERED_MAX_BYTES {
        let bytes = read_counted(&first).map_err(|source| WeightsError::Io {
            path: first.clone(),
            source,
        })?;
        return VarBuilder::from_buffered_safetensors(bytes, dtype, device)
            .map_err(|source| WeightsError::Format { path: first, source });
    }
    // SAFETY: candle maps the files read-only; like every mmap-based loader we rely on the checkpoint not being
    // modified while it is in use (the same contract as safetensors/PyTorch).
    let mapped = unsafe { candle_core::safetensors::MmapedSafetensors::multi(files) }
        .map_err(|source| WeightsError::Format { path: first, source })?;
    Ok(match tracked() {
        Some(progress) => VarBuilder::from_backend(
            Box::new(Counted {
                inner: mapped,
                progress,
            }),
            dtype,
            device.clone(),
        ),
        None => VarBuilder::from_backend(Box::new(mapped), dtype, device.clone()),
    })
}

/// The JSON header of a safetensors file (tensor entries and `__metadata__`), read without the tensors.
pub fn read_header(path: &Path) -> Result<serde_json::Map<String, serde_json::Value>, WeightsError> {
    use std::io::Read;
    let format = |message: String| WeightsError::Format {
        path: path.to_path_buf(),
        source: candle_core::Error::Msg(message),
    };
    let mut f = std::fs::File::open(path).map_err(|source| WeightsError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let mut len = [0u8; 8];
    f.read_exact(&mut len)
        .map_err(|_| format("not a safetensors file (shorter than its 8-byte header length)".into()))?;
    let len = u64::from_le_bytes(len);
    if len > 100 << 20 {
        return Err(format(format!("not a safetensors file (header length {len} bytes)")));
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .map_err(|_| format(format!("truncated safetensors header ({len} bytes announced)")))?;
    match serde_json::from_slice(&header) {
        Ok(serde_json::Value::Object(entries)) => Ok(entries),
        Ok(_) => Err(format("safetensors header is not a JSON object".into())),
        Err(e) => Err(format(format!("safetensors header is not JSON: {e}"))),
    }
}

/// Names and shapes of the tensors in `path`, read from the header only.
pub fn tensor_shapes(path: &Path) -> Result<HashMap<String, Vec<usize>>, WeightsError> {
    let mut out = HashMap::new();
    for (name, info) in read_header(path)? {
        if name == "__metadata__" {
            continue;
        }
        let shape = info
            .get("shape")
            .and_then(|s| serde_json::from_value::<Vec<usize>>(s.clone()).ok())
            .ok_or_else(|| WeightsError::Format {
                path: path.to_path_buf(),
                source: candle_core::Error::Msg(format!("tensor `{name}` has no valid shape")),
            })?;
        out.insert(name, shape);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sharded (memory-mapped) weights count each tensor's bytes as it is read, and only while tracked.
    #[test]
    fn mapped_shards_count_the_bytes_of_each_tensor_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let dev = Device::Cpu;
        let shards = [
            dir.path().join("model-1.safetensors"),
            dir.path().join("model-2.safetensors"),
        ];
        let a = Tensor::ones((3, 4), DType::F32, &dev).expect("a");
        let b = Tensor::ones(5, DType::BF16, &dev).expect("b");
        candle_core::safetensors::save(&HashMap::from([("a".to_string(), a)]), &shards[0]).expect("save");
        candle_core::safetensors::save(&HashMap::from([("b".to_string(), b)]), &shards[1]).expect("save");
        let progress = Arc::new(LoadProgress::default());
        track(&progress, || {
            let vb = var_builder(&shards, DType::F32, &dev).expect("mapped");
            vb.get((3, 4), "a").expect("a");
            assert_eq!(progress.snapshot().read, 48);
            vb.get(5, "b").expect("b");
        });
        // bf16 in the file: 2 bytes each, whatever dtype it is read as.
        assert_eq!(progress.snapshot().read, 48 + 10);
        let vb = var_builder(&shards, DType::F32, &dev).expect("mapped");
        vb.get((3, 4), "a").expect("a");
        assert_eq!(progress.snapshot().read, 58, "untracked reads are not counted");
        assert!(weight_bytes(dir.path()) > 58, "the folder's shards, headers included");
    }
}
