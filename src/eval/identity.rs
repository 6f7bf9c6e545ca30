//! The built-in identity embedder: a fixed, hand-designed descriptor of a subject crop that needs no download.
//!
//! A synthetic identity is (shape, palette, pattern), and scenes change the background, position, scale, mirroring
//! and lighting. The descriptor therefore looks at the **foreground** of a crop (pixels far in colour from the crop's
//! border, which is background in a reference and mostly background in a subject's bounding box) and is built to
//! be invariant to what a scene changes:
//!
//! 1. **Colour** (palette): a 2-D histogram of chromaticity `(r, g) / (r + g + b)` of foreground pixels — invariant
//!    to brightness, nearly so to the generator's ±6 % tint — Hellinger-normalised (square root).
//! 2. **Silhouette** (shape): the foreground weight map cropped to its bounding box, resized to 12 × 12 and made
//!    mirror-symmetric (scenes mirror subjects), mean-removed.
//! 3. **Texture** (pattern): a histogram of luminance-gradient orientations inside the eroded foreground (the
//!    silhouette's own edges excluded), plus the interior edge density.
//!
//! Blocks are L2-normalised and concatenated with weights 1 : 0.7 : 0.5. The validation on synthetic data with
//! known identities (same-identity vs different-identity AUC, reference vs scene crop) is a test here and is
//! reported in `docs/eval.md`.

use image::{GrayImage, RgbImage, imageops};

use super::{EvalError, ImageEmbedder};

/// Name reported with metrics computed from this embedder.
pub const IDENTITY_EMBEDDER: &str = "builtin-identity-v1";

const SIDE: u32 = 32;
const CHROMA_BINS: usize = 8;
const SHAPE_SIDE: usize = 12;
const ORIENT_BINS: usize = 8;
const WEIGHTS: [f32; 3] = [1.0, 0.7, 0.5];

/// The built-in identity embedder (see the module docs).
#[derive(Clone, Copy, Debug, Default)]
pub struct IdentityEmbedder;

impl ImageEmbedder for IdentityEmbedder {
    fn name(&self) -> String {
        IDENTITY_EMBEDDER.to_string()
    }

