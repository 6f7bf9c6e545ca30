//! Per-item generation: identities, layout, background, lighting, negatives, prompt and metadata.

use std::collections::HashSet;

use image::{GrayImage, RgbImage};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde_json::{Value, json};

use super::identity::{Identity, Palette, Pattern, Shape};
use super::scene::{
    Background, Layers, Lighting, PlacedSubject, Scene, composite, finish, quantize, render_background,
    render_reference,
};
use super::{GENERATOR, GENERATOR_VERSION, NegativeSource, SubjectCount, SynthConfig, SynthItem, splitmix64};
use crate::dip::{Category, ItemRecord};

/// Layout attempts before falling back to a row layout.
const MAX_LAYOUTS: usize = 24;
/// Position draws per subject within one layout attempt.
const MAX_POSITION_TRIES: usize = 40;
/// Smallest acceptable mask, in pixels.
const MIN_MASK_PX: usize = 8;
/// A subject may lose at most this fraction of its silhouette to occlusion.
const MAX_OCCLUDED: f64 = 0.4;
/// A pixel counts as visibly changed when its channels differ by at least this much in total.
const VISIBLE_DIFF: u32 = 30;

/// The RNG of item `index`: depends on `(seed, index)` only, not on the number of items.
fn item_rng(seed: u64, index: usize) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(splitmix64(seed ^ splitmix64(index as u64 ^ 0x5EED_D1B5_0000_0000)))
}

