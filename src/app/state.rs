//! What the Studio remembers between launches (eframe persistence) and the small value types its panels share.

use std::path::PathBuf;

use crate::masks::FusionParams;
use crate::train::RunConfig;
use crate::train::config::AttentionConfig;

/// Timesteps of the timeline: `T = 0, 50, …, 1000` (`t = T / 1000`), the grid on which `M_s` and `A_focus` are
/// computed and cached per item.
pub const TIMESTEPS: [u32; 21] = {
    let mut out = [0u32; 21];
    let mut i = 0;
    while i < 21 {
        out[i] = i as u32 * 50;
        i += 1;
    }
    out
};

/// Schedule fraction `t ∈ [0, 1]` of timeline index `index` (clamped to the grid).
pub fn t_of_index(index: usize) -> f32 {
    TIMESTEPS[index.min(TIMESTEPS.len() - 1)] as f32 / 1000.0
}

/// Colour scale of the mask overlay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Colormap {
    /// matplotlib's viridis.
    #[default]
    Viridis,
    /// matplotlib's magma.
    Magma,
    /// Black to white.
    Grey,
}

impl Colormap {
    /// Every colormap, in menu order.
    pub const ALL: [Colormap; 3] = [Colormap::Viridis, Colormap::Magma, Colormap::Grey];

    /// Menu label.
    pub fn label(self) -> &'static str {
        match self {
            Colormap::Viridis => "viridis",
            Colormap::Magma => "magma",
            Colormap::Grey => "grey",
        }
    }
}

/// How a mask is drawn over an image.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct ViewSettings {
    /// Colour scale.
    pub colormap: Colormap,
    /// Mask opacity in `[0, 1]`.
    pub opacity: f32,
    /// Bilinear between token centres instead of nearest (one flat colour per token).
    pub smooth: bool,
    /// Draw the border of the `M_prior` tokens.
    pub contour: bool,
}

impl Default for ViewSettings {
    fn default() -> Self {
        Self {
            colormap: Colormap::Viridis,
            opacity: 0.6,
            smooth: false,
            contour: true,
        }
    }
}

/// Which map the inspector draws.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum MaskKind {
    /// `M_prior` (§4).
    Prior,
    /// `M_s(t)` from the backbone (Eq. 3–6).
    Attention,
    /// `M_d` (Eq. 7–8).
    Complexity,
    /// The fused `M(t)` of the chosen variant (Eq. 9 / 11 / ablations).
    #[default]
    Fused,
}

impl MaskKind {
    /// Every kind, in menu order.
    pub const ALL: [MaskKind; 4] = [
        MaskKind::Prior,
        MaskKind::Attention,
        MaskKind::Complexity,
        MaskKind::Fused,
    ];

    /// Label.
    pub fn label(self) -> &'static str {
        match self {
            MaskKind::Prior => "M_prior",
            MaskKind::Attention => "M_s(t)",
            MaskKind::Complexity => "M_d",
            MaskKind::Fused => "M(t)",
        }
    }
}

/// Per subject or union over subjects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SubjectChoice {
    /// Union (cell-wise max) over subjects.
    #[default]
    Union,
    /// One subject (0-based).
    Subject(usize),
}

/// Which items the list shows.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum SubjectFilter {
    /// Every item.
    #[default]
    All,
    /// One-subject items.
    Single,
    /// Items with two or more subjects.
    Multi,
}

impl SubjectFilter {
    /// Whether an item with `subjects` subjects passes.
    pub fn accepts(self, subjects: usize) -> bool {
        match self {
            SubjectFilter::All => true,
            SubjectFilter::Single => subjects == 1,
            SubjectFilter::Multi => subjects > 1,
        }
    }
}

/// The training form: a run name and the run config itself (the Studio edits the config type, knob by knob from
/// the registry; the inspector's dataset and backbone are filled in at start).
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct TrainingForm {
    /// Folder name under the runs folder.
    pub name: String,
    /// The run's config.
    pub config: RunConfig,
}

impl Default for TrainingForm {
    fn default() -> Self {
        Self {
            name: "studio".into(),
            config: RunConfig {
                steps: 20,
                // A checkpoint, and a sample sheet (base beside the run), every 10 steps.
                log: crate::train::config::LogConfig {
                    checkpoint_every: 10,
                    ..Default::default()
                },
                samples: crate::train::samples::SampleSheetConfig {
                    items: 3,
                    ..Default::default()
                },
                ..RunConfig::default()
            },
        }
    }
}

