//! Scene descriptions and the renderer: backgrounds, lighting, placed subjects → winner-style image + masks.
//!
//! Everything here is a pure function of the [`Scene`] value and the output size, so evaluation code can re-render
//! the ideal target of any generated item from the `scene` object stored in its metadata ([`Scene::from_meta`]).

use image::{GrayImage, RgbImage};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::identity::{Identity, part_at};

/// Neutral light grey of reference images.
pub const REFERENCE_BACKGROUND: [u8; 3] = [214, 214, 214];

/// Side of the subject's bounding square in a reference image, as a fraction of the image side.
pub const REFERENCE_SCALE: f64 = 0.72;

/// Darkening factor of a subject's outline (a thin contour inside its silhouette that keeps it readable on busy
/// backgrounds).
const OUTLINE_SHADE: f32 = 0.55;

/// A procedural background, described in normalized image coordinates (`x, y ∈ [0, 1]`, `y` downwards) so it
/// renders the same at every size. Colours are sRGB.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Background {
    /// One flat colour (used for references).
    Flat {
        /// The colour.
        colour: [u8; 3],
    },
    /// A linear gradient.
    Gradient {
        /// Colour at the start.
        from: [u8; 3],
        /// Colour at the end.
        to: [u8; 3],
        /// Direction of the gradient in degrees (0 = left to right, 90 = top to bottom).
        angle_deg: f64,
    },
    /// A radial glow.
    Radial {
        /// Colour at the centre.
        inner: [u8; 3],
        /// Colour far from the centre.
        outer: [u8; 3],
        /// Centre of the glow.
        centre: [f64; 2],
        /// Radius at which the outer colour is reached.
        radius: f64,
    },
    /// A sky over ground, split at a horizontal line.
    Horizon {
        /// Upper colour.
        sky: [u8; 3],
        /// Lower colour.
        ground: [u8; 3],
        /// Height of the horizon line, from the top.
        horizon: f64,
    },
    /// A soft mottled texture (two-octave value noise).
    Noise {
        /// Colour at noise 0.
        base: [u8; 3],
        /// Colour at noise 1.
        accent: [u8; 3],
        /// Size of a noise cell.
        cell: f64,
        /// Noise seed.
        seed: u32,
    },
    /// Straight stripes.
    Stripes {
        /// First stripe colour.
        a: [u8; 3],
        /// Second stripe colour.
        b: [u8; 3],
        /// Direction across the stripes, in degrees.
        angle_deg: f64,
        /// Width of one pair of stripes.
        period: f64,
    },
    /// A checkerboard of large tiles.
    Tiles {
        /// First tile colour.
        a: [u8; 3],
        /// Second tile colour.
        b: [u8; 3],
        /// Tile side.
        cell: f64,
    },
}