    fn embed_images(&self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, EvalError> {
        images
            .iter()
            .map(|img| {
                if img.width() == 0 || img.height() == 0 {
                    return Err(EvalError::Invalid("cannot embed an empty image".into()));
                }
                Ok(identity_descriptor(img))
            })
            .collect()
    }
}

/// Dimension of [`identity_descriptor`].
pub const DESCRIPTOR_DIM: usize = CHROMA_BINS * CHROMA_BINS + SHAPE_SIDE * SHAPE_SIDE + ORIENT_BINS + 1;

fn l2_normalise(v: &mut [f32]) {
    let n = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if n > 1e-12 {
        v.iter_mut().for_each(|x| *x /= n);
    }
}

fn median(mut v: Vec<f32>) -> f32 {
    v.sort_by(f32::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// A crop resized to [`SIDE`]² as RGB in `[0, 1]` (row-major), and its foreground weights in `[0, 1]` (colour
/// distance from the border's median colour).
fn foreground(img: &RgbImage) -> (Vec<[f32; 3]>, Vec<f32>) {
    let small = imageops::resize(img, SIDE, SIDE, imageops::FilterType::Triangle);
    let s = SIDE as usize;
    let pixels: Vec<[f32; 3]> = small.pixels().map(|p| p.0.map(|c| f32::from(c) / 255.0)).collect();
    let px = |x: usize, y: usize| pixels[y * s + x];
    // Background colour: per-channel median of the border.
    let border: Vec<[f32; 3]> = (0..s)
        .flat_map(|i| [(i, 0), (i, s - 1), (0, i), (s - 1, i)])
        .map(|(x, y)| px(x, y))
        .collect();
    let bg = [0, 1, 2].map(|c| median(border.iter().map(|p| p[c]).collect()));
    let mut fg = vec![0f32; s * s];
    for y in 0..s {
        for x in 0..s {
            let p = px(x, y);
            let d = ((p[0] - bg[0]).powi(2) + (p[1] - bg[1]).powi(2) + (p[2] - bg[2]).powi(2)).sqrt();
            fg[y * s + x] = ((d - 0.08) / 0.12).clamp(0.0, 1.0);
        }
    }
    (pixels, fg)
}

/// Side of a [`shape_mask`].
pub const SHAPE_MASK_SIDE: usize = 16;

/// The foreground of a crop (as the identity descriptor finds it) in the square around its bounding box, aspect
/// kept, resampled to [`SHAPE_MASK_SIDE`]² (bilinear, 0 outside): the subject's silhouette alone. Unlike the
/// descriptor's silhouette block, which stretches the box to a square and symmetrises it, a disc and a fish stay
/// apart here. All zeros when nothing stands out from the border.
pub fn shape_mask(img: &RgbImage) -> Vec<f32> {
    let n = SHAPE_MASK_SIDE;
    let mut out = vec![0f32; n * n];
    if img.width() == 0 || img.height() == 0 {
        return out;
    }
    let (_, fg) = foreground(img);
    let s = SIDE as usize;
    let on = (0..s * s).filter(|&i| fg[i] > 0.5);
    let (mut x0, mut x1, mut y0, mut y1) = (usize::MAX, 0, usize::MAX, 0);
    for i in on {
        let (x, y) = (i % s, i / s);
        (x0, x1, y0, y1) = (x0.min(x), x1.max(x), y0.min(y), y1.max(y));
    }
    if x0 > x1 {
        return out;
    }
    let side = ((x1 - x0).max(y1 - y0) + 1) as f32;
    let (cx, cy) = ((x0 + x1 + 1) as f32 / 2.0, (y0 + y1 + 1) as f32 / 2.0);
    let at = |x: isize, y: isize| -> f32 {
        if x < 0 || y < 0 || x >= s as isize || y >= s as isize {
            0.0
        } else {
            fg[y as usize * s + x as usize]
        }
    };
    for v in 0..n {
        for u in 0..n {
            // Pixel-centre coordinates of this cell's centre in the 32 × 32 crop.
            let x = cx - side / 2.0 + (u as f32 + 0.5) * side / n as f32 - 0.5;
            let y = cy - side / 2.0 + (v as f32 + 0.5) * side / n as f32 - 0.5;
            let (xf, yf) = (x.floor(), y.floor());
            let (fx, fy) = (x - xf, y - yf);
            let (xi, yi) = (xf as isize, yf as isize);
            out[v * n + u] = at(xi, yi) * (1.0 - fx) * (1.0 - fy)
                + at(xi + 1, yi) * fx * (1.0 - fy)
                + at(xi, yi + 1) * (1.0 - fx) * fy
                + at(xi + 1, yi + 1) * fx * fy;
        }
    }
    out
}

/// How alike two [`shape_mask`]s are: the cosine of the masks, the better of `b` as it is and mirrored left–right
/// (scenes mirror subjects). 1 for the same silhouette at any size and place; 0 when either is empty.
pub fn shape_similarity(a: &[f32], b: &[f32]) -> f32 {
    let n = SHAPE_MASK_SIDE;
    if a.len() != n * n || b.len() != n * n {
        return 0.0;
    }
    let mirrored: Vec<f32> = (0..n * n).map(|i| b[(i / n) * n + n - 1 - i % n]).collect();
    super::metrics::cosine(a, b).max(super::metrics::cosine(a, &mirrored))
}

/// The descriptor of one crop (unit norm, [`DESCRIPTOR_DIM`] values).
pub fn identity_descriptor(img: &RgbImage) -> Vec<f32> {
    let (pixels, fg) = foreground(img);
    let s = SIDE as usize;
    let px = |x: usize, y: usize| pixels[y * s + x];

    // 1. Chromaticity histogram of the foreground.
    let mut colour = vec![0f32; CHROMA_BINS * CHROMA_BINS];
    for y in 0..s {
        for x in 0..s {
            let w = fg[y * s + x];
            if w <= 0.0 {
                continue;
            }
            let p = px(x, y);
            let sum = p[0] + p[1] + p[2] + 1e-3;
            let bin = |v: f32| ((v / sum * CHROMA_BINS as f32) as usize).min(CHROMA_BINS - 1);
            colour[bin(p[0]) * CHROMA_BINS + bin(p[1])] += w;
        }
    }
    colour.iter_mut().for_each(|v| *v = v.sqrt());
    l2_normalise(&mut colour);

    // 2. Silhouette in its bounding box, mirror-symmetrised.
    let mut shape = vec![0f32; SHAPE_SIDE * SHAPE_SIDE];
    let on: Vec<(usize, usize)> = (0..s * s).filter(|&i| fg[i] > 0.5).map(|i| (i % s, i / s)).collect();
    if let (Some(x0), Some(x1), Some(y0), Some(y1)) = (
        on.iter().map(|p| p.0).min(),
        on.iter().map(|p| p.0).max(),
        on.iter().map(|p| p.1).min(),
        on.iter().map(|p| p.1).max(),
    ) {
        let mask = GrayImage::from_fn((x1 - x0 + 1) as u32, (y1 - y0 + 1) as u32, |x, y| {
            image::Luma([(fg[(y as usize + y0) * s + x as usize + x0] * 255.0) as u8])
        });
        let m = imageops::resize(
            &mask,
            SHAPE_SIDE as u32,
            SHAPE_SIDE as u32,
            imageops::FilterType::Triangle,
        );
        for y in 0..SHAPE_SIDE {
            for x in 0..SHAPE_SIDE {
                let a = f32::from(m.get_pixel(x as u32, y as u32).0[0]);
                let b = f32::from(m.get_pixel((SHAPE_SIDE - 1 - x) as u32, y as u32).0[0]);
                shape[y * SHAPE_SIDE + x] = (a + b) / 510.0;
            }
        }
        let mean = shape.iter().sum::<f32>() / shape.len() as f32;
        shape.iter_mut().for_each(|v| *v -= mean);
        l2_normalise(&mut shape);
    }

    // 3. Interior texture: gradient orientations inside the eroded foreground.
    let lum: Vec<f32> = (0..s * s)
        .map(|i| {
            let p = px(i % s, i / s);
            0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2]
        })
        .collect();
    let mut texture = vec![0f32; ORIENT_BINS + 1];
    let mut interior = 0f32;
    for y in 1..s - 1 {
        for x in 1..s - 1 {
            let i = y * s + x;
            let w = [i, i - 1, i + 1, i - s, i + s]
                .iter()
                .map(|&j| fg[j])
                .fold(1f32, f32::min);
            if w <= 0.0 {
                continue;
            }
            interior += w;
            let gx = lum[i + 1] - lum[i - 1];
            let gy = lum[i + s] - lum[i - s];
            let mag = (gx * gx + gy * gy).sqrt();
            // Orientation modulo π, mirrored (|angle|) because scenes mirror subjects.
            let angle = gy.atan2(gx).rem_euclid(std::f32::consts::PI);
            let folded = angle.min(std::f32::consts::PI - angle);
            let bin = ((folded / std::f32::consts::FRAC_PI_2 * ORIENT_BINS as f32) as usize).min(ORIENT_BINS - 1);
            texture[bin] += w * mag;
        }
    }
    let energy: f32 = texture[..ORIENT_BINS].iter().sum();
    texture[ORIENT_BINS] = if interior > 0.0 { energy / interior * 4.0 } else { 0.0 };
    l2_normalise(&mut texture[..ORIENT_BINS]);

    let mut out = Vec::with_capacity(DESCRIPTOR_DIM);
    for (block, w) in [colour, shape, texture].into_iter().zip(WEIGHTS) {
        out.extend(block.into_iter().map(|v| v * w));
    }
    l2_normalise(&mut out);
    out
}

/// The bounding box `(x0, y0, x1, y1)` (inclusive) of a binary mask's foreground, grown by `pad` pixels and clipped
/// to the image; `None` for an empty mask.
pub fn mask_bbox(mask: &GrayImage, pad: u32) -> Option<(u32, u32, u32, u32)> {
    let (w, h) = mask.dimensions();
    let mut bbox: Option<(u32, u32, u32, u32)> = None;
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] >= 128 {
            bbox = Some(match bbox {
                None => (x, y, x, y),
                Some((a, b, c, d)) => (a.min(x), b.min(y), c.max(x), d.max(y)),
            });
        }
    }
    bbox.map(|(x0, y0, x1, y1)| {
        (
            x0.saturating_sub(pad),
            y0.saturating_sub(pad),
            (x1 + pad).min(w - 1),
            (y1 + pad).min(h - 1),
        )
    })
}

