//! The fused weight map `M` (paper Alg. 1 steps 2–3, Eq. 9, Eq. 11) and the ablation variants of §5.3 / A.2.
//!
//! * [`focus_coverage`]: `A_focus = ‖M_s‖₁ / ‖M_prior‖₁` (Alg. 1, line 10).
//! * [`fuse_eq9`]: Eq. 9, the FocusDPO fusion.
//! * [`fuse_eq11`]: Eq. 11, Configuration III (`M_d` not constrained by `M_prior`).
//! * [`fuse`]: dispatch over every [`MaskVariant`] by name.
//!
//! **Empty prior.** If `‖M_prior‖₁ = 0` (no subject token; possible when a small subject vanishes at a coarse
//! token grid), `M_s = M_prior \ M'` is empty too and `A_focus` is `0/0`. We define `A_focus = 0`; the
//! equations then apply unchanged, e.g. Eq. 9 takes its blend branch and gives `M = 0` (no FocusDPO signal from
//! that pair — its loss is the constant `−log σ(0)`), while Eq. 11 gives `(1−γ)·M_d`.
//!
//! **Ties.** Eq. 9 switches on a strict `A_focus > τ`; `A_focus = τ` takes the blend branch.

use std::fmt;
use std::str::FromStr;

use super::{Grid, MaskError};

/// Which weight map the objective uses. Names are the ones accepted on the command line and in configs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum MaskVariant {
    /// Eq. 9 (FocusDPO).
    #[default]
    Focus,
    /// `M = 1`: plain Diffusion-DPO (Eq. 1).
    Uniform,
    /// Configuration I (A.2): `M = M_prior`.
    Prior,
    /// Configuration II (A.2): `M = M_d`.
    Complexity,
    /// Configuration III (A.2, Eq. 11): the Eq. 9 switch with `M_d` unconstrained by `M_prior`.
    Unconstrained,
    /// §5.3.1 w/o `M_s`: `M = M_d ⊙ M_prior`.
    NoMs,
    /// §5.3.1 w/o `M_d`: `M = M_s`.
    NoMd,
}

impl MaskVariant {
    /// Every variant, in display order.
    pub const ALL: [MaskVariant; 7] = [
        MaskVariant::Focus,
        MaskVariant::Uniform,
        MaskVariant::Prior,
        MaskVariant::Complexity,
        MaskVariant::Unconstrained,
        MaskVariant::NoMs,
        MaskVariant::NoMd,
    ];

    /// The variant's name (`focus`, `uniform`, `prior`, `complexity`, `unconstrained`, `no-ms`, `no-md`).
    pub fn name(self) -> &'static str {
        match self {
            MaskVariant::Focus => "focus",
            MaskVariant::Uniform => "uniform",
            MaskVariant::Prior => "prior",
            MaskVariant::Complexity => "complexity",
            MaskVariant::Unconstrained => "unconstrained",
            MaskVariant::NoMs => "no-ms",
            MaskVariant::NoMd => "no-md",
        }
    }

    /// The formula, for tooltips and reports.
    pub fn formula(self) -> &'static str {
        match self {
            MaskVariant::Focus => "Eq. 9: M_s if A_focus > τ, else γ·M_s + (1−γ)·M_d⊙M_prior",
            MaskVariant::Uniform => "M = 1 (Diffusion-DPO, Eq. 1)",
            MaskVariant::Prior => "M = M_prior (Config I)",
            MaskVariant::Complexity => "M = M_d (Config II)",
            MaskVariant::Unconstrained => "Eq. 11: M_s if A_focus > τ, else γ·M_s + (1−γ)·M_d (Config III)",
            MaskVariant::NoMs => "M = M_d⊙M_prior (w/o M_s)",
            MaskVariant::NoMd => "M = M_s (w/o M_d)",
        }
    }

    /// Whether the variant needs the attention field `M_s`.
    pub fn needs_attention_field(self) -> bool {
        matches!(
            self,
            MaskVariant::Focus | MaskVariant::Unconstrained | MaskVariant::NoMd
        )
    }

    /// Whether the variant switches on `A_focus` vs τ.
    pub fn switches_on_coverage(self) -> bool {
        matches!(self, MaskVariant::Focus | MaskVariant::Unconstrained)
    }
}

impl fmt::Display for MaskVariant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// An unknown variant name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown mask variant \"{0}\" (known: focus, uniform, prior, complexity, unconstrained, no-ms, no-md)")]
pub struct UnknownVariant(pub String);

impl TryFrom<String> for MaskVariant {
    type Error = UnknownVariant;
    fn try_from(s: String) -> Result<Self, UnknownVariant> {
        s.parse()
    }
}

