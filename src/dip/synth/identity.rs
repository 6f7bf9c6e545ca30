//! Subject identities — `(shape, palette, pattern)` — and their resolution-independent geometry.
//!
//! Every shape lives in a local square `u, v ∈ [-1, 1]` (`u` to the right, `v` downwards). Inside tests are exact
//! point tests, so a subject renders identically at any size up to sampling, and a binary mask is just the inside
//! test at pixel centres.

use std::sync::LazyLock;

use serde::{Deserialize, Serialize};

use crate::dip::Category;

/// The silhouette of a subject. Shapes are grouped into the paper's three categories (see [`Shape::category`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Shape {
    /// Object: a filled disc.
    Circle,
    /// Object: a rounded square.
    Square,
    /// Object: an upward triangle.
    Triangle,
    /// Object: a five-pointed star.
    Star,
    /// Object: a thick ring (the centre shows the background).
    Ring,
    /// Object: a diamond (rhombus).
    Diamond,
    /// Object: a heart.
    Heart,
    /// Object: a plus-shaped cross.
    Cross,
    /// Animal: a sitting cat with pointed ears and a curled tail.
    Cat,
    /// Animal: a rabbit with long ears and a round tail.
    Rabbit,
    /// Animal: a fish in profile with a tail fin.
    Fish,
    /// Animal: a bird in profile with a beak and a wing.
    Bird,
    /// Human: a short-haired person (head and shoulders).
    Person,
    /// Human: a long-haired person (head and shoulders).
    LongHairedPerson,
    /// Human: a person wearing a top hat (head and shoulders).
    PersonWithHat,
}

impl Shape {
    /// Every shape, in index order.
    pub const ALL: [Shape; 15] = [
        Shape::Circle,
        Shape::Square,
        Shape::Triangle,
        Shape::Star,
        Shape::Ring,
        Shape::Diamond,
        Shape::Heart,
        Shape::Cross,
        Shape::Cat,
        Shape::Rabbit,
        Shape::Fish,
        Shape::Bird,
        Shape::Person,
        Shape::LongHairedPerson,
        Shape::PersonWithHat,
    ];

    /// Stable index of the shape in [`Shape::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The semantic category of the shape.
    pub fn category(self) -> Category {
        match self {
            Shape::Circle
            | Shape::Square
            | Shape::Triangle
            | Shape::Star
            | Shape::Ring
            | Shape::Diamond
            | Shape::Heart
            | Shape::Cross => Category::Object,
            Shape::Cat | Shape::Rabbit | Shape::Fish | Shape::Bird => Category::Animal,
            Shape::Person | Shape::LongHairedPerson | Shape::PersonWithHat => Category::Human,
        }
    }

    /// The shapes of one category, in index order.
    pub fn of_category(category: Category) -> Vec<Shape> {
        Shape::ALL.into_iter().filter(|s| s.category() == category).collect()
    }

    /// Stable snake_case name (as in the JSON metadata).
    pub fn key(self) -> &'static str {
        match self {
            Shape::Circle => "circle",
            Shape::Square => "square",
            Shape::Triangle => "triangle",
            Shape::Star => "star",
            Shape::Ring => "ring",
            Shape::Diamond => "diamond",
            Shape::Heart => "heart",
            Shape::Cross => "cross",
            Shape::Cat => "cat",
            Shape::Rabbit => "rabbit",
            Shape::Fish => "fish",
            Shape::Bird => "bird",
            Shape::Person => "person",
            Shape::LongHairedPerson => "long_haired_person",
            Shape::PersonWithHat => "person_with_hat",
        }
    }

    /// The noun used in prompts ("star", "long-haired person").
    pub fn noun(self) -> &'static str {
        match self {
            Shape::LongHairedPerson => "long-haired person",
            Shape::PersonWithHat => "person with a top hat",
            other => other.key(),
        }
    }
}

/// A two-colour palette. Primaries have pairwise distinct hues, so even a solid-pattern subject identifies its
/// palette.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Palette {
    /// Red with gold.
    RedGold,
    /// Orange with navy.
    OrangeNavy,
    /// Yellow with purple.
    YellowPurple,
    /// Green with white.
    GreenWhite,
    /// Teal with coral.
    TealCoral,
    /// Blue with pink.
    BluePink,
    /// Purple with lime.
    PurpleLime,
    /// Pink with black.
    PinkBlack,
    /// Brown with cyan.
    BrownCyan,
    /// Black with yellow.
    BlackYellow,
}