/// How the Training tab draws its curves.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PlotSettings {
    /// Weight of the debiased exponential moving average drawn over each curve (TensorBoard's smoothing: 0 = the
    /// raw values, 0.99 = very smooth); the raw values stay behind it, faint.
    pub smoothing: f64,
}

impl Default for PlotSettings {
    fn default() -> Self {
        Self { smoothing: 0.6 }
    }
}

/// Everything persisted between launches.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Last opened dataset folder (None = the bundled one).
    pub dataset_dir: Option<PathBuf>,
    /// Selected item id.
    pub item: Option<String>,
    /// Overlay drawing.
    pub view: ViewSettings,
    /// Which map.
    pub mask: MaskKind,
    /// Union or one subject.
    pub subject: SubjectChoice,
    /// Item list filter.
    pub filter: SubjectFilter,
    /// Variant, τ, γ of the inspector's fusion.
    pub fusion: FusionParams,
    /// `M_s` source, layers, similarity and pooling (the run config's own type).
    pub attention: AttentionConfig,
    /// Timeline position (index into [`TIMESTEPS`]).
    pub t_index: usize,
    /// Training form.
    pub training: TrainingForm,
    /// The Training tab's curves.
    pub plots: PlotSettings,
    /// Experiments tab: last plan, seeds, steps.
    pub experiments: super::experiments::ExperimentSettings,
    /// Last opened backbone profile (a TOML file or a FLUX.1 folder; None = the bundled base).
    pub backbone_path: Option<PathBuf>,
}

/// Which central tab is shown.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Tab {
    /// Masks of one item.
    #[default]
    Inspector,
    /// Runs and their curves.
    Training,
    /// Ablation plans: the resolved grid, its runs and results.
    Experiments,
}

/// Pan and zoom of the image views (shared by winner and loser so they stay aligned).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct PanZoom {
    /// Magnification (1 = the image fits the widget).
    pub zoom: f32,
    /// Image uv at the widget's centre.
    pub centre: [f32; 2],
}

impl Default for PanZoom {
    fn default() -> Self {
        Self {
            zoom: 1.0,
            centre: [0.5, 0.5],
        }
    }
}

impl PanZoom {
    /// Image uv of the widget's top-left corner and image uv per widget uv.
    pub fn uv_transform(&self) -> ([f32; 2], [f32; 2]) {
        let per = 1.0 / self.zoom;
        ([self.centre[0] - 0.5 * per, self.centre[1] - 0.5 * per], [per, per])
    }

    /// Moves the view by a drag of `delta` widget fractions.
    pub fn pan_by_widget_fraction(&mut self, delta: [f32; 2]) {
        let per = 1.0 / self.zoom;
        self.centre[0] = (self.centre[0] - delta[0] * per).clamp(0.0, 1.0);
        self.centre[1] = (self.centre[1] - delta[1] * per).clamp(0.0, 1.0);
    }

    /// Zooms by `factor` keeping the image point under `anchor` (widget fraction) fixed; zoom stays in [1, 32].
    pub fn zoom_about(&mut self, factor: f32, anchor: [f32; 2]) {
        let (origin, per) = self.uv_transform();
        let under = [origin[0] + anchor[0] * per[0], origin[1] + anchor[1] * per[1]];
        self.zoom = (self.zoom * factor).clamp(1.0, 32.0);
        let per = 1.0 / self.zoom;
        self.centre = [under[0] - (anchor[0] - 0.5) * per, under[1] - (anchor[1] - 0.5) * per];
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timesteps_span_the_schedule() {
        assert_eq!(TIMESTEPS[0], 0);
        assert_eq!(TIMESTEPS[20], 1000);
        assert_eq!(t_of_index(10), 0.5);
        assert_eq!(t_of_index(99), 1.0);
    }

    #[test]
    fn zoom_keeps_the_anchor_fixed() {
        let mut pz = PanZoom::default();
        let anchor = [0.25, 0.75];
        let before = {
            let (o, p) = pz.uv_transform();
            [o[0] + anchor[0] * p[0], o[1] + anchor[1] * p[1]]
        };
        pz.zoom_about(4.0, anchor);
        let (o, p) = pz.uv_transform();
        let after = [o[0] + anchor[0] * p[0], o[1] + anchor[1] * p[1]];
        assert!((before[0] - after[0]).abs() < 1e-6 && (before[1] - after[1]).abs() < 1e-6);
        assert_eq!(pz.zoom, 4.0);
    }

    #[test]
    fn filter_by_subject_count() {
        assert!(SubjectFilter::Single.accepts(1) && !SubjectFilter::Single.accepts(2));
        assert!(SubjectFilter::Multi.accepts(3) && !SubjectFilter::Multi.accepts(1));
    }
}