impl Background {
    /// Stable snake_case name of the kind.
    pub fn kind(&self) -> &'static str {
        match self {
            Background::Flat { .. } => "flat",
            Background::Gradient { .. } => "gradient",
            Background::Radial { .. } => "radial",
            Background::Horizon { .. } => "horizon",
            Background::Noise { .. } => "noise",
            Background::Stripes { .. } => "stripes",
            Background::Tiles { .. } => "tiles",
        }
    }

    /// A noun phrase for prompts ("an orange to teal gradient background").
    pub fn describe(&self) -> String {
        // "red and blue", or "two-tone blue" when both colours get the same name.
        let pair = |a: [u8; 3], b: [u8; 3]| {
            let (a, b) = (colour_name(a), colour_name(b));
            if a == b {
                format!("two-tone {a}")
            } else {
                format!("{a} and {b}")
            }
        };
        let phrase = match self {
            Background::Flat { colour } => format!("plain {} background", colour_name(*colour)),
            Background::Gradient { from, to, .. } => {
                let (a, b) = (colour_name(*from), colour_name(*to));
                if a == b {
                    format!("{a} gradient background")
                } else {
                    format!("{a} to {b} gradient background")
                }
            }
            Background::Radial { inner, outer, .. } => {
                format!("{} background with a {} glow", colour_name(*outer), colour_name(*inner))
            }
            Background::Horizon { sky, ground, .. } => {
                format!("{} sky over {} ground", colour_name(*sky), colour_name(*ground))
            }
            Background::Noise { base, accent, .. } => format!("mottled {} texture", pair(*base, *accent)),
            Background::Stripes { a, b, .. } => format!("{} striped background", pair(*a, *b)),
            Background::Tiles { a, b, .. } => format!("{} checkered floor", pair(*a, *b)),
        };
        with_article(&phrase)
    }

    /// Colour at normalized point `(x, y)`, as 0–255 floats.
    fn colour_at(&self, x: f32, y: f32) -> [f32; 3] {
        match self {
            Background::Flat { colour } => rgb(*colour),
            Background::Gradient { from, to, angle_deg } => {
                let a = (*angle_deg as f32).to_radians();
                let (dx, dy) = (a.cos(), a.sin());
                let extent = 0.5 * (dx.abs() + dy.abs()).max(1e-3);
                let t = ((x - 0.5) * dx + (y - 0.5) * dy) / extent;
                mix(rgb(*from), rgb(*to), 0.5 + 0.5 * t)
            }
            Background::Radial {
                inner,
                outer,
                centre,
                radius,
            } => {
                let (dx, dy) = (x - centre[0] as f32, y - centre[1] as f32);
                let t = (dx * dx + dy * dy).sqrt() / (*radius as f32).max(1e-3);
                mix(rgb(*inner), rgb(*outer), smoothstep(t))
            }
            Background::Horizon { sky, ground, horizon } => {
                let h = *horizon as f32;
                if y < h {
                    // Lighter towards the top.
                    mix(rgb(*sky), [255.0; 3], 0.25 * (1.0 - y / h.max(1e-3)))
                } else {
                    // Darker towards the bottom.
                    mix(rgb(*ground), [0.0; 3], 0.2 * (y - h) / (1.0 - h).max(1e-3))
                }
            }
            Background::Noise {
                base,
                accent,
                cell,
                seed,
            } => {
                let c = (*cell as f32).max(1e-3);
                let n = 0.65 * value_noise(x / c, y / c, *seed) + 0.35 * value_noise(2.0 * x / c, 2.0 * y / c, !*seed);
                mix(rgb(*base), rgb(*accent), smoothstep((n - 0.2) / 0.6))
            }
            Background::Stripes {
                a,
                b,
                angle_deg,
                period,
            } => {
                let ang = (*angle_deg as f32).to_radians();
                let t = (x * ang.cos() + y * ang.sin()) / (*period as f32).max(1e-3);
                if t.rem_euclid(1.0) < 0.5 { rgb(*a) } else { rgb(*b) }
            }
            Background::Tiles { a, b, cell } => {
                let c = (*cell as f32).max(1e-3);
                let parity = ((x / c).floor() as i64 + (y / c).floor() as i64).rem_euclid(2);
                if parity == 0 { rgb(*a) } else { rgb(*b) }
            }
        }
    }
}

/// A global lighting change: every channel is multiplied by `brightness · tint[c]`.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Lighting {
    /// Overall gain.
    pub brightness: f64,
    /// Per-channel (R, G, B) gain; `> 1` on red and `< 1` on blue is warm light.
    pub tint: [f64; 3],
}

impl Lighting {
    /// No change.
    pub const NEUTRAL: Lighting = Lighting {
        brightness: 1.0,
        tint: [1.0; 3],
    };

    /// A phrase for prompts (", in warm light"), empty for near-neutral light.
    pub fn describe(&self) -> &'static str {
        let warmth = self.tint[0] - self.tint[2];
        match (self.brightness, warmth) {
            (_, w) if w > 0.08 => ", in warm light",
            (_, w) if w < -0.08 => ", in cool light",
            (b, _) if b < 0.88 => ", in dim light",
            (b, _) if b > 1.08 => ", in bright light",
            _ => "",
        }
    }

    fn gains(&self) -> [f32; 3] {
        self.tint.map(|t| (self.brightness * t) as f32)
    }
}

/// One subject placed in a scene.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PlacedSubject {
    /// Who it is.
    pub identity: Identity,
    /// Centre of its bounding square, in normalized image coordinates (`x, y ∈ [0, 1]`, `y` downwards).
    pub centre: [f64; 2],
    /// Side of its bounding square as a fraction of the image side.
    pub scale: f64,
    /// Mirrored left-right.
    pub mirror: bool,
}

impl PlacedSubject {
    /// The bounding square in pixels at `size_px`: `[x0, y0, x1, y1)`, clipped to the image.
    pub fn bbox_px(&self, size_px: u32) -> [u32; 4] {
        let size = f64::from(size_px);
        let half = self.scale * size / 2.0;
        let (cx, cy) = (self.centre[0] * size, self.centre[1] * size);
        let clip = |v: f64| if v.is_finite() { v.clamp(0.0, size) as u32 } else { 0 };
        [
            clip((cx - half).floor()),
            clip((cy - half).floor()),
            clip((cx + half).ceil()),
            clip((cy + half).ceil()),
        ]
    }
}