impl Palette {
    /// Every palette, in index order.
    pub const ALL: [Palette; 10] = [
        Palette::RedGold,
        Palette::OrangeNavy,
        Palette::YellowPurple,
        Palette::GreenWhite,
        Palette::TealCoral,
        Palette::BluePink,
        Palette::PurpleLime,
        Palette::PinkBlack,
        Palette::BrownCyan,
        Palette::BlackYellow,
    ];

    /// Stable index of the palette in [`Palette::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// `(primary, secondary)` sRGB colours.
    pub fn colours(self) -> ([u8; 3], [u8; 3]) {
        match self {
            Palette::RedGold => ([214, 38, 38], [250, 206, 56]),
            Palette::OrangeNavy => ([247, 132, 28], [28, 42, 112]),
            Palette::YellowPurple => ([246, 218, 36], [112, 40, 156]),
            Palette::GreenWhite => ([44, 168, 68], [246, 246, 240]),
            Palette::TealCoral => ([16, 146, 150], [252, 122, 100]),
            Palette::BluePink => ([40, 88, 222], [252, 164, 206]),
            Palette::PurpleLime => ([132, 48, 192], [172, 232, 56]),
            Palette::PinkBlack => ([242, 98, 172], [30, 30, 34]),
            Palette::BrownCyan => ([128, 78, 38], [84, 222, 232]),
            Palette::BlackYellow => ([40, 40, 46], [250, 220, 48]),
        }
    }

    /// Stable snake_case name (as in the JSON metadata).
    pub fn key(self) -> &'static str {
        match self {
            Palette::RedGold => "red_gold",
            Palette::OrangeNavy => "orange_navy",
            Palette::YellowPurple => "yellow_purple",
            Palette::GreenWhite => "green_white",
            Palette::TealCoral => "teal_coral",
            Palette::BluePink => "blue_pink",
            Palette::PurpleLime => "purple_lime",
            Palette::PinkBlack => "pink_black",
            Palette::BrownCyan => "brown_cyan",
            Palette::BlackYellow => "black_yellow",
        }
    }

    /// The words used in prompts ("red-gold").
    pub fn words(self) -> &'static str {
        match self {
            Palette::RedGold => "red-gold",
            Palette::OrangeNavy => "orange-navy",
            Palette::YellowPurple => "yellow-purple",
            Palette::GreenWhite => "green-white",
            Palette::TealCoral => "teal-coral",
            Palette::BluePink => "blue-pink",
            Palette::PurpleLime => "purple-lime",
            Palette::PinkBlack => "pink-black",
            Palette::BrownCyan => "brown-cyan",
            Palette::BlackYellow => "black-yellow",
        }
    }
}

/// How the palette's two colours are laid out over the subject's body.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Pattern {
    /// The primary colour only.
    Solid,
    /// Diagonal stripes.
    Stripes,
    /// Secondary-colour dots on the primary colour.
    Dots,
    /// A checkerboard.
    Checker,
    /// Concentric rings around the subject's centre.
    Rings,
    /// A top-to-bottom blend from primary to secondary.
    Gradient,
}

impl Pattern {
    /// Every pattern, in index order.
    pub const ALL: [Pattern; 6] = [
        Pattern::Solid,
        Pattern::Stripes,
        Pattern::Dots,
        Pattern::Checker,
        Pattern::Rings,
        Pattern::Gradient,
    ];