impl From<MaskVariant> for String {
    fn from(v: MaskVariant) -> String {
        v.name().to_string()
    }
}

impl FromStr for MaskVariant {
    type Err = UnknownVariant;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let key = s.trim().to_ascii_lowercase().replace('_', "-");
        MaskVariant::ALL
            .into_iter()
            .find(|v| v.name() == key)
            .ok_or_else(|| UnknownVariant(s.to_string()))
    }
}

/// Parameters of the fusion.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FusionParams {
    /// Which map to build.
    pub variant: MaskVariant,
    /// Focus coverage threshold τ (paper default 0.1), in `[0, 1]`.
    pub tau: f32,
    /// Fusion coefficient γ (paper default 0.3), in `[0, 1]`.
    pub gamma: f32,
}

impl Default for FusionParams {
    fn default() -> Self {
        Self {
            variant: MaskVariant::Focus,
            tau: 0.1,
            gamma: 0.3,
        }
    }
}

impl FusionParams {
    /// Errors unless τ and γ are finite and in `[0, 1]`.
    pub fn validate(&self) -> Result<(), MaskError> {
        for (name, value) in [("τ", self.tau), ("γ", self.gamma)] {
            if !(0.0..=1.0).contains(&value) {
                return Err(MaskError::OutOfRange {
                    name,
                    value: f64::from(value),
                    range: "[0, 1]",
                });
            }
        }
        Ok(())
    }
}

/// Which case of Eq. 9 / Eq. 11 produced `M`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Branch {
    /// `A_focus > τ`: `M = M_s`.
    AttentionOnly,
    /// `A_focus ≤ τ`: `M = γ·M_s + (1−γ)·(…)`.
    Blend,
    /// The variant has no switch.
    Static,
}

impl Branch {
    /// Short name for logs.
    pub fn name(self) -> &'static str {
        match self {
            Branch::AttentionOnly => "attention",
            Branch::Blend => "blend",
            Branch::Static => "static",
        }
    }
}

/// The token-grid inputs of the fusion for one image (all the same shape).
#[derive(Clone, Copy, Debug)]
pub struct MaskInputs<'a> {
    /// `M_prior` (union over subjects).
    pub m_prior: &'a Grid,
    /// `M_d` (Eq. 8).
    pub m_d: &'a Grid,
    /// `M_s` (Eq. 6), when available; required by the variants that use it.
    pub m_s: Option<&'a Grid>,
}

/// The fused map with what the paper logs about it.
#[derive(Clone, Debug, PartialEq)]
pub struct FusionOutput {
    /// The weight map `M`.
    pub mask: Grid,
    /// `A_focus`, whenever `M_s` was given (also for variants that do not use it, for logging).
    pub a_focus: Option<f32>,
    /// Which case produced `M`.
    pub branch: Branch,
}

/// Alg. 1, line 10: `A_focus = ‖M_s‖₁ / ‖M_prior‖₁`, defined as 0 when `‖M_prior‖₁ = 0` (module docs).
pub fn focus_coverage(m_s: &Grid, m_prior: &Grid) -> Result<f32, MaskError> {
    m_s.expect_shape(m_prior.shape())?;
    let prior = m_prior.l1_norm();
    Ok(if prior == 0.0 {
        0.0
    } else {
        (m_s.l1_norm() / prior) as f32
    })
}

/// The shared switch of Eq. 9 and Eq. 11: `M_s` if `A_focus > τ`, else `γ·M_s + (1−γ)·detail`.
fn switch_or_blend(m_s: &Grid, detail: &Grid, a_focus: f32, tau: f32, gamma: f32) -> Result<(Grid, Branch), MaskError> {
    if a_focus > tau {
        Ok((m_s.clone(), Branch::AttentionOnly))
    } else {
        Ok((
            m_s.zip_with(detail, |s, d| gamma * s + (1.0 - gamma) * d)?,
            Branch::Blend,
        ))
    }
}

/// Eq. 9: `M = M_s` if `A_focus > τ`, else `γ·M_s + (1−γ)·M_d ⊙ M_prior`.
pub fn fuse_eq9(
    m_s: &Grid,
    m_d: &Grid,
    m_prior: &Grid,
    tau: f32,
    gamma: f32,
) -> Result<(Grid, Branch, f32), MaskError> {
    let a_focus = focus_coverage(m_s, m_prior)?;
    let (m, branch) = switch_or_blend(m_s, &m_d.hadamard(m_prior)?, a_focus, tau, gamma)?;
    Ok((m, branch, a_focus))
}

