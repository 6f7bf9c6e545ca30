//! The timeline: a slider over the timestep grid with play/pause (Left/Right arrows step, Space plays), and the
//! `A_focus(t)` curve with the τ line and the Eq. 9 branch of each timestep.

use eframe::egui;
use egui_plot::{Corner, HLine, Legend, Line, LineStyle, Plot, PlotPoints, Points, VLine};

use super::StudioApp;
use super::state::{TIMESTEPS, t_of_index};

/// Colour of the `A_focus(t)` curve: blue, apart from the red τ line and the green/orange branch markers.
const A_FOCUS_CURVE: egui::Color32 = egui::Color32::from_rgb(90, 160, 255);
/// Colour of the τ threshold (drawn dashed).
const TAU_LINE: egui::Color32 = egui::Color32::from_rgb(230, 80, 80);
/// Colour of timesteps on Eq. 9's `M = M_s` branch (`A_focus > τ`).
const ATTENTION_BRANCH: egui::Color32 = egui::Color32::from_rgb(80, 200, 120);
/// Colour of timesteps on the blend branch (`A_focus ≤ τ`).
const BLEND_BRANCH: egui::Color32 = egui::Color32::from_rgb(240, 150, 40);

/// Slider, buttons and the plot.
pub fn timeline_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    ui.horizontal(|ui| {
        ui.heading("Timestep");
        let play = if app.playing.is_some() { "pause" } else { "play" };
        if ui.button(play).on_hover_text("Space").clicked() {
            app.toggle_play();
        }
        if ui.button("<").on_hover_text("previous timestep (Left arrow)").clicked() {
            app.set_t_index(app.settings.t_index.saturating_sub(1));
        }
        if ui.button(">").on_hover_text("next timestep (Right arrow)").clicked() {
            app.set_t_index(app.settings.t_index + 1);
        }
        let mut t_index = app.settings.t_index;
        let slider = egui::Slider::new(&mut t_index, 0..=TIMESTEPS.len() - 1)
            .text("T")
            .custom_formatter(|v, _| TIMESTEPS[(v as usize).min(TIMESTEPS.len() - 1)].to_string())
            .custom_parser(|s| {
                let t: f64 = s.trim().parse().ok()?;
                Some((t / 50.0).round().clamp(0.0, (TIMESTEPS.len() - 1) as f64))
            });
        if ui.add(slider).changed() {
            app.set_t_index(t_index);
        }
        ui.label(format!("t = {:.2}", t_of_index(app.settings.t_index)));
    });

    let tau = f64::from(app.settings.fusion.tau);
    let curve: Vec<[f64; 2]> = app
        .attention
        .values()
        .map(|a| [f64::from(TIMESTEPS[a.t_index]), f64::from(a.a_focus)])
        .collect();
    let (above, below): (Vec<[f64; 2]>, Vec<[f64; 2]>) = curve.iter().partition(|p| p[1] > tau);
    let switches = app.settings.fusion.variant.switches_on_coverage();
    let current = f64::from(TIMESTEPS[app.settings.t_index]);
    Plot::new("a_focus_plot")
        .height(180.0)
        .legend(Legend::default().position(Corner::LeftBottom))
        .include_x(0.0)
        .include_x(1000.0)
        .include_y(0.0)
        .include_y(1.0)
        .x_axis_label("T (t × 1000)")
        .y_axis_label("A_focus")
        .allow_scroll(false)
        .show(ui, |plot| {
            plot.line(
                Line::new("A_focus(t)", PlotPoints::from(curve))
                    .color(A_FOCUS_CURVE)
                    .width(2.0),
            );
            plot.hline(
                HLine::new(format!("τ = {tau:.2}"), tau)
                    .color(TAU_LINE)
                    .style(LineStyle::dashed_loose()),
            );
            let (name_above, name_below) = if switches {
                ("Eq. 9: M = M_s", "Eq. 9: blend")
            } else {
                (
                    "A_focus > τ (variant has no switch)",
                    "A_focus ≤ τ (variant has no switch)",
                )
            };
            plot.points(
                Points::new(name_above, PlotPoints::from(above))
                    .radius(4.0)
                    .color(ATTENTION_BRANCH),
            );
            plot.points(
                Points::new(name_below, PlotPoints::from(below))
                    .radius(4.0)
                    .color(BLEND_BRANCH),
            );
            plot.vline(VLine::new("current T", current).color(egui::Color32::GRAY));
        });
}