/// The crop of `image` inside `mask`'s bounding box (grown by `pad`); the whole image for an empty mask.
pub fn subject_crop(image: &RgbImage, mask: &GrayImage, pad: u32) -> RgbImage {
    match mask_bbox(mask, pad) {
        Some((x0, y0, x1, y1)) if mask.dimensions() == image.dimensions() => {
            imageops::crop_imm(image, x0, y0, x1 - x0 + 1, y1 - y0 + 1).to_image()
        }
        _ => image.clone(),
    }
}

/// Where subjects are in a generated image: square windows of the sides asked for (in steps of 1/16 of the image,
/// strides of 1/6 of the window, at least 2 px) and their descriptors, from which [`WindowSearch::detect`] picks
/// the windows most like any of a set of queries.
///
/// This is how the benchmark finds subjects in an image sampled from noise: nothing tells the generator *where*
/// a subject goes (prompts name no positions), so the ideal target's box is usually background. Queried with the
/// whole gallery of identities, the detection is identity-agnostic, and genuine and impostor references are then
/// scored against the same detections — the detect-then-score of multi-subject papers (Grounding-DINO crops, then
/// DINO).
#[derive(Clone, Debug)]
pub struct WindowSearch {
    /// Windows `[x0, y0, side]`.
    pub windows: Vec<[u32; 3]>,
    descriptors: Vec<Vec<f32>>,
}