/// A full scene: background, lighting and subjects in drawing order (later subjects occlude earlier ones).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    /// The background.
    pub background: Background,
    /// The global lighting.
    pub lighting: Lighting,
    /// The subjects, in drawing order; mask `j` of [`render_scene`] belongs to `subjects[j]`.
    pub subjects: Vec<PlacedSubject>,
}

impl Scene {
    /// The scene stored under `"scene"` in a synthetic item's `meta`, if present and well-formed.
    pub fn from_meta(meta: &Value) -> Option<Scene> {
        serde_json::from_value(meta.get("scene")?.clone()).ok()
    }

    /// The prompt describing the scene ("a striped red-gold star and a plain blue-pink cat on …").
    pub fn prompt(&self) -> String {
        let names: Vec<String> = self
            .subjects
            .iter()
            .map(|s| with_article(&s.identity.describe()))
            .collect();
        let subjects = match names.as_slice() {
            [] => "nothing".to_string(),
            [one] => one.clone(),
            [init @ .., last] => format!("{} and {last}", init.join(", ")),
        };
        format!(
            "{subjects} on {}{}",
            self.background.describe(),
            self.lighting.describe()
        )
    }
}

/// Renders a scene at `size_px × size_px`: the image and one binary (0/255) mask per subject.
///
/// Mask `j` is exactly the set of pixels whose colour comes from subject `j`: the subject's inside test at pixel
/// centres, minus pixels occluded by later subjects. Colours are 2×2 supersampled inside each subject (and in the
/// background), but silhouettes are hard-edged, so pixels outside every mask are pure background.
pub fn render_scene(scene: &Scene, size_px: u32) -> (RgbImage, Vec<GrayImage>) {
    let background = render_background(&scene.background, size_px);
    let layers = composite(&background, &scene.subjects, size_px);
    let image = finish(&layers.colour, &scene.lighting, size_px);
    let masks = (0..scene.subjects.len()).map(|j| layers.mask(j, size_px)).collect();
    (image, masks)
}

/// Renders the reference image of an identity: the subject alone, centred, at [`REFERENCE_SCALE`], unmirrored, on
/// a flat [`REFERENCE_BACKGROUND`], under neutral light.
pub fn render_reference(identity: &Identity, size_px: u32) -> RgbImage {
    render_scene(&reference_scene(identity), size_px).0
}

/// The scene that [`render_reference`] draws.
pub fn reference_scene(identity: &Identity) -> Scene {
    Scene {
        background: Background::Flat {
            colour: REFERENCE_BACKGROUND,
        },
        lighting: Lighting::NEUTRAL,
        subjects: vec![PlacedSubject {
            identity: *identity,
            centre: [0.5, 0.5],
            scale: REFERENCE_SCALE,
            mirror: false,
        }],
    }
}

/// Subject layers over a background, before lighting.
pub(super) struct Layers {
    /// Colour per pixel (0–255 floats), row-major.
    pub colour: Vec<[f32; 3]>,
    /// Index of the subject that owns each pixel (`u32::MAX`: background).
    pub owner: Vec<u32>,
    /// Unoccluded silhouette area of each subject, in pixels.
    pub full_area: Vec<usize>,
}

impl Layers {
    /// The 0/255 mask of subject `j`.
    pub fn mask(&self, j: usize, size_px: u32) -> GrayImage {
        let mut mask = GrayImage::new(size_px, size_px);
        for (p, &o) in mask.pixels_mut().zip(&self.owner) {
            p.0 = [if o as usize == j { 255 } else { 0 }];
        }
        mask
    }

    /// Pixel count of subject `j`'s (occlusion-aware) mask.
    pub fn area(&self, j: usize) -> usize {
        self.owner.iter().filter(|&&o| o as usize == j).count()
    }
}

/// The background at `size_px`, 2×2 supersampled, before lighting.
pub(super) fn render_background(background: &Background, size_px: u32) -> Vec<[f32; 3]> {
    let n = size_px as usize;
    let size = size_px as f32;
    let mut out = Vec::with_capacity(n * n);
    for py in 0..n {
        for px in 0..n {
            let mut acc = [0.0f32; 3];
            for (ox, oy) in SUBSAMPLES {
                let c = background.colour_at((px as f32 + 0.5 + ox) / size, (py as f32 + 0.5 + oy) / size);
                acc = [acc[0] + c[0], acc[1] + c[1], acc[2] + c[2]];
            }
            out.push(acc.map(|a| a / 4.0));
        }
    }
    out
}

const SUBSAMPLES: [(f32, f32); 4] = [(-0.25, -0.25), (0.25, -0.25), (-0.25, 0.25), (0.25, 0.25)];