/// Eq. 11 (Configuration III): `M = M_s` if `A_focus > τ`, else `γ·M_s + (1−γ)·M_d`. `A_focus` is still
/// measured against `M_prior` (Alg. 1 line 10), which only this ratio keeps.
pub fn fuse_eq11(
    m_s: &Grid,
    m_d: &Grid,
    m_prior: &Grid,
    tau: f32,
    gamma: f32,
) -> Result<(Grid, Branch, f32), MaskError> {
    let a_focus = focus_coverage(m_s, m_prior)?;
    m_d.expect_shape(m_prior.shape())?;
    let (m, branch) = switch_or_blend(m_s, m_d, a_focus, tau, gamma)?;
    Ok((m, branch, a_focus))
}

/// Builds `M` for any variant. Errors on mismatched shapes, τ/γ out of range, or a missing `M_s` for a variant
/// that needs it.
pub fn fuse(params: &FusionParams, inputs: &MaskInputs<'_>) -> Result<FusionOutput, MaskError> {
    params.validate()?;
    let MaskInputs { m_prior, m_d, m_s } = *inputs;
    m_d.expect_shape(m_prior.shape())?;
    let a_focus = m_s.map(|s| focus_coverage(s, m_prior)).transpose()?;
    let need_ms = || m_s.ok_or(MaskError::MissingAttentionField(params.variant.name()));
    let (tau, gamma) = (params.tau, params.gamma);
    let fixed = |mask: Grid| (mask, Branch::Static);
    let (mask, branch) = match params.variant {
        MaskVariant::Focus => {
            let (m, b, _) = fuse_eq9(need_ms()?, m_d, m_prior, tau, gamma)?;
            (m, b)
        }
        MaskVariant::Unconstrained => {
            let (m, b, _) = fuse_eq11(need_ms()?, m_d, m_prior, tau, gamma)?;
            (m, b)
        }
        MaskVariant::Uniform => fixed(Grid::ones(m_prior.height(), m_prior.width())),
        MaskVariant::Prior => fixed(m_prior.clone()),
        MaskVariant::Complexity => fixed(m_d.clone()),
        MaskVariant::NoMs => fixed(m_d.hadamard(m_prior)?),
        MaskVariant::NoMd => fixed(need_ms()?.clone()),
    };
    Ok(FusionOutput { mask, a_focus, branch })
}

crate::config_enum!(no_from_str MaskVariant, MaskVariant::ALL);

#[cfg(test)]
mod tests {
    use super::*;

    fn g(rows: &[&[f32]]) -> Grid {
        let h = rows.len();
        let w = rows[0].len();
        Grid::new(h, w, rows.concat()).unwrap()
    }

    /// 2×3 grids used by the hand computations below.
    /// M_prior = [1 1 0; 1 1 0] (‖·‖₁ = 4), M_d = [0 .5 1; .25 .75 0].
    fn prior() -> Grid {
        g(&[&[1., 1., 0.], &[1., 1., 0.]])
    }
    fn detail() -> Grid {
        g(&[&[0., 0.5, 1.], &[0.25, 0.75, 0.]])
    }
    /// M_s with one token: A_focus = 1/4 = 0.25.
    fn ms_one() -> Grid {
        g(&[&[0., 1., 0.], &[0., 0., 0.]])
    }

    fn run(variant: MaskVariant, m_s: Option<&Grid>, tau: f32, gamma: f32) -> FusionOutput {
        let (p, d) = (prior(), detail());
        fuse(
            &FusionParams { variant, tau, gamma },
            &MaskInputs {
                m_prior: &p,
                m_d: &d,
                m_s,
            },
        )
        .unwrap()
    }

    #[test]
    fn a_focus_hand_computed() {
        assert_eq!(focus_coverage(&ms_one(), &prior()).unwrap(), 0.25);
        assert_eq!(focus_coverage(&Grid::zeros(2, 3), &prior()).unwrap(), 0.0);
    }

    #[test]
    fn eq9_attention_branch_when_coverage_exceeds_tau() {
        // A_focus = 0.25 > τ = 0.1 → M = M_s.
        let out = run(MaskVariant::Focus, Some(&ms_one()), 0.1, 0.3);
        assert_eq!(out.branch, Branch::AttentionOnly);
        assert_eq!(out.a_focus, Some(0.25));
        assert_eq!(out.mask, ms_one());
    }

