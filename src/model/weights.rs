//! Opening safetensors checkpoints as a candle `VarBuilder`, shared by every loader (base, autoencoder, text
//! encoders, eval embedders): small files are read into memory, large or sharded ones memory-mapped, and every
//! error names the file.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;

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
        let bytes = std::fs::read(&first).map_err(|source| WeightsError::Io {
            path: first.clone(),
            source,
        })?;
        return VarBuilder::from_buffered_safetensors(bytes, dtype, device)
            .map_err(|source| WeightsError::Format { path: first, source });
    }
    // SAFETY: candle maps the files read-only; like every mmap-based loader we rely on the checkpoint not being
    // modified while it is in use (the same contract as safetensors/PyTorch).
    unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device) }
        .map_err(|source| WeightsError::Format { path: first, source })
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