    /// Stable index of the pattern in [`Pattern::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// Stable snake_case name (as in the JSON metadata).
    pub fn key(self) -> &'static str {
        match self {
            Pattern::Solid => "solid",
            Pattern::Stripes => "stripes",
            Pattern::Dots => "dots",
            Pattern::Checker => "checker",
            Pattern::Rings => "rings",
            Pattern::Gradient => "gradient",
        }
    }

    /// The adjective used in prompts ("striped").
    pub fn adjective(self) -> &'static str {
        match self {
            Pattern::Solid => "plain",
            Pattern::Stripes => "striped",
            Pattern::Dots => "polka-dot",
            Pattern::Checker => "checkered",
            Pattern::Rings => "ringed",
            Pattern::Gradient => "gradient",
        }
    }

    /// Weight of the secondary colour at local point `(u, v)`, in `[0, 1]`.
    pub(super) fn secondary_weight(self, u: f32, v: f32) -> f32 {
        let odd = |x: f32| (x.floor() as i64).rem_euclid(2) == 1;
        match self {
            Pattern::Solid => 0.0,
            Pattern::Stripes => f32::from(u8::from(odd((u + v) * std::f32::consts::FRAC_1_SQRT_2 / 0.3))),
            Pattern::Dots => {
                let spacing = 0.55;
                let row = (v / spacing).floor();
                let shift = if (row as i64).rem_euclid(2) == 1 { 0.5 } else { 0.0 };
                let du = (u / spacing + shift).rem_euclid(1.0) - 0.5;
                let dv = (v / spacing).rem_euclid(1.0) - 0.5;
                f32::from(u8::from(du * du + dv * dv <= 0.31 * 0.31))
            }
            Pattern::Checker => {
                let c = (u / 0.45).floor() as i64 + (v / 0.45).floor() as i64;
                f32::from(u8::from(c.rem_euclid(2) == 1))
            }
            Pattern::Rings => f32::from(u8::from(odd((u * u + v * v).sqrt() / 0.27))),
            Pattern::Gradient => ((v + 0.9) / 1.8).clamp(0.0, 1.0),
        }
    }
}

/// A subject identity: what a personalized generator must preserve.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Identity {
    /// Silhouette (and category).
    pub shape: Shape,
    /// Colours.
    pub palette: Palette,
    /// Colour layout.
    pub pattern: Pattern,
}

impl Identity {
    /// Number of distinct identities (shapes × palettes × patterns).
    pub const COUNT: usize = Shape::ALL.len() * Palette::ALL.len() * Pattern::ALL.len();

    /// Every identity, in [`Identity::id`] order.
    pub fn all() -> Vec<Identity> {
        Shape::ALL
            .iter()
            .flat_map(|&shape| {
                Palette::ALL.iter().flat_map(move |&palette| {
                    Pattern::ALL.iter().map(move |&pattern| Identity {
                        shape,
                        palette,
                        pattern,
                    })
                })
            })
            .collect()
    }

    /// Stable integer id: `(shape · palettes + palette) · patterns + pattern`, in `0..COUNT`.
    pub fn id(self) -> u32 {
        let id = (self.shape.index() * Palette::ALL.len() + self.palette.index()) * Pattern::ALL.len()
            + self.pattern.index();
        u32::try_from(id).unwrap_or(u32::MAX)
    }

    /// The identity with this [`Identity::id`], if any.
    pub fn from_id(id: u32) -> Option<Identity> {
        let id = usize::try_from(id).ok()?;
        let pattern = *Pattern::ALL.get(id % Pattern::ALL.len())?;
        let rest = id / Pattern::ALL.len();
        let palette = *Palette::ALL.get(rest % Palette::ALL.len())?;
        let shape = *Shape::ALL.get(rest / Palette::ALL.len())?;
        Some(Identity {
            shape,
            palette,
            pattern,
        })
    }

    /// The category of the identity's shape.
    pub fn category(self) -> Category {
        self.shape.category()
    }

    /// Stable string key `shape/palette/pattern` ("star/red_gold/stripes").
    pub fn key(self) -> String {
        format!("{}/{}/{}", self.shape.key(), self.palette.key(), self.pattern.key())
    }

    /// A short description for prompts ("striped red-gold star", "person in checkered blue-pink clothes").
    pub fn describe(self) -> String {
        let (adjective, colours) = (self.pattern.adjective(), self.palette.words());
        match self.category() {
            Category::Human => format!("{} in {adjective} {colours} clothes", self.shape.noun()),
            Category::Object | Category::Animal => format!("{adjective} {colours} {}", self.shape.noun()),
        }
    }

