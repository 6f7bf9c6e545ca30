//! The inspector: the item list, and the selected item's references, winner and loser with the chosen mask drawn
//! over them (pan with a drag, zoom with Ctrl + scroll or a pinch, double-click to reset).

use eframe::{egui, egui_wgpu};
use std::sync::Arc;

use super::overlay::{MaskValues, OverlayCallback, RgbaPixels};
use super::state::SubjectFilter;
use super::{ItemStatus, StudioApp, chosen_map, contour_prior};

/// Side of an item thumbnail in the list, in points.
const THUMB_SIZE: f32 = 36.0;
/// Side of a reference view, in points.
const REFERENCE_SIZE: f32 = 96.0;

/// The dataset's items with thumbnails, subject filter and validation status.
pub fn item_list_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    let Some(ds) = &app.dataset else {
        ui.label("opening dataset…");
        return;
    };
    ui.label(egui::RichText::new(ds.summary.root.display().to_string()).small());
    let valid = ds.status.iter().filter(|s| **s == ItemStatus::Valid).count();
    let invalid = ds.status.iter().filter(|s| matches!(s, ItemStatus::Invalid(_))).count();
    ui.label(format!(
        "{} items · {valid} valid · {invalid} invalid",
        ds.summary.items.len()
    ));
    ui.horizontal(|ui| {
        for (filter, label) in [
            (SubjectFilter::All, "all"),
            (SubjectFilter::Single, "single"),
            (SubjectFilter::Multi, "multi"),
        ] {
            ui.selectable_value(&mut app.settings.filter, filter, label);
        }
    });
    ui.separator();
    let selected = app.item.as_ref().map(|i| i.index);
    let filter = app.settings.filter;
    let mut clicked = None;
    egui::ScrollArea::vertical().auto_shrink([false, false]).show(ui, |ui| {
        for (index, item) in ds.summary.items.iter().enumerate() {
            if !filter.accepts(item.subjects) {
                continue;
            }
            ui.horizontal(|ui| {
                match &ds.thumbnails[index] {
                    Some(tex) => {
                        ui.add(egui::Image::new((tex.id(), egui::vec2(THUMB_SIZE, THUMB_SIZE))));
                    }
                    None => {
                        ui.allocate_exact_size(egui::vec2(THUMB_SIZE, THUMB_SIZE), egui::Sense::hover());
                    }
                }
                let (mark, color, tip) = match &ds.status[index] {
                    ItemStatus::Unchecked => ("…", ui.visuals().weak_text_color(), "not checked yet".to_string()),
                    ItemStatus::Valid => ("ok", egui::Color32::from_rgb(90, 180, 90), "valid".to_string()),
                    ItemStatus::Invalid(p) => ("bad", ui.visuals().error_fg_color, p.join("\n")),
                };
                ui.colored_label(color, mark).on_hover_text(tip);
                let text = format!("{}  ({}×)", item.id, item.subjects);
                if ui.selectable_label(selected == Some(index), text).clicked() {
                    clicked = Some(index);
                }
            });
        }
    });
    if let Some(index) = clicked {
        app.select_item(index);
    }
}

/// The selected item: prompt, references, winner and loser with the overlay.
pub fn item_ui(app: &mut StudioApp, ui: &mut egui::Ui) {
    let Some(item) = &app.item else {
        ui.label("select an item");
        return;
    };
    ui.horizontal(|ui| {
        ui.heading(&item.id);
        ui.label(format!("“{}”", item.prompt));
    });
    let references = item.references.clone();
    let (winner, loser) = (Arc::clone(&item.winner), Arc::clone(&item.loser));
    let (label, mask, stats) = match chosen_map(app) {
        Some((map, label)) => (label, Some(Arc::clone(&map.values)), Some((map.mean, map.l1))),
        None => (
            app.fuse_problem
                .clone()
                .unwrap_or_else(|| format!("{} not available yet", app.settings.mask.label())),
            None,
            None,
        ),
    };
    let prior = contour_prior(app).map(|m| Arc::clone(&m.values));

    ui.horizontal(|ui| {
        for (j, r) in references.iter().enumerate() {
            ui.vertical(|ui| {
                ui.label(format!("reference {}", j + 1));
                overlay_view_ui(
                    app,
                    ui,
                    egui::Id::unique(("reference", j)),
                    r,
                    None,
                    None,
                    REFERENCE_SIZE,
                    false,
                );
            });
        }
    });
    ui.add_space(4.0);
    ui.horizontal(|ui| {
        ui.strong(&label);
        if let Some((mean, l1)) = stats {
            ui.label(format!("mean {mean:.3} · |·|₁ {l1:.1}"));
        }
        if app.pan_zoom.zoom > 1.0 {
            ui.label(format!("zoom ×{:.1} (double-click resets)", app.pan_zoom.zoom));
        }
    });
    let side = ((ui.available_width() - 16.0) / 2.0).clamp(160.0, 420.0);
    ui.horizontal(|ui| {
        for (name, image) in [("winner (x_0^w)", &winner), ("loser (x_0^l)", &loser)] {
            ui.vertical(|ui| {
                ui.label(name);
                overlay_view_ui(
                    app,
                    ui,
                    egui::Id::unique(("overlay", name)),
                    image,
                    mask.clone(),
                    prior.clone(),
                    side,
                    true,
                );
            });
        }
    });
}

/// One square overlay view. With `interactive`, drags pan and Ctrl + scroll zooms (shared by every
/// interactive view so winner and loser stay aligned).
#[allow(clippy::too_many_arguments)]
fn overlay_view_ui(
    app: &mut StudioApp,
    ui: &mut egui::Ui,
    id: egui::Id,
    image: &Arc<RgbaPixels>,
    mask: Option<Arc<MaskValues>>,
    prior: Option<Arc<MaskValues>>,
    side: f32,
    interactive: bool,
) {
    let sense = if interactive {
        egui::Sense::click_and_drag()
    } else {
        egui::Sense::hover()
    };
    let (rect, response) = ui.allocate_exact_size(egui::vec2(side, side), sense);
    let (uv_origin, uv_per_widget) = if interactive {
        if response.dragged() {
            let d = response.drag_delta();
            app.pan_zoom.pan_by_widget_fraction([d.x / side, d.y / side]);
        }
        if response.double_clicked() {
            app.pan_zoom = Default::default();
        }
        if response.hovered() {
            // Ctrl + scroll (or a pinch) zooms; plain scrolling keeps scrolling the page.
            let zoom = ui.input(|i| i.zoom_delta());
            if zoom != 1.0
                && let Some(pos) = response.hover_pos()
            {
                let anchor = [(pos.x - rect.min.x) / side, (pos.y - rect.min.y) / side];
                app.pan_zoom.zoom_about(zoom, anchor);
            }
        }
        app.pan_zoom.uv_transform()
    } else {
        ([0.0, 0.0], [1.0, 1.0])
    };
    if !app.gpu {
        ui.painter().rect_filled(rect, 0.0, ui.visuals().extreme_bg_color);
        ui.painter().text(
            rect.center(),
            egui::Align2::CENTER_CENTER,
            "overlay needs the wgpu renderer",
            egui::FontId::proportional(12.0),
            ui.visuals().error_fg_color,
        );
        return;
    }
    let callback = OverlayCallback {
        view: id,
        image: Arc::clone(image),
        mask,
        prior,
        settings: app.settings.view,
        uv_origin,
        uv_per_widget,
        widget_size_points: [side, side],
    };
    ui.painter()
        .add(egui_wgpu::Callback::new_paint_callback(rect, callback));
}
