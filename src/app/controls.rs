//! The controls panel: fusion (τ, γ, variant), the `M_s` source and layers, what is drawn and how, and the
//! numbers of the item at the current timestep.

use super::state::{Colormap, MaskKind, SubjectChoice, TIMESTEPS};
use super::{StudioApp, chosen_map, knob_ui};
use crate::masks::MaskVariant;
use crate::train::config::{AttentionConfig, HiddenSource};
use eframe::egui;

/// The whole panel.
pub fn controls_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    egui::ScrollArea::vertical().show(ui, |ui| {
        fusion_ui(app, ui);
        ui.separator();
        attention_ui(app, ui);
        ui.separator();
        view_ui(app, ui);
        ui.separator();
        numbers_ui(app, ui);
    });
}

fn fusion_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    ui.heading("Fusion");
    let before = app.settings.fusion;
    let f = &mut app.settings.fusion;
    knob_ui::slider_f32(ui, &mut f.tau, "masks.fusion.tau", "τ");
    knob_ui::slider_f32(ui, &mut f.gamma, "masks.fusion.gamma", "γ");
    egui::ComboBox::from_label("variant")
        .selected_text(f.variant.name())
        .show_ui(ui, |ui| {
            for v in MaskVariant::ALL {
                ui.selectable_value(&mut f.variant, v, v.name())
                    .on_hover_text(plain(v.formula()));
            }
        });
    ui.label(egui::RichText::new(plain(f.variant.formula())).small());
    if app.settings.fusion != before {
        app.request_fuse();
    }
}

fn attention_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    ui.heading("M_s source");
    let mut choice = app.settings.attention.clone();
    ui.horizontal(|ui| {
        ui.radio_value(&mut choice.source, HiddenSource::Reference, "reference")
            .on_hover_text("the frozen base (what training uses by default)");
        ui.radio_value(&mut choice.source, HiddenSource::Policy, "policy")
            .on_hover_text("the base with the LoRA of a run (load one from the Training tab)");
    });
    if choice.source == HiddenSource::Policy && app.policy.is_none() {
        ui.colored_label(
            ui.visuals().warn_fg_color,
            "no run loaded: the policy is the base without adapters",
        );
    }
    if let Some((_, blocks)) = app.base {
        ui.horizontal_wrapped(|ui| {
            ui.label("layers:");
            for layer in 0..blocks {
                let mut on = choice.layers.is_empty() || choice.layers.contains(&layer);
                if ui.checkbox(&mut on, layer.to_string()).changed() {
                    choice.layers = toggled_layers(&choice, blocks, layer, on);
                }
            }
        });
        ui.label(egui::RichText::new("Eq. 3 averages the chosen double-stream blocks").small());
    }
    ui.horizontal(|ui| {
        ui.label("CLS pool:");
        knob_ui::radios(ui, &mut choice.pool, "masks.attention.pool");
    });
    ui.horizontal(|ui| {
        ui.label("similarity:");
        knob_ui::radios(ui, &mut choice.similarity, "masks.attention.similarity");
    });
    if choice != app.settings.attention {
        app.set_attention_choice(choice);
    }
}

/// The layer list after switching `layer` on or off (empty = every block; at least one stays on).
fn toggled_layers(choice: &AttentionConfig, blocks: usize, layer: usize, on: bool) -> Vec<usize> {
    let mut layers: Vec<usize> = if choice.layers.is_empty() {
        (0..blocks).collect()
    } else {
        choice.layers.clone()
    };
    if on {
        layers.push(layer);
    } else if layers.len() > 1 {
        layers.retain(|&l| l != layer);
    }
    layers.sort_unstable();
    layers.dedup();
    if layers.len() == blocks { Vec::new() } else { layers }
}