/// Paints `subjects` in order over a copy of `background` (which must hold `size_px²` pixels).
pub(super) fn composite(background: &[[f32; 3]], subjects: &[PlacedSubject], size_px: u32) -> Layers {
    let n = size_px as usize;
    let mut colour = background.to_vec();
    colour.resize(n * n, [0.0; 3]);
    let mut owner = vec![u32::MAX; n * n];
    let full_area = subjects
        .iter()
        .enumerate()
        .map(|(j, s)| {
            paint_subject(
                s,
                u32::try_from(j).unwrap_or(u32::MAX - 1),
                size_px,
                &mut colour,
                &mut owner,
            )
        })
        .collect();
    Layers {
        colour,
        owner,
        full_area,
    }
}

/// Paints one subject; returns its silhouette area in pixels.
fn paint_subject(s: &PlacedSubject, j: u32, size_px: u32, colour: &mut [[f32; 3]], owner: &mut [u32]) -> usize {
    let n = size_px as usize;
    let size = size_px as f32;
    let half = (s.scale as f32) * size / 2.0;
    let (cx, cy) = (s.centre[0] as f32 * size, s.centre[1] as f32 * size);
    if !(half.is_finite() && half > 0.25 && cx.is_finite() && cy.is_finite()) {
        return 0;
    }
    let [x0, y0, x1, y1] = s.bbox_px(size_px).map(|v| v as usize);
    if x1 <= x0 || y1 <= y0 {
        return 0;
    }
    let (w, h) = (x1 - x0, y1 - y0);
    let flip = if s.mirror { -1.0 } else { 1.0 };
    let local = |px: f32, py: f32| (flip * (px - cx) / half, (py - cy) / half);
    let parts: Vec<_> = (0..w * h)
        .map(|i| {
            let (u, v) = local((x0 + i % w) as f32 + 0.5, (y0 + i / w) as f32 + 0.5);
            part_at(s.identity.shape, u, v)
        })
        .collect();
    let inside: Vec<bool> = parts.iter().map(Option::is_some).collect();
    let outline_px = ((2.0 * half / 30.0).round() as usize).max(1);
    let interior = erode(&inside, w, h, outline_px);
    let mut area = 0;
    for (i, part) in parts.iter().enumerate() {
        let Some(centre_part) = *part else { continue };
        area += 1;
        let (px, py) = (x0 + i % w, y0 + i / w);
        let mut acc = [0.0f32; 3];
        for (ox, oy) in SUBSAMPLES {
            let (u, v) = local(px as f32 + 0.5 + ox, py as f32 + 0.5 + oy);
            // Subsamples that fall outside the silhouette take the centre's part, so the silhouette stays hard.
            let c = s
                .identity
                .colour(part_at(s.identity.shape, u, v).unwrap_or(centre_part), u, v);
            acc = [acc[0] + c[0], acc[1] + c[1], acc[2] + c[2]];
        }
        let shade = if interior.get(i).copied().unwrap_or(false) {
            0.25
        } else {
            OUTLINE_SHADE * 0.25
        };
        let k = py * n + px;
        if let (Some(c), Some(o)) = (colour.get_mut(k), owner.get_mut(k)) {
            *c = acc.map(|a| a * shade);
            *o = j;
        }
    }
    area
}

/// Binary erosion with a `(2r+1)²` square; pixels beyond the borders count as outside.
fn erode(inside: &[bool], w: usize, h: usize, r: usize) -> Vec<bool> {
    let pass = |src: &[bool], len: usize, lines: usize, at: &dyn Fn(usize, usize) -> usize| {
        let mut out = vec![false; src.len()];
        for line in 0..lines {
            // prefix[i] = number of outside pixels among the first i of this line.
            let mut prefix = Vec::with_capacity(len + 1);
            prefix.push(0usize);
            for i in 0..len {
                let outside = !src.get(at(line, i)).copied().unwrap_or(false);
                prefix.push(prefix[i] + usize::from(outside));
            }
            for i in 0..len {
                let (lo, hi) = (i.checked_sub(r), i + r + 1);
                let ok = match lo {
                    Some(lo) if hi <= len => prefix[hi] == prefix[lo],
                    _ => false,
                };
                if let Some(o) = out.get_mut(at(line, i)) {
                    *o = ok;
                }
            }
        }
        out
    };
    let horizontal = pass(inside, w, h, &|line, i| line * w + i);
    pass(&horizontal, h, w, &|line, i| i * w + line)
}