    /// Colour (sRGB, 0–255 floats) of `part` at local point `(u, v)`.
    pub(super) fn colour(self, part: Part, u: f32, v: f32) -> [f32; 3] {
        let (primary, secondary) = self.palette.colours();
        let (p, s) = (rgb_f32(primary), rgb_f32(secondary));
        match part {
            Part::Body => {
                let t = self.pattern.secondary_weight(u, v);
                [0, 1, 2].map(|i| p[i] + (s[i] - p[i]) * t)
            }
            Part::Accent => s,
            Part::Eye => {
                if luminance(p) > 70.0 {
                    [24.0, 24.0, 30.0]
                } else {
                    [240.0, 240.0, 236.0]
                }
            }
            Part::Skin => [236.0, 194.0, 160.0],
            Part::Hair => [74.0, 46.0, 28.0],
        }
    }
}

fn rgb_f32(c: [u8; 3]) -> [f32; 3] {
    c.map(f32::from)
}

fn luminance(c: [f32; 3]) -> f32 {
    0.299 * c[0] + 0.587 * c[1] + 0.114 * c[2]
}

/// Which part of a subject a point belongs to; decides its colour.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Part {
    /// Patterned with the palette.
    Body,
    /// The palette's secondary colour (ears, beak, fins, hat).
    Accent,
    /// Eyes (dark, or light on dark palettes).
    Eye,
    /// Skin (faces).
    Skin,
    /// Hair.
    Hair,
}

fn circle(u: f32, v: f32, cu: f32, cv: f32, r: f32) -> bool {
    let (du, dv) = (u - cu, v - cv);
    du * du + dv * dv <= r * r
}

fn ellipse(u: f32, v: f32, cu: f32, cv: f32, ru: f32, rv: f32) -> bool {
    let (du, dv) = ((u - cu) / ru, (v - cv) / rv);
    du * du + dv * dv <= 1.0
}

fn rect(u: f32, v: f32, u0: f32, v0: f32, u1: f32, v1: f32) -> bool {
    (u0..=u1).contains(&u) && (v0..=v1).contains(&v)
}

/// Inside the triangle `a, b, c` (either orientation).
fn triangle(u: f32, v: f32, a: [f32; 2], b: [f32; 2], c: [f32; 2]) -> bool {
    let side = |p: [f32; 2], q: [f32; 2]| (q[0] - p[0]) * (v - p[1]) - (q[1] - p[1]) * (u - p[0]);
    let (d1, d2, d3) = (side(a, b), side(b, c), side(c, a));
    let has_neg = d1 < 0.0 || d2 < 0.0 || d3 < 0.0;
    let has_pos = d1 > 0.0 || d2 > 0.0 || d3 > 0.0;
    !(has_neg && has_pos)
}

/// Even-odd point-in-polygon test.
fn polygon(u: f32, v: f32, points: &[[f32; 2]]) -> bool {
    let mut inside = false;
    let mut j = points.len().wrapping_sub(1);
    for (i, pi) in points.iter().enumerate() {
        if let Some(pj) = points.get(j)
            && (pi[1] > v) != (pj[1] > v)
            && u < (pj[0] - pi[0]) * (v - pi[1]) / (pj[1] - pi[1]) + pi[0]
        {
            inside = !inside;
        }
        j = i;
    }
    inside
}

static STAR: LazyLock<[[f32; 2]; 10]> = LazyLock::new(|| {
    let (outer, inner, shift) = (1.0f32, 0.42f32, 0.095f32);
    std::array::from_fn(|k| {
        let angle = -std::f32::consts::FRAC_PI_2 + k as f32 * std::f32::consts::PI / 5.0;
        let r = if k % 2 == 0 { outer } else { inner };
        [r * angle.cos(), r * angle.sin() + shift]
    })
});

/// Torso of the head-and-shoulders humans.
fn torso(u: f32, v: f32) -> bool {
    (0.02..=1.0).contains(&v) && ellipse(u, v, 0.0, 0.78, 0.86, 0.74)
}