fn view_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    ui.heading("View");
    let subjects = app.item.as_ref().map_or(0, |i| i.subject_priors.len());
    let s = &mut app.settings;
    ui.horizontal_wrapped(|ui| {
        for kind in MaskKind::ALL {
            ui.selectable_value(&mut s.mask, kind, kind.label());
        }
    });
    ui.horizontal_wrapped(|ui| {
        ui.selectable_value(&mut s.subject, SubjectChoice::Union, "union");
        for j in 0..subjects {
            ui.selectable_value(&mut s.subject, SubjectChoice::Subject(j), format!("subject {}", j + 1));
        }
    });
    if s.mask == MaskKind::Fused && s.subject != SubjectChoice::Union {
        ui.label(egui::RichText::new("M(t) is one map per image; the subject picks the contour").small());
    }
    egui::ComboBox::from_label("colormap")
        .selected_text(s.view.colormap.label())
        .show_ui(ui, |ui| {
            for c in Colormap::ALL {
                ui.selectable_value(&mut s.view.colormap, c, c.label());
            }
        });
    ui.add(egui::Slider::new(&mut s.view.opacity, 0.0..=1.0).text("opacity"));
    ui.checkbox(&mut s.view.smooth, "smooth upsampling")
        .on_hover_text("bilinear between token centres instead of one colour per token");
    ui.checkbox(&mut s.view.contour, "M_prior contour");
}

fn numbers_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    ui.heading("Numbers");
    let Some(item) = &app.item else {
        ui.label("no item");
        return;
    };
    let t_index = app.settings.t_index;
    let at = app.attention.get(&t_index);
    egui::Grid::new("numbers").num_columns(3).striped(true).show(ui, |ui| {
        ui.label("T");
        ui.label(TIMESTEPS[t_index].to_string());
        ui.end_row();
        ui.label("A_focus");
        match at {
            Some(a) => {
                let branch = if a.a_focus > app.settings.fusion.tau {
                    "> τ: M = M_s"
                } else {
                    "≤ τ: blend"
                };
                ui.label(format!("{:.3}", a.a_focus));
                ui.label(branch);
            }
            None => {
                ui.label("computing…");
            }
        }
        ui.end_row();
        ui.label("map");
        ui.label("mean");
        ui.label("|·|₁");
        ui.end_row();
        let mut row = |name: String, mean: f32, l1: f32| {
            ui.label(name);
            ui.label(format!("{mean:.3}"));
            ui.label(format!("{l1:.1}"));
            ui.end_row();
        };
        row("M_prior".into(), item.m_prior.mean, item.m_prior.l1);
        if item.subject_priors.len() > 1 {
            for (j, p) in item.subject_priors.iter().enumerate() {
                row(format!("M_prior^{}", j + 1), p.mean, p.l1);
            }
        }
        row("M_d".into(), item.m_d.mean, item.m_d.l1);
        if let Some(a) = at {
            row("M_s(t)".into(), a.union.mean, a.union.l1);
            if a.per_subject.len() > 1 {
                for (j, p) in a.per_subject.iter().enumerate() {
                    row(format!("M_s^{}(t)", j + 1), p.mean, p.l1);
                }
            }
        }
        if let Some(f) = &app.fused {
            row(format!("M(t) [{}]", f.branch.name()), f.map.mean, f.map.l1);
        }
    });
    ui.label(egui::RichText::new("mean = covered fraction of tokens for a 0/1 map").small());
    if let Some((_, label)) = chosen_map(app) {
        ui.label(format!("drawn: {label}"));
    }
}

/// A library formula in glyphs every egui font has (the bundled proportional font lacks `⊙`).
pub fn plain(formula: &str) -> String {
    formula.replace('⊙', "·")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_toggle_between_all_and_a_subset() {
        let all = AttentionConfig::default();
        let off = toggled_layers(&all, 3, 1, false);
        assert_eq!(off, vec![0, 2]);
        let back = toggled_layers(
            &AttentionConfig {
                layers: off,
                ..Default::default()
            },
            3,
            1,
            true,
        );
        assert!(back.is_empty(), "all blocks again is the empty list");
        let last = toggled_layers(
            &AttentionConfig {
                layers: vec![2],
                ..Default::default()
            },
            3,
            2,
            false,
        );
        assert_eq!(last, vec![2], "one layer always stays on");
    }
}