/// Applies lighting and quantizes.
pub(super) fn finish(colour: &[[f32; 3]], lighting: &Lighting, size_px: u32) -> RgbImage {
    let gains = lighting.gains();
    let mut image = RgbImage::new(size_px, size_px);
    for (p, c) in image.pixels_mut().zip(colour) {
        p.0 = [0, 1, 2].map(|i| quantize(c[i] * gains[i]));
    }
    image
}

/// Rounds a 0–255 float to a byte (NaN → 0).
pub(super) fn quantize(v: f32) -> u8 {
    if v.is_nan() {
        0
    } else {
        v.round().clamp(0.0, 255.0) as u8
    }
}

fn rgb(c: [u8; 3]) -> [f32; 3] {
    c.map(f32::from)
}

fn mix(a: [f32; 3], b: [f32; 3], t: f32) -> [f32; 3] {
    let t = t.clamp(0.0, 1.0);
    [0, 1, 2].map(|i| a[i] + (b[i] - a[i]) * t)
}

fn smoothstep(t: f32) -> f32 {
    let t = t.clamp(0.0, 1.0);
    t * t * (3.0 - 2.0 * t)
}

/// Smooth value noise in `[0, 1]` on a unit lattice.
fn value_noise(x: f32, y: f32, seed: u32) -> f32 {
    let (fx, fy) = (x.floor(), y.floor());
    let (ix, iy) = (fx as i64, fy as i64);
    let (tx, ty) = (smoothstep(x - fx), smoothstep(y - fy));
    let at = |dx: i64, dy: i64| lattice(ix.wrapping_add(dx), iy.wrapping_add(dy), seed);
    let top = at(0, 0) + (at(1, 0) - at(0, 0)) * tx;
    let bottom = at(0, 1) + (at(1, 1) - at(0, 1)) * tx;
    top + (bottom - top) * ty
}

fn lattice(x: i64, y: i64, seed: u32) -> f32 {
    let h = super::splitmix64((x as u64).wrapping_mul(0x9E37_79B9) ^ (y as u64).rotate_left(32) ^ u64::from(seed));
    (h >> 40) as f32 / (1u64 << 24) as f32
}

/// "a"/"an" + phrase.
pub(super) fn with_article(phrase: &str) -> String {
    let vowel = phrase.chars().next().is_some_and(|c| "aeiou".contains(c));
    format!("{} {phrase}", if vowel { "an" } else { "a" })
}

/// A plain-English name for an sRGB colour ("dark blue", "pale pink", "grey").
pub fn colour_name(c: [u8; 3]) -> &'static str {
    let [r, g, b] = c.map(|v| f32::from(v) / 255.0);
    let (max, min) = (r.max(g).max(b), r.min(g).min(b));
    let l = (max + min) / 2.0;
    let d = max - min;
    let s = if d < 1e-6 {
        0.0
    } else {
        d / (1.0 - (2.0 * l - 1.0).abs()).max(1e-6)
    };
    if s < 0.15 || d < 0.08 {
        return match l {
            l if l < 0.2 => "black",
            l if l < 0.42 => "dark grey",
            l if l < 0.78 => "grey",
            _ => "white",
        };
    }
    let hue = if max == r {
        60.0 * ((g - b) / d).rem_euclid(6.0)
    } else if max == g {
        60.0 * ((b - r) / d + 2.0)
    } else {
        60.0 * ((r - g) / d + 4.0)
    };
    let base = match hue {
        h if !(15.0..345.0).contains(&h) => 0,
        h if h < 42.0 => 1,
        h if h < 68.0 => 2,
        h if h < 95.0 => 3,
        h if h < 155.0 => 4,
        h if h < 195.0 => 5,
        h if h < 255.0 => 6,
        h if h < 290.0 => 7,
        h if h < 320.0 => 8,
        _ => 9,
    };
    if base == 1 && l < 0.45 {
        return "brown";
    }
    const NAMES: [[&str; 3]; 10] = [
        ["dark red", "red", "pale red"],
        ["dark orange", "orange", "peach"],
        ["olive", "yellow", "pale yellow"],
        ["dark olive", "lime", "pale lime"],
        ["dark green", "green", "mint"],
        ["dark teal", "teal", "pale cyan"],
        ["navy", "blue", "sky blue"],
        ["indigo", "purple", "lavender"],
        ["plum", "magenta", "pale magenta"],
        ["maroon", "pink", "pale pink"],
    ];
    let shade = if l < 0.3 {
        0
    } else if l > 0.72 {
        2
    } else {
        1
    };
    NAMES
        .get(base)
        .and_then(|row| row.get(shade))
        .copied()
        .unwrap_or("grey")
}
