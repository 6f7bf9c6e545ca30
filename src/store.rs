//! Writing results to disk: atomic file replacement, safetensors of grids, PNG views of grids.

use std::collections::HashMap;
use std::fs::File;
use std::io::Write;
use std::path::Path;

use image::{GrayImage, RgbImage};
use safetensors::{Dtype, tensor::TensorView};

use crate::masks::Grid;

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, `fsync`, then `rename`, so a reader
/// sees either the old file or the complete new one, never a torn write.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(dir)?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let result = (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // Persist the rename itself; not every platform can open a directory, so this is best effort.
        if let Ok(d) = File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// A named `f32` tensor to export: a grid (shape `[H, W]`) or a scalar (shape `[1]`).
pub enum NamedTensor<'a> {
    /// A 2-D grid.
    Grid(String, &'a Grid),
    /// A scalar.
    Scalar(String, f32),
}

/// Serialises grids and scalars as a safetensors file (little-endian `f32`), with string metadata.
pub fn safetensors_bytes(
    tensors: &[NamedTensor<'_>],
    metadata: HashMap<String, String>,
) -> Result<Vec<u8>, safetensors::SafeTensorError> {
    let owned: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|t| match t {
            NamedTensor::Grid(name, g) => (name.clone(), vec![g.height(), g.width()], f32_bytes(g.as_slice())),
            NamedTensor::Scalar(name, v) => (name.clone(), vec![1], f32_bytes(&[*v])),
        })
        .collect();
    let views = owned
        .iter()
        .map(|(name, shape, data)| Ok((name.clone(), TensorView::new(Dtype::F32, shape.clone(), data)?)))
        .collect::<Result<Vec<_>, safetensors::SafeTensorError>>()?;
    safetensors::serialize(views, Some(metadata))
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// A grid as an 8-bit grey image, each cell `stride × stride` pixels, values mapped linearly from `[lo, hi]`.
pub fn grid_to_grey(grid: &Grid, stride: usize, lo: f32, hi: f32) -> GrayImage {
    let up = grid.upsample_nearest(stride);
    let span = if hi > lo { hi - lo } else { 1.0 };
    let pixels = up
        .as_slice()
        .iter()
        .map(|&v| (((v - lo) / span).clamp(0.0, 1.0) * 255.0).round() as u8)
        .collect();
    GrayImage::from_raw(up.width() as u32, up.height() as u32, pixels).unwrap_or_default()
}

/// The image with `weights` (in `[0, 1]`, one per token of `stride` pixels) as a red heat overlay.
pub fn overlay_red(image: &RgbImage, weights: &Grid, stride: usize, opacity: f32) -> RgbImage {
    let mut out = image.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        let w = weights
            .get(y as usize / stride.max(1), x as usize / stride.max(1))
            .unwrap_or(0.0)
            .clamp(0.0, 1.0)
            * opacity;
        let [r, g, b] = p.0;
        let mix = |c: u8, target: f32| (f32::from(c) * (1.0 - w) + target * w).round() as u8;
        p.0 = [mix(r, 255.0), mix(g, 32.0), mix(b, 32.0)];
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_temp() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/x.bin");
        write_atomic(&p, b"one").unwrap();
        write_atomic(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(p.parent().unwrap())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[test]
    fn safetensors_round_trip() {
        let g = Grid::new(2, 3, vec![0.0, 0.5, 1.0, 2.0, 3.0, 4.0]).unwrap();
        let meta = HashMap::from([("tau".to_string(), "0.1".to_string())]);
        let bytes = safetensors_bytes(
            &[NamedTensor::Grid("m".into(), &g), NamedTensor::Scalar("a".into(), 0.25)],
            meta,
        )
        .unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let m = st.tensor("m").unwrap();
        assert_eq!(m.shape(), &[2, 3]);
        let vals: Vec<f32> = m
            .data()
            .chunks(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        assert_eq!(vals, g.as_slice());
        assert_eq!(st.tensor("a").unwrap().data(), &0.25f32.to_le_bytes());
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(header.metadata().as_ref().unwrap()["tau"], "0.1");
    }

    #[test]
    fn grey_view_scales_and_upsamples() {
        let g = Grid::new(1, 2, vec![0.0, 1.0]).unwrap();
        let img = grid_to_grey(&g, 2, 0.0, 1.0);
        assert_eq!(img.dimensions(), (4, 2));
        assert_eq!(img.as_raw(), &[0, 0, 255, 255, 0, 0, 255, 255]);
    }
}