/// The part of `shape` at local point `(u, v)`, or `None` outside the silhouette.
pub(super) fn part_at(shape: Shape, u: f32, v: f32) -> Option<Part> {
    let body = |inside: bool| inside.then_some(Part::Body);
    match shape {
        Shape::Circle => body(circle(u, v, 0.0, 0.0, 0.95)),
        Shape::Square => {
            let (du, dv) = ((u.abs() - 0.68).max(0.0), (v.abs() - 0.68).max(0.0));
            body(du * du + dv * dv <= 0.2 * 0.2)
        }
        Shape::Triangle => body(triangle(u, v, [0.0, -0.95], [-0.98, 0.78], [0.98, 0.78])),
        Shape::Star => body(polygon(u, v, &*STAR)),
        Shape::Ring => {
            let r2 = u * u + v * v;
            body((0.52 * 0.52..=0.95 * 0.95).contains(&r2))
        }
        Shape::Diamond => body(u.abs() / 0.78 + v.abs() / 0.97 <= 1.0),
        Shape::Heart => {
            let (x, y) = (u * 1.2, 0.1 - v * 1.2);
            let a = x * x + y * y - 1.0;
            body(a * a * a - x * x * y * y * y <= 0.0)
        }
        Shape::Cross => body((u.abs() <= 0.3 && v.abs() <= 0.95) || (v.abs() <= 0.3 && u.abs() <= 0.95)),
        Shape::Cat => cat(u, v),
        Shape::Rabbit => rabbit(u, v),
        Shape::Fish => fish(u, v),
        Shape::Bird => bird(u, v),
        Shape::Person | Shape::LongHairedPerson | Shape::PersonWithHat => human(shape, u, v),
    }
}

fn cat(u: f32, v: f32) -> Option<Part> {
    if circle(u, v, -0.16, -0.36, 0.075) || circle(u, v, 0.16, -0.36, 0.075) {
        return Some(Part::Eye);
    }
    let inner_ear = triangle(u, v, [-0.36, -0.62], [-0.31, -0.86], [-0.16, -0.7])
        || triangle(u, v, [0.36, -0.62], [0.31, -0.86], [0.16, -0.7]);
    if inner_ear {
        return Some(Part::Accent);
    }
    let head = circle(u, v, 0.0, -0.38, 0.4);
    let ears = triangle(u, v, [-0.44, -0.52], [-0.34, -0.98], [-0.06, -0.74])
        || triangle(u, v, [0.44, -0.52], [0.34, -0.98], [0.06, -0.74]);
    let trunk = ellipse(u, v, -0.1, 0.45, 0.54, 0.52);
    // A tail curling up on the right: the right half of a thick ring, its lower end inside the trunk.
    let (du, dv) = (u - 0.4, v - 0.36);
    let r2 = du * du + dv * dv;
    let tail = (0.24 * 0.24..=0.4 * 0.4).contains(&r2) && du >= 0.0;
    if head || ears || trunk {
        return Some(Part::Body);
    }
    tail.then_some(Part::Accent)
}

fn rabbit(u: f32, v: f32) -> Option<Part> {
    if circle(u, v, -0.13, -0.12, 0.065) || circle(u, v, 0.13, -0.12, 0.065) {
        return Some(Part::Eye);
    }
    if ellipse(u, v, -0.17, -0.63, 0.05, 0.24) || ellipse(u, v, 0.17, -0.63, 0.05, 0.24) {
        return Some(Part::Accent);
    }
    let head = circle(u, v, 0.0, -0.1, 0.34);
    let ears = ellipse(u, v, -0.17, -0.6, 0.12, 0.37) || ellipse(u, v, 0.17, -0.6, 0.12, 0.37);
    let trunk = ellipse(u, v, 0.0, 0.58, 0.5, 0.4);
    if head || ears || trunk {
        return Some(Part::Body);
    }
    circle(u, v, 0.48, 0.78, 0.16).then_some(Part::Accent)
}

fn fish(u: f32, v: f32) -> Option<Part> {
    if circle(u, v, -0.48, -0.1, 0.085) {
        return Some(Part::Eye);
    }
    if ellipse(u, v, -0.12, 0.0, 0.7, 0.46) {
        return Some(Part::Body);
    }
    let tail = triangle(u, v, [0.42, 0.0], [0.97, -0.52], [0.97, 0.52]);
    let fin = triangle(u, v, [-0.3, -0.36], [0.22, -0.36], [0.1, -0.72]);
    (tail || fin).then_some(Part::Accent)
}