    #[test]
    fn eq9_blend_branch_hand_computed() {
        // A_focus = 0.25 ≤ τ = 0.5 → M = 0.3·M_s + 0.7·(M_d ⊙ M_prior)
        // M_d⊙M_prior = [0 .5 0; .25 .75 0]
        // M = [0, .3+.35, 0; .175, .525, 0] = [0 .65 0; .175 .525 0]
        let out = run(MaskVariant::Focus, Some(&ms_one()), 0.5, 0.3);
        assert_eq!(out.branch, Branch::Blend);
        let want = [0.0, 0.65, 0.0, 0.175, 0.525, 0.0];
        for (a, b) in out.mask.as_slice().iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", out.mask);
        }
    }

    #[test]
    fn eq9_tie_takes_the_blend_branch() {
        let out = run(MaskVariant::Focus, Some(&ms_one()), 0.25, 0.3);
        assert_eq!(out.branch, Branch::Blend);
    }

    #[test]
    fn eq11_blend_uses_unconstrained_md() {
        // M = 0.3·M_s + 0.7·M_d = [0, .3+.35, .7; .175, .525, 0]
        let out = run(MaskVariant::Unconstrained, Some(&ms_one()), 0.5, 0.3);
        assert_eq!(out.branch, Branch::Blend);
        let want = [0.0, 0.65, 0.7, 0.175, 0.525, 0.0];
        for (a, b) in out.mask.as_slice().iter().zip(want) {
            assert!((a - b).abs() < 1e-6, "{:?}", out.mask);
        }
        let hi = run(MaskVariant::Unconstrained, Some(&ms_one()), 0.1, 0.3);
        assert_eq!((hi.branch, hi.mask), (Branch::AttentionOnly, ms_one()));
    }

    #[test]
    fn static_variants_hand_computed() {
        let ms = ms_one();
        assert_eq!(run(MaskVariant::Uniform, None, 0.1, 0.3).mask, Grid::ones(2, 3));
        assert_eq!(run(MaskVariant::Prior, None, 0.1, 0.3).mask, prior());
        assert_eq!(run(MaskVariant::Complexity, None, 0.1, 0.3).mask, detail());
        assert_eq!(
            run(MaskVariant::NoMs, None, 0.1, 0.3).mask,
            g(&[&[0., 0.5, 0.], &[0.25, 0.75, 0.]])
        );
        let no_md = run(MaskVariant::NoMd, Some(&ms), 0.1, 0.3);
        assert_eq!(
            (no_md.mask, no_md.branch, no_md.a_focus),
            (ms, Branch::Static, Some(0.25))
        );
    }

    #[test]
    fn empty_prior_gives_zero_coverage_and_defined_masks() {
        let (p, d, s) = (Grid::zeros(2, 3), detail(), Grid::zeros(2, 3));
        let inputs = MaskInputs {
            m_prior: &p,
            m_d: &d,
            m_s: Some(&s),
        };
        let focus = fuse(&FusionParams::default(), &inputs).unwrap();
        assert_eq!((focus.a_focus, focus.branch), (Some(0.0), Branch::Blend));
        assert_eq!(focus.mask, Grid::zeros(2, 3));
        let unc = fuse(
            &FusionParams {
                variant: MaskVariant::Unconstrained,
                ..Default::default()
            },
            &inputs,
        )
        .unwrap();
        assert_eq!(unc.mask, d.map(|v| 0.7 * v));
        assert!(unc.mask.as_slice().iter().all(|v| v.is_finite()));
    }

    #[test]
    fn missing_ms_shape_mismatch_and_bad_params_are_errors() {
        let (p, d) = (prior(), detail());
        let no_ms = MaskInputs {
            m_prior: &p,
            m_d: &d,
            m_s: None,
        };
        for v in [MaskVariant::Focus, MaskVariant::Unconstrained, MaskVariant::NoMd] {
            let e = fuse(
                &FusionParams {
                    variant: v,
                    ..Default::default()
                },
                &no_ms,
            )
            .unwrap_err();
            assert_eq!(e, MaskError::MissingAttentionField(v.name()));
        }
        let wrong = Grid::zeros(3, 2);
        let bad = MaskInputs {
            m_prior: &p,
            m_d: &d,
            m_s: Some(&wrong),
        };
        assert!(matches!(
            fuse(&FusionParams::default(), &bad),
            Err(MaskError::ShapeMismatch { .. })
        ));
        let e = fuse(
            &FusionParams {
                gamma: 1.5,
                ..Default::default()
            },
            &no_ms,
        )
        .unwrap_err();
        assert!(matches!(e, MaskError::OutOfRange { name: "γ", .. }));
    }

    #[test]
    fn variant_names_round_trip() {
        for v in MaskVariant::ALL {
            assert_eq!(v.name().parse::<MaskVariant>(), Ok(v));
        }
        assert_eq!("No_MS".parse::<MaskVariant>(), Ok(MaskVariant::NoMs));
        assert!("focal".parse::<MaskVariant>().is_err());
    }
}