fn uniform(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

/// `uniform`, rounded to 4 decimals (keeps the stored scene short and exactly round-trippable).
fn uniform4(rng: &mut ChaCha8Rng, lo: f64, hi: f64) -> f64 {
    round4(uniform(rng, lo, hi))
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

fn below(rng: &mut ChaCha8Rng, n: usize) -> usize {
    if n <= 1 { 0 } else { rng.random_range(0..n) }
}

fn choose<T: Copy>(rng: &mut ChaCha8Rng, items: &[T], fallback: T) -> T {
    let i = below(rng, items.len());
    items.get(i).copied().unwrap_or(fallback)
}

/// Generates item `index` of `cfg` (the config must have been validated).
pub(super) fn item(cfg: &SynthConfig, index: usize) -> SynthItem {
    let mut rng = item_rng(cfg.seed, index);
    let size = cfg.size_px;
    let n = match cfg.subjects {
        SubjectCount::One => 1,
        SubjectCount::Two => 2,
        SubjectCount::Three => 3,
        SubjectCount::Mixed => match rng.random::<f64>() {
            x if x < 0.4 => 1,
            x if x < 0.75 => 2,
            _ => 3,
        },
    };
    let identities = pick_identities(&mut rng, n);
    let background = random_background(&mut rng);
    let lighting = random_lighting(&mut rng);
    let bg = render_background(&background, size);
    let (subjects, layers) = place(&mut rng, &identities, &bg, size);
    let scene = Scene {
        background,
        lighting,
        subjects,
    };
    let winner = finish(&layers.colour, &scene.lighting, size);
    let masks: Vec<GrayImage> = (0..n).map(|j| layers.mask(j, size)).collect();
    let (loser, negative) = match cfg.negatives {
        NegativeSource::Perturbed => perturb(&mut rng, &scene, &bg, &layers, &winner, size),
        NegativeSource::OtherSubject => replace(&mut rng, &scene, &bg, &layers, &winner, size),
        NegativeSource::Augmented => augment(&mut rng, &winner),
    };
    let references: Vec<RgbImage> = scene
        .subjects
        .iter()
        .map(|s| render_reference(&s.identity, size))
        .collect();

    let id = format!("synth-{index:04}");
    let category = scene
        .subjects
        .first()
        .map(|s| s.identity.category())
        .filter(|c| scene.subjects.iter().all(|s| s.identity.category() == *c));
    let subjects_meta: Vec<Value> = scene
        .subjects
        .iter()
        .zip(&masks)
        .map(|(s, mask)| subject_meta(s, mask))
        .collect();
    let meta = json!({
        "generator": GENERATOR,
        "version": GENERATOR_VERSION,
        "seed": cfg.seed,
        "index": index,
        "size_px": size,
        "subjects": subjects_meta,
        "background": scene.background.kind(),
        "lighting": { "brightness": scene.lighting.brightness, "tint": scene.lighting.tint },
        "negative": negative,
        "scene": serde_json::to_value(&scene).unwrap_or(Value::Null),
    });
    let record = ItemRecord {
        prompt: scene.prompt(),
        references: (0..n).map(|j| format!("refs/{id}_{j}.png")).collect(),
        winner: format!("winner/{id}.png"),
        loser: format!("loser/{id}.png"),
        masks: (0..n).map(|j| format!("masks/{id}_{j}.png")).collect(),
        category,
        meta,
        id,
    };
    SynthItem {
        record,
        references,
        winner,
        loser,
        masks,
    }
}

fn identity_meta(identity: &Identity) -> Value {
    json!({
        "identity": identity.id(),
        "key": identity.key(),
        "shape": identity.shape.key(),
        "palette": identity.palette.key(),
        "pattern": identity.pattern.key(),
        "category": identity.category().as_str(),
        "description": identity.describe(),
    })
}

fn subject_meta(s: &PlacedSubject, mask: &GrayImage) -> Value {
    let mut bbox = [u32::MAX, u32::MAX, 0, 0];
    let mut pixels = 0usize;
    for (x, y, p) in mask.enumerate_pixels() {
        if p.0[0] != 0 {
            pixels += 1;
            bbox = [bbox[0].min(x), bbox[1].min(y), bbox[2].max(x + 1), bbox[3].max(y + 1)];
        }
    }
    let mut meta = identity_meta(&s.identity);
    if let Value::Object(m) = &mut meta {
        m.insert("centre".into(), json!(s.centre));
        m.insert("scale".into(), json!(s.scale));
        m.insert("mirror".into(), json!(s.mirror));
        m.insert("mask_bbox".into(), json!(bbox));
        m.insert("mask_pixels".into(), json!(pixels));
    }
    meta
}

/// `n` identities with pairwise different shapes and palettes. With one subject, or half of the time, all share a
/// category.
fn pick_identities(rng: &mut ChaCha8Rng, n: usize) -> Vec<Identity> {
    let same_category = n == 1 || rng.random_bool(0.5);
    let first = choose(rng, &Category::ALL, Category::Object);
    let mut out: Vec<Identity> = Vec::with_capacity(n);
    for j in 0..n {
        let category = if same_category || j == 0 {
            first
        } else {
            choose(rng, &Category::ALL, first)
        };
        let shapes = Shape::of_category(category);
        let mut pick = None;
        for _ in 0..64 {
            let candidate = Identity {
                shape: choose(rng, &shapes, Shape::Circle),
                palette: choose(rng, &Palette::ALL, Palette::RedGold),
                pattern: choose(rng, &Pattern::ALL, Pattern::Solid),
            };
            if out
                .iter()
                .all(|o| o.shape != candidate.shape && o.palette != candidate.palette)
            {
                pick = Some(candidate);
                break;
            }
        }
        // Practically unreachable (every category has ≥ 3 shapes); keep the identities distinct anyway.
        let pick = pick.unwrap_or_else(|| {
            Identity::all()
                .into_iter()
                .find(|c| out.iter().all(|o| o.shape != c.shape && o.palette != c.palette))
                .unwrap_or(Identity {
                    shape: Shape::Circle,
                    palette: Palette::RedGold,
                    pattern: Pattern::Solid,
                })
        });
        out.push(pick);
    }
    out
}

/// sRGB from hue (degrees), saturation and lightness.
fn hsl(h: f64, s: f64, l: f64) -> [u8; 3] {
    let (s, l) = (s.clamp(0.0, 1.0), l.clamp(0.0, 1.0));
    let c = (1.0 - (2.0 * l - 1.0).abs()) * s;
    let hp = h.rem_euclid(360.0) / 60.0;
    let x = c * (1.0 - (hp.rem_euclid(2.0) - 1.0).abs());
    let (r, g, b) = match hp as u32 {
        0 => (c, x, 0.0),
        1 => (x, c, 0.0),
        2 => (0.0, c, x),
        3 => (0.0, x, c),
        4 => (x, 0.0, c),
        _ => (c, 0.0, x),
    };
    let m = l - c / 2.0;
    [r, g, b].map(|v| quantize(((v + m) * 255.0) as f32))
}

fn random_background(rng: &mut ChaCha8Rng) -> Background {
    let h = uniform(rng, 0.0, 360.0);
    let s = uniform(rng, 0.25, 0.65);
    let l = uniform(rng, 0.35, 0.78);
    let base = hsl(h, s, l);
    // A lighter or darker companion of similar hue, for low-contrast textures.
    let companion = |rng: &mut ChaCha8Rng, hue_spread: f64, dl: (f64, f64)| {
        let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
        let dl = uniform(rng, dl.0, dl.1);
        let l2 = if (0.2..=0.88).contains(&(l + sign * dl)) {
            l + sign * dl
        } else {
            l - sign * dl
        };
        hsl(
            h + uniform(rng, -hue_spread, hue_spread),
            s * uniform(rng, 0.8, 1.2),
            l2,
        )
    };
    match below(rng, 6) {
        0 => {
            let to = hsl(
                h + uniform(rng, 50.0, 160.0),
                uniform(rng, 0.25, 0.65),
                uniform(rng, 0.35, 0.78),
            );
            Background::Gradient {
                from: base,
                to,
                angle_deg: uniform4(rng, 0.0, 360.0),
            }
        }
        1 => {
            let inner = hsl(h, s * 0.8, (l + 0.25).min(0.92));
            let outer = hsl(h + uniform(rng, -40.0, 40.0), s, uniform(rng, 0.22, 0.5));
            Background::Radial {
                inner,
                outer,
                centre: [uniform4(rng, 0.2, 0.8), uniform4(rng, 0.2, 0.8)],
                radius: uniform4(rng, 0.5, 0.95),
            }
        }
        2 => {
            let sky = hsl(
                uniform(rng, 170.0, 235.0),
                uniform(rng, 0.3, 0.7),
                uniform(rng, 0.6, 0.85),
            );
            let ground = hsl(
                uniform(rng, 20.0, 140.0),
                uniform(rng, 0.25, 0.6),
                uniform(rng, 0.3, 0.55),
            );
            Background::Horizon {
                sky,
                ground,
                horizon: uniform4(rng, 0.35, 0.7),
            }
        }
        3 => {
            let accent = companion(rng, 30.0, (0.15, 0.28));
            Background::Noise {
                base,
                accent,
                cell: uniform4(rng, 0.08, 0.25),
                seed: rng.random::<u32>(),
            }
        }
        4 => {
            let b = companion(rng, 60.0, (0.1, 0.22));
            Background::Stripes {
                a: base,
                b,
                angle_deg: uniform4(rng, 0.0, 180.0),
                period: uniform4(rng, 0.12, 0.3),
            }
        }
        _ => {
            let b = companion(rng, 15.0, (0.1, 0.2));
            Background::Tiles {
                a: base,
                b,
                cell: uniform4(rng, 0.1, 0.25),
            }
        }
    }
}

fn random_lighting(rng: &mut ChaCha8Rng) -> Lighting {
    let warmth = uniform(rng, -0.14, 0.14);
    Lighting {
        brightness: uniform4(rng, 0.82, 1.14),
        tint: [
            round4(1.0 + warmth / 2.0),
            uniform4(rng, 0.97, 1.03),
            round4(1.0 - warmth / 2.0),
        ],
    }
}

/// Range of subject scales (bounding-square side as a fraction of the image side) for `n` subjects at `size`
/// pixels (at least 10 px per subject, and a row of `n` must fit).
pub fn scale_range(n: usize, size: u32) -> (f64, f64) {
    let (lo, hi): (f64, f64) = match n {
        0 | 1 => (0.25, 0.55),
        2 => (0.22, 0.4),
        _ => (0.18, 0.32),
    };
    let lo = f64::max(lo, 10.0 / f64::from(size.max(1))).min(0.9 / n.max(1) as f64);
    (lo, hi.max(lo))
}

/// Random non-overlapping-ish placement; re-sampled until every mask is large enough and not mostly occluded.
fn place(rng: &mut ChaCha8Rng, identities: &[Identity], bg: &[[f32; 3]], size: u32) -> (Vec<PlacedSubject>, Layers) {
    let (lo, hi) = scale_range(identities.len(), size);
    let acceptable = |layers: &Layers| {
        layers.full_area.iter().enumerate().all(|(j, &full)| {
            let area = layers.area(j);
            area >= MIN_MASK_PX && area as f64 >= (1.0 - MAX_OCCLUDED) * full as f64
        })
    };
    for _ in 0..MAX_LAYOUTS {
        let mut subjects: Vec<PlacedSubject> = Vec::with_capacity(identities.len());
        for identity in identities {
            let scale = uniform4(rng, lo, hi);
            let mut centre = [0.5, 0.5];
            for _ in 0..MAX_POSITION_TRIES {
                centre = [
                    uniform4(rng, scale / 2.0, 1.0 - scale / 2.0),
                    uniform4(rng, scale / 2.0, 1.0 - scale / 2.0),
                ];
                let clear = subjects.iter().all(|o| {
                    let (dx, dy) = (o.centre[0] - centre[0], o.centre[1] - centre[1]);
                    (dx * dx + dy * dy).sqrt() >= 0.44 * (o.scale + scale)
                });
                if clear {
                    break;
                }
            }
            subjects.push(PlacedSubject {
                identity: *identity,
                centre,
                scale,
                mirror: rng.random_bool(0.5),
            });
        }
        let layers = composite(bg, &subjects, size);
        if acceptable(&layers) {
            return (subjects, layers);
        }
    }
    // Fallback: a row of equal, disjoint bounding squares.
    let n = identities.len().max(1) as f64;
    let subjects: Vec<PlacedSubject> = identities
        .iter()
        .enumerate()
        .map(|(j, identity)| PlacedSubject {
            identity: *identity,
            centre: [round4((j as f64 + 0.5) / n), 0.5],
            scale: round4(lo),
            mirror: false,
        })
        .collect();
    let layers = composite(bg, &subjects, size);
    (subjects, layers)
}

/// A non-empty random subset of `0..n`, in increasing order.
fn pick_subjects(rng: &mut ChaCha8Rng, n: usize) -> Vec<usize> {
    let mut chosen: Vec<usize> = (0..n).filter(|_| rng.random_bool(0.5)).collect();
    if chosen.is_empty() && n > 0 {
        chosen.push(below(rng, n));
    }
    chosen
}

fn pixel(image: &RgbImage, k: usize) -> [u8; 3] {
    let raw = image.as_raw();
    match raw.get(3 * k..3 * k + 3) {
        Some(&[r, g, b]) => [r, g, b],
        _ => [0; 3],
    }
}

fn set_pixel(image: &mut RgbImage, k: usize, c: [u8; 3]) {
    let raw: &mut [u8] = image;
    if let Some(dst) = raw.get_mut(3 * k..3 * k + 3) {
        dst.copy_from_slice(&c);
    }
}

fn visibly_different(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter().zip(&b).map(|(&x, &y)| u32::from(x.abs_diff(y))).sum::<u32>() >= VISIBLE_DIFF
}

/// The scene with subject `k` replaced by `identity`, rendered (same background and lighting).
fn render_with(scene: &Scene, bg: &[[f32; 3]], size: u32, k: usize, identity: Identity) -> RgbImage {
    let mut subjects = scene.subjects.clone();
    if let Some(s) = subjects.get_mut(k) {
        s.identity = identity;
    }
    finish(&composite(bg, &subjects, size).colour, &scene.lighting, size)
}

/// Pixels (row-major indices) of subject `k`'s mask.
fn mask_pixels(layers: &Layers, k: usize) -> Vec<usize> {
    layers
        .owner
        .iter()
        .enumerate()
        .filter(|(_, o)| **o as usize == k)
        .map(|(i, _)| i)
        .collect()
}

/// Fallback edit when no attribute change is visible: rotate the colour channels of the subject's pixels.
fn recolour(loser: &mut RgbImage, winner: &RgbImage, pixels: &[usize]) -> usize {
    let mut changed = 0;
    for &k in pixels {
        let [r, g, b] = pixel(winner, k);
        let new = [g, b, r];
        changed += usize::from(visibly_different([r, g, b], new));
        set_pixel(loser, k, new);
    }
    changed
}

/// `Perturbed`: for each chosen subject, a disc centred on one of its pixels and sized to cover 30–70 % of its
/// mask; inside disc ∩ mask the subject is re-rendered with its palette or its pattern changed.
fn perturb(
    rng: &mut ChaCha8Rng,
    scene: &Scene,
    bg: &[[f32; 3]],
    layers: &Layers,
    winner: &RgbImage,
    size: u32,
) -> (RgbImage, Value) {
    let n = size as usize;
    let mut loser = winner.clone();
    let mut edits = Vec::new();
    for k in pick_subjects(rng, scene.subjects.len()) {
        let Some(original) = scene.subjects.get(k).map(|s| s.identity) else {
            continue;
        };
        let pixels = mask_pixels(layers, k);
        if pixels.is_empty() {
            continue;
        }
        struct Attempt {
            changed: usize,
            region: Vec<usize>,
            centre: [f64; 2],
            radius: f64,
            attribute: &'static str,
            identity: Identity,
            image: RgbImage,
        }
        let mut best: Option<Attempt> = None;
        for _ in 0..8 {
            let fraction = uniform(rng, 0.3, 0.7);
            let c = pixels.get(below(rng, pixels.len())).copied().unwrap_or(0);
            let (cx, cy) = ((c % n) as f64 + 0.5, (c / n) as f64 + 0.5);
            let mut by_distance: Vec<(f64, usize)> = pixels
                .iter()
                .map(|&p| {
                    let (dx, dy) = ((p % n) as f64 + 0.5 - cx, (p / n) as f64 + 0.5 - cy);
                    (dx * dx + dy * dy, p)
                })
                .collect();
            by_distance.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            let take = ((fraction * pixels.len() as f64).ceil() as usize).clamp(1, pixels.len());
            let radius_sq = by_distance.get(take - 1).map_or(0.0, |d| d.0);
            // The whole disc: every mask pixel within the radius (ties included).
            let region: Vec<usize> = by_distance
                .iter()
                .take_while(|d| d.0 <= radius_sq)
                .map(|d| d.1)
                .collect();
            let (attribute, identity) = if rng.random_bool(0.6) {
                let others: Vec<Palette> = Palette::ALL.into_iter().filter(|p| *p != original.palette).collect();
                let palette = choose(rng, &others, original.palette);
                ("palette", Identity { palette, ..original })
            } else {
                let others: Vec<Pattern> = Pattern::ALL.into_iter().filter(|p| *p != original.pattern).collect();
                let pattern = choose(rng, &others, original.pattern);
                ("pattern", Identity { pattern, ..original })
            };
            let image = render_with(scene, bg, size, k, identity);
            let changed = region
                .iter()
                .filter(|&&p| visibly_different(pixel(winner, p), pixel(&image, p)))
                .count();
            let good = changed as f64 >= 0.4 * region.len() as f64;
            if best.as_ref().is_none_or(|b| changed > b.changed) {
                best = Some(Attempt {
                    changed,
                    region,
                    centre: [round4(cx), round4(cy)],
                    radius: round4(radius_sq.sqrt()),
                    attribute,
                    identity,
                    image,
                });
            }
            if good {
                break;
            }
        }
        let edit = match best {
            Some(b) if b.changed > 0 => {
                for &p in &b.region {
                    set_pixel(&mut loser, p, pixel(&b.image, p));
                }
                let (from, to) = match b.attribute {
                    "palette" => (original.palette.key(), b.identity.palette.key()),
                    _ => (original.pattern.key(), b.identity.pattern.key()),
                };
                json!({
                    "subject": k,
                    "attribute": b.attribute,
                    "from": from,
                    "to": to,
                    "to_identity": identity_meta(&b.identity),
                    "region": { "kind": "disc", "centre_px": b.centre, "radius_px": b.radius },
                    "region_pixels": b.region.len(),
                    "mask_pixels": pixels.len(),
                    "changed_pixels": b.changed,
                })
            }
            _ => {
                let changed = recolour(&mut loser, winner, &pixels);
                json!({
                    "subject": k,
                    "attribute": "recolour",
                    "from": "rgb",
                    "to": "gbr",
                    "region": { "kind": "mask" },
                    "region_pixels": pixels.len(),
                    "mask_pixels": pixels.len(),
                    "changed_pixels": changed,
                })
            }
        };
        edits.push(edit);
    }
    (
        loser,
        json!({ "source": NegativeSource::Perturbed.key(), "edits": edits }),
    )
}

/// `OtherSubject`: for each chosen subject, the scene is re-rendered with a different identity of the same
/// category (different shape and palette, not already in the item) at the same pose, and composited inside the
/// original subject's mask only.
fn replace(
    rng: &mut ChaCha8Rng,
    scene: &Scene,
    bg: &[[f32; 3]],
    layers: &Layers,
    winner: &RgbImage,
    size: u32,
) -> (RgbImage, Value) {
    let mut loser = winner.clone();
    let mut edits = Vec::new();
    let present: HashSet<Identity> = scene.subjects.iter().map(|s| s.identity).collect();
    for k in pick_subjects(rng, scene.subjects.len()) {
        let Some(original) = scene.subjects.get(k).map(|s| s.identity) else {
            continue;
        };
        let pixels = mask_pixels(layers, k);
        if pixels.is_empty() {
            continue;
        }
        let shapes: Vec<Shape> = Shape::of_category(original.category())
            .into_iter()
            .filter(|s| *s != original.shape)
            .collect();
        let palettes: Vec<Palette> = Palette::ALL.into_iter().filter(|p| *p != original.palette).collect();
        let mut best: Option<(usize, Identity, RgbImage)> = None;
        for _ in 0..6 {
            let identity = Identity {
                shape: choose(rng, &shapes, original.shape),
                palette: choose(rng, &palettes, original.palette),
                pattern: choose(rng, &Pattern::ALL, original.pattern),
            };
            if present.contains(&identity) {
                continue;
            }
            let image = render_with(scene, bg, size, k, identity);
            let changed = pixels
                .iter()
                .filter(|&&p| visibly_different(pixel(winner, p), pixel(&image, p)))
                .count();
            let good = changed as f64 >= 0.3 * pixels.len() as f64;
            if best.as_ref().is_none_or(|b| changed > b.0) {
                best = Some((changed, identity, image));
            }
            if good {
                break;
            }
        }
        let edit = match best {
            Some((changed, identity, image)) if changed > 0 => {
                for &p in &pixels {
                    set_pixel(&mut loser, p, pixel(&image, p));
                }
                json!({
                    "subject": k,
                    "attribute": "identity",
                    "from_identity": identity_meta(&original),
                    "to_identity": identity_meta(&identity),
                    "region": { "kind": "mask" },
                    "region_pixels": pixels.len(),
                    "mask_pixels": pixels.len(),
                    "changed_pixels": changed,
                })
            }
            _ => {
                let changed = recolour(&mut loser, winner, &pixels);
                json!({
                    "subject": k,
                    "attribute": "recolour",
                    "from": "rgb",
                    "to": "gbr",
                    "region": { "kind": "mask" },
                    "region_pixels": pixels.len(),
                    "mask_pixels": pixels.len(),
                    "changed_pixels": changed,
                })
            }
        };
        edits.push(edit);
    }
    (
        loser,
        json!({ "source": NegativeSource::OtherSubject.key(), "edits": edits }),
    )
}

/// `Augmented`: a global photometric + geometric augmentation of the winner (not localized): a shift by a few
/// pixels (edge-clamped), saturation, contrast, brightness and per-channel gains, then a box blur or Gaussian-like
/// noise.
fn augment(rng: &mut ChaCha8Rng, winner: &RgbImage) -> (RgbImage, Value) {
    let (w, h) = winner.dimensions();
    let size = w.max(h).max(1);
    let max_shift = i64::from((size / 32).max(1));
    let shift = [
        rng.random_range(-max_shift..=max_shift),
        rng.random_range(-max_shift..=max_shift),
    ];
    let sign = if rng.random_bool(0.5) { 1.0 } else { -1.0 };
    let brightness = round4(1.0 + sign * uniform(rng, 0.06, 0.15));
    let contrast = uniform4(rng, 0.85, 1.15);
    let saturation = uniform4(rng, 0.7, 1.3);
    let gains = [0; 3].map(|_| uniform4(rng, 0.94, 1.06));
    let blur = rng.random_bool(0.5);
    let blur_radius = (size / 64).max(1);
    let noise_sigma = uniform4(rng, 4.0, 10.0);
    let noise_seed = rng.random::<u64>();

    let (wi, hi) = (i64::from(w), i64::from(h));
    let mut buf: Vec<[f32; 3]> = Vec::with_capacity((w * h) as usize);
    for y in 0..hi {
        for x in 0..wi {
            let sx = (x - shift[0]).clamp(0, (wi - 1).max(0));
            let sy = (y - shift[1]).clamp(0, (hi - 1).max(0));
            let c = pixel(winner, (sy * wi + sx) as usize).map(f32::from);
            let grey = 0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2];
            buf.push([0, 1, 2].map(|i| {
                let v = grey + (c[i] - grey) * saturation as f32;
                let v = 128.0 + (v - 128.0) * contrast as f32;
                v * (brightness * gains[i]) as f32
            }));
        }
    }
    if blur {
        buf = box_blur(&buf, w as usize, h as usize, blur_radius as usize);
    } else {
        let mut noise_rng = ChaCha8Rng::seed_from_u64(noise_seed);
        for c in &mut buf {
            for v in c.iter_mut() {
                // Sum of 4 uniforms: zero mean, unit variance after scaling by √3.
                let z: f32 = (0..4).map(|_| noise_rng.random::<f32>() - 0.5).sum::<f32>() * 3f32.sqrt();
                *v += z * noise_sigma as f32;
            }
        }
    }
    let mut loser = RgbImage::new(w, h);
    for (p, c) in loser.pixels_mut().zip(&buf) {
        p.0 = c.map(quantize);
    }
    let meta = json!({
        "source": NegativeSource::Augmented.key(),
        "edits": [],
        "augmentation": {
            "shift_px": shift,
            "brightness": brightness,
            "contrast": contrast,
            "saturation": saturation,
            "channel_gains": gains,
            "filter": if blur { "box_blur" } else { "noise" },
            "blur_radius_px": if blur { json!(blur_radius) } else { Value::Null },
            "noise_sigma": if blur { Value::Null } else { json!(noise_sigma) },
            "noise_seed": if blur { Value::Null } else { json!(noise_seed) },
        },
    });
    (loser, meta)
}

/// Separable box blur with edge clamping.
fn box_blur(src: &[[f32; 3]], w: usize, h: usize, r: usize) -> Vec<[f32; 3]> {
    let pass = |src: &[[f32; 3]], horizontal: bool| {
        let mut out = vec![[0.0f32; 3]; src.len()];
        for y in 0..h {
            for x in 0..w {
                let mut acc = [0.0f32; 3];
                for d in 0..=2 * r {
                    let (sx, sy) = if horizontal {
                        ((x + d).saturating_sub(r).min(w - 1), y)
                    } else {
                        (x, (y + d).saturating_sub(r).min(h - 1))
                    };
                    if let Some(c) = src.get(sy * w + sx) {
                        acc = [acc[0] + c[0], acc[1] + c[1], acc[2] + c[2]];
                    }
                }
                if let Some(o) = out.get_mut(y * w + x) {
                    *o = acc.map(|a| a / (2 * r + 1) as f32);
                }
            }
        }
        out
    };
    if w == 0 || h == 0 {
        return src.to_vec();
    }
    let horizontal = pass(src, true);
    pass(&horizontal, false)
}