fn bird(u: f32, v: f32) -> Option<Part> {
    if circle(u, v, -0.42, -0.46, 0.075) {
        return Some(Part::Eye);
    }
    if triangle(u, v, [-0.6, -0.5], [-0.97, -0.36], [-0.6, -0.26]) {
        return Some(Part::Accent);
    }
    if ellipse(u, v, 0.12, 0.12, 0.36, 0.22) {
        return Some(Part::Accent);
    }
    let head = circle(u, v, -0.34, -0.4, 0.31);
    let trunk = ellipse(u, v, 0.02, 0.15, 0.56, 0.46);
    let tail = triangle(u, v, [0.4, -0.02], [0.97, -0.3], [0.92, 0.14]);
    let legs = rect(u, v, -0.14, 0.55, -0.06, 0.9) || rect(u, v, 0.08, 0.55, 0.16, 0.9);
    if head || trunk || tail {
        return Some(Part::Body);
    }
    legs.then_some(Part::Accent)
}

fn human(shape: Shape, u: f32, v: f32) -> Option<Part> {
    let (head_v, head_r) = if shape == Shape::PersonWithHat {
        (-0.3, 0.3)
    } else {
        (-0.42, 0.32)
    };
    if circle(u, v, -0.11, head_v + 0.02, 0.05) || circle(u, v, 0.11, head_v + 0.02, 0.05) {
        return Some(Part::Eye);
    }
    match shape {
        Shape::PersonWithHat => {
            if rect(u, v, -0.52, -0.64, 0.52, -0.54) || rect(u, v, -0.3, -0.98, 0.3, -0.6) {
                return Some(Part::Accent);
            }
        }
        Shape::LongHairedPerson => {
            if circle(u, v, 0.0, head_v, head_r) && v < head_v - 0.12 {
                return Some(Part::Hair);
            }
        }
        _ => {
            if circle(u, v, 0.0, head_v - 0.04, head_r + 0.02) && v < head_v - 0.14 {
                return Some(Part::Hair);
            }
        }
    }
    let head = circle(u, v, 0.0, head_v, head_r);
    let neck = rect(u, v, -0.11, head_v + head_r - 0.06, 0.11, 0.1);
    if head || (neck && !torso(u, v)) {
        return Some(Part::Skin);
    }
    if torso(u, v) {
        return Some(Part::Body);
    }
    // Long hair falls behind the head, neck and shoulders.
    (shape == Shape::LongHairedPerson && ellipse(u, v, 0.0, head_v + 0.2, 0.46, 0.6)).then_some(Part::Hair)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_round_trip_and_are_dense() {
        let all = Identity::all();
        assert_eq!(all.len(), Identity::COUNT);
        for (i, identity) in all.iter().enumerate() {
            assert_eq!(identity.id() as usize, i);
            assert_eq!(Identity::from_id(identity.id()), Some(*identity));
        }
        assert_eq!(Identity::from_id(Identity::COUNT as u32), None);
    }

    #[test]
    fn every_category_has_at_least_three_shapes() {
        for c in Category::ALL {
            assert!(Shape::of_category(c).len() >= 3, "{c:?}");
        }
    }

    #[test]
    fn shapes_fit_the_unit_square_and_are_substantial() {
        let n = 200;
        for shape in Shape::ALL {
            let mut inside = 0;
            for j in 0..n {
                for i in 0..n {
                    let u = -1.0 + 2.0 * (i as f32 + 0.5) / n as f32;
                    let v = -1.0 + 2.0 * (j as f32 + 0.5) / n as f32;
                    if part_at(shape, u, v).is_some() {
                        inside += 1;
                    }
                }
            }
            let fraction = inside as f32 / (n * n) as f32;
            assert!(fraction > 0.2, "{shape:?} covers only {fraction}");
            // Nothing outside the unit square (probe a frame just outside it).
            for k in 0..n {
                let t = -1.2 + 2.4 * k as f32 / n as f32;
                for (u, v) in [(t, -1.01), (t, 1.01), (-1.01, t), (1.01, t)] {
                    assert!(part_at(shape, u, v).is_none(), "{shape:?} at ({u}, {v})");
                }
            }
        }
    }
}