impl WindowSearch {
    /// The windows of `image` with sides from `sides.0` to `sides.1` times its shorter side (the subjects' expected
    /// size: the benchmark asks for the generator's range for the prompt's number of subjects), and their
    /// descriptors (computed in parallel).
    pub fn new(image: &RgbImage, sides: (f64, f64)) -> Self {
        use rayon::prelude::*;
        let (w, h) = image.dimensions();
        let short = w.min(h);
        let px = |f: f64| {
            if f.is_finite() {
                (f64::from(short) * f).round().max(1.0) as u32
            } else {
                1
            }
        };
        let lo = px(sides.0).min(short.max(1));
        let hi = px(sides.1).clamp(lo, short.max(1));
        let step = (short / 16).max(1);
        let mut windows = Vec::new();
        let mut side = lo;
        while side <= hi && short > 0 {
            let stride = (side / 6).max(2);
            let last = |extent: u32| extent - side;
            let mut y = 0;
            loop {
                let mut x = 0;
                loop {
                    windows.push([x, y, side]);
                    if x == last(w) {
                        break;
                    }
                    x = (x + stride).min(last(w));
                }
                if y == last(h) {
                    break;
                }
                y = (y + stride).min(last(h));
            }
            side += step;
        }
        let descriptors = windows
            .par_iter()
            .map(|&[x, y, s]| identity_descriptor(&imageops::crop_imm(image, x, y, s, s).to_image()))
            .collect();
        Self { windows, descriptors }
    }

    /// Up to `n` detections: the windows most like *any* of `queries` (each window's score is its best cosine to
    /// one of them), greedily, skipping a window that overlaps one already taken by more than `max_iou`
    /// (non-maximum suppression). Identity-agnostic when `queries` is a whole gallery.
    pub fn detect(&self, queries: &[&[f32]], n: usize, max_iou: f64) -> Vec<usize> {
        let mut order: Vec<(f32, usize)> = self
            .descriptors
            .iter()
            .enumerate()
            .map(|(i, d)| {
                let s = queries
                    .iter()
                    .map(|q| super::metrics::cosine(q, d))
                    .fold(f32::NEG_INFINITY, f32::max);
                (s, i)
            })
            .collect();
        order.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
        let mut taken: Vec<usize> = Vec::new();
        for (_, i) in order {
            if taken.len() >= n {
                break;
            }
            if taken.iter().all(|&t| iou(self.windows[t], self.windows[i]) <= max_iou) {
                taken.push(i);
            }
        }
        taken
    }

    /// The descriptor of window `i`.
    pub fn descriptor(&self, i: usize) -> Option<&[f32]> {
        self.descriptors.get(i).map(Vec::as_slice)
    }
}

/// Intersection over union of two square windows `[x0, y0, side]`.
fn iou(a: [u32; 3], b: [u32; 3]) -> f64 {
    let overlap = |a0: u32, b0: u32, a1: u32, b1: u32| f64::from(a1.min(b1).saturating_sub(a0.max(b0)));
    let inter = overlap(a[0], b[0], a[0] + a[2], b[0] + b[2]) * overlap(a[1], b[1], a[1] + a[2], b[1] + b[2]);
    let union = f64::from(a[2]).powi(2) + f64::from(b[2]).powi(2) - inter;
    if union > 0.0 { inter / union } else { 0.0 }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dip::synth::{NegativeSource, SubjectCount, SynthConfig, synthesize};
    use crate::eval::metrics::{cosine, roc_auc};

    /// A grey canvas with the pixels where `inside(x, y)` red.
    fn canvas(side: u32, inside: impl Fn(f32, f32) -> bool) -> RgbImage {
        RgbImage::from_fn(side, side, |x, y| {
            if inside(x as f32 + 0.5, y as f32 + 0.5) {
                image::Rgb([220, 30, 30])
            } else {
                image::Rgb([128, 128, 128])
            }
        })
    }

    #[test]
    fn shape_masks_keep_aspect_and_ignore_size_place_and_mirroring() {
        // A 2:1 bar: its mask fills the middle half of the rows, all columns.
        let bar = shape_mask(&canvas(32, |x, y| {
            (8.0..24.0).contains(&x) && (12.0..20.0).contains(&y)
        }));
        let n = SHAPE_MASK_SIDE;
        let rows: Vec<f32> = (0..n)
            .map(|v| bar[v * n..(v + 1) * n].iter().sum::<f32>() / n as f32)
            .collect();
        assert!(rows[..3].iter().chain(&rows[13..]).all(|&r| r < 0.01), "{rows:?}");
        assert!(rows[5..11].iter().all(|&r| r > 0.99), "{rows:?}");
        // A right triangle, smaller, elsewhere and mirrored, is the same silhouette; a disc is not.
        let tri = |x0: f32, s: f32, flip: bool| {
            canvas(64, move |x, y| {
                let (u, v) = ((x - x0) / s, (y - 10.0) / s);
                let u = if flip { 1.0 - u } else { u };
                (0.0..1.0).contains(&u) && (0.0..1.0).contains(&v) && u < v
            })
        };
        let a = shape_mask(&tri(8.0, 40.0, false));
        let b = shape_mask(&tri(30.0, 20.0, true));
        let disc = shape_mask(&canvas(64, |x, y| (x - 32.0).powi(2) + (y - 32.0).powi(2) < 300.0));
        assert!(shape_similarity(&a, &b) > 0.97, "{}", shape_similarity(&a, &b));
        assert!(shape_similarity(&a, &disc) < 0.85, "{}", shape_similarity(&a, &disc));
        // Nothing in the crop: an empty mask, similar to nothing.
        let empty = shape_mask(&canvas(32, |_, _| false));
        assert!(empty.iter().all(|&v| v == 0.0));
        assert_eq!(shape_similarity(&a, &empty), 0.0);
        assert_eq!(shape_similarity(&a, &a[..10]), 0.0);
    }

    #[test]
    fn descriptor_is_unit_norm_and_deterministic() {
        let img = RgbImage::from_fn(40, 40, |x, y| image::Rgb([(x * 6) as u8, (y * 6) as u8, 90]));
        let a = identity_descriptor(&img);
        assert_eq!(a.len(), DESCRIPTOR_DIM);
        assert!((a.iter().map(|v| v * v).sum::<f32>() - 1.0).abs() < 1e-4);
        assert_eq!(a, identity_descriptor(&img));
        // A flat image has no foreground: still a finite vector.
        let flat = identity_descriptor(&RgbImage::from_pixel(8, 8, image::Rgb([10, 10, 10])));
        assert!(flat.iter().all(|v| v.is_finite()));
        assert!(IdentityEmbedder.embed_images(&[RgbImage::new(0, 0)]).is_err());
    }

    #[test]
    fn mask_crops_follow_the_bounding_box() {
        let mut mask = GrayImage::new(10, 10);
        mask.put_pixel(3, 4, image::Luma([255]));
        mask.put_pixel(6, 5, image::Luma([255]));
        assert_eq!(mask_bbox(&mask, 0), Some((3, 4, 6, 5)));
        assert_eq!(mask_bbox(&mask, 5), Some((0, 0, 9, 9)));
        assert_eq!(mask_bbox(&GrayImage::new(4, 4), 1), None);
        let img = RgbImage::new(10, 10);
        assert_eq!(subject_crop(&img, &mask, 1).dimensions(), (6, 4));
    }

    #[test]
    fn window_overlap() {
        assert_eq!(iou([0, 0, 10], [0, 0, 10]), 1.0);
        assert_eq!(iou([0, 0, 10], [10, 0, 10]), 0.0);
        assert!((iou([0, 0, 10], [5, 0, 10]) - 50.0 / 150.0).abs() < 1e-12);
    }

    /// A subject drawn at a known place on a scene's background is detected there, and the detection is like its
    /// own reference.
    #[test]
    fn detection_finds_a_placed_subject() {
        use crate::dip::synth::{PlacedSubject, Scene, render_scene};
        let items = synthesize(&SynthConfig {
            items: 6,
            subjects: SubjectCount::One,
            size_px: 64,
            seed: 77,
            negatives: NegativeSource::Perturbed,
        })
        .expect("synthesise");
        let refs: Vec<Vec<f32>> = items.iter().map(|i| identity_descriptor(&i.references[0])).collect();
        let queries: Vec<&[f32]> = refs.iter().map(Vec::as_slice).collect();
        for (k, item) in items.iter().enumerate() {
            let mut scene = Scene::from_meta(&item.record.meta).expect("scene");
            scene.subjects[0] = PlacedSubject {
                centre: [0.3, 0.7],
                scale: 0.4,
                ..scene.subjects[0]
            };
            let image = render_scene(&scene, 64).0;
            let search = WindowSearch::new(&image, (0.3, 0.5));
            let found = search.detect(&queries, 1, 0.3);
            let [x, y, side] = search.windows[found[0]];
            let truth = scene.subjects[0].bbox_px(64);
            let centre = |a: u32, b: u32| f64::from(a + b) / 2.0;
            let (cx, cy) = (centre(x, x + side), centre(y, y + side));
            assert!(
                (cx - centre(truth[0], truth[2])).abs() < 5.0 && (cy - centre(truth[1], truth[3])).abs() < 5.0,
                "item {k}: window {:?} for subject box {truth:?}",
                search.windows[found[0]]
            );
            let own = cosine(&refs[k], search.descriptor(found[0]).expect("detected window"));
            assert!(own > 0.8, "item {k}: {own}");
        }
        assert!(
            WindowSearch::new(&RgbImage::new(0, 0), (0.2, 0.5))
                .detect(&queries, 1, 0.3)
                .is_empty()
        );
    }

    /// Same-identity (reference vs that subject's crop in a new scene) vs different-identity pairs: AUC ≥ 0.95 on
    /// 150 synthetic single-subject items (the number is reported in docs/eval.md).
    #[test]
    fn separates_identities_on_synthetic_scenes() {
        let items = synthesize(&SynthConfig {
            items: 150,
            subjects: SubjectCount::One,
            size_px: 64,
            seed: 12_345,
            negatives: NegativeSource::Perturbed,
        })
        .expect("synthesise");
        let key = |i: usize| {
            items[i].record.meta["subjects"][0]["key"]
                .as_str()
                .unwrap_or("")
                .to_string()
        };
        let refs: Vec<Vec<f32>> = items.iter().map(|i| identity_descriptor(&i.references[0])).collect();
        let crops: Vec<Vec<f32>> = items
            .iter()
            .map(|i| identity_descriptor(&subject_crop(&i.winner, &i.masks[0], 1)))
            .collect();
        let (mut genuine, mut impostor) = (Vec::new(), Vec::new());
        for (i, r) in refs.iter().enumerate() {
            for (j, c) in crops.iter().enumerate() {
                let s = cosine(r, c);
                if key(i) == key(j) {
                    genuine.push(s);
                } else {
                    impostor.push(s);
                }
            }
        }
        let auc = roc_auc(&genuine, &impostor).expect("both sets non-empty");
        eprintln!(
            "built-in identity embedder: AUC {auc:.4} over {} genuine / {} impostor pairs",
            genuine.len(),
            impostor.len()
        );
        assert!(auc >= 0.95, "identity AUC {auc:.4}");
    }
}
