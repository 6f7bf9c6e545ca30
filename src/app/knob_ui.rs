//! Widgets drawn from the knob registry ([`crate::knobs`]): each knob's widget, range and hover text come from its
//! declaration, so a knob added there appears in the Studio's forms without code here.

use eframe::egui;

use crate::knobs::{KNOBS, Knob, KnobKind, knob, value_at};
use crate::train::RunConfig;

/// Bounds beyond this are "no bound" (a drag value then has none).
const UNBOUNDED: f64 = 1e8;

/// The hover text of a knob: its doc and its default.
pub fn hover_text(k: &Knob) -> String {
    match k.default_value() {
        Some(d) => format!("{}\n`--set {}=…` · default {d}", k.summary, k.key),
        None => format!("{}\n`--set {}=…`", k.summary, k.key),
    }
}

/// A slider for an `f32` knob over its declared range (`key` must be a bounded float knob of the registry).
pub fn slider_f32(ui: &mut egui::Ui, value: &mut f32, key: &str, label: &str) -> egui::Response {
    let Some(k) = knob(key) else {
        return ui.colored_label(ui.visuals().error_fg_color, format!("{key}: not a knob"));
    };
    let (min, max) = k.bounds().unwrap_or((0.0, 1.0));
    ui.add(egui::Slider::new(value, min as f32..=max as f32).text(label))
        .on_hover_text(hover_text(k))
}

/// Radio buttons for a named-value knob: one per value name of its enum.
pub fn radios<T: crate::config_enum::ConfigEnum + PartialEq>(ui: &mut egui::Ui, value: &mut T, key: &str) {
    let hover = knob(key).map(hover_text).unwrap_or_default();
    for v in T::ALL {
        ui.radio_value(value, *v, v.config_name()).on_hover_text(&hover);
    }
}

/// What the user did to a knob's value.
enum Edit {
    /// Set it (applied as `--set key=value`).
    Set(toml::Value),
    /// Switch an optional knob off (its field becomes `None`).
    Unset,
}

/// The knob's widget: a checkbox first for an optional knob (one whose default is off), then the value's widget.
fn knob_widget(ui: &mut egui::Ui, k: &Knob, table: &toml::Table) -> Option<Edit> {
    let current = value_at(table, k.key).cloned();
    if k.default_value().is_some() {
        return current.and_then(|c| value_widget(ui, k, c)).map(Edit::Set);
    }
    ui.horizontal(|ui| {
        let mut on = current.is_some();
        if ui.checkbox(&mut on, "").on_hover_text("off = not set").changed() {
            let start = k.bounds().map_or(0.0, |(lo, hi)| 0.0f64.clamp(lo, hi));
            return Some(if on {
                Edit::Set(toml::Value::Float(start))
            } else {
                Edit::Unset
            });
        }
        current.and_then(|c| value_widget(ui, k, c)).map(Edit::Set)
    })
    .inner
}

/// The widget of a knob's value `current` (TOML); the new value when the user changed it.
fn value_widget(ui: &mut egui::Ui, k: &Knob, current: toml::Value) -> Option<toml::Value> {
    match k.kind {
        KnobKind::Float { min, max, min_open, .. } => {
            let mut v = current
                .as_float()
                .or(current.as_integer().map(|i| i as f64))
                .unwrap_or(0.0);
            let lo = if min <= -UNBOUNDED {
                f64::NEG_INFINITY
            } else if min_open {
                min + f64::EPSILON.max(min.abs() * f64::EPSILON)
            } else {
                min
            };
            let hi = if max >= UNBOUNDED { f64::INFINITY } else { max };
            let speed = (v.abs() * 0.01).max(if hi - lo <= 1.0 { 0.005 } else { 0.01 });
            let small = v != 0.0 && v.abs() < 1e-3;
            let mut drag = egui::DragValue::new(&mut v).range(lo..=hi).speed(speed);
            if small {
                drag = drag.custom_formatter(|v, _| format!("{v:.2e}"));
            }
            ui.add(drag).changed().then_some(toml::Value::Float(v))
        }
        KnobKind::Int { min, max } => {
            let mut v = current.as_integer().unwrap_or(0).max(0) as u64;
            ui.add(egui::DragValue::new(&mut v).range(min..=max))
                .changed()
                .then(|| toml::Value::Integer(v.min(i64::MAX as u64) as i64))
        }
        KnobKind::Choice(_) | KnobKind::PairSelection | KnobKind::Schedule => {
            let mut v = current.as_str().unwrap_or_default().to_string();
            let before = v.clone();
            egui::ComboBox::from_id_salt(("knob", k.key))
                .selected_text(&v)
                .show_ui(ui, |ui| {
                    for name in k.value_names() {
                        ui.selectable_value(&mut v, name.clone(), name);
                    }
                });
            (v != before).then_some(toml::Value::String(v))
        }
        KnobKind::IndexList => {
            let mut text = current
                .as_array()
                .map(|a| a.iter().map(|v| v.to_string()).collect::<Vec<_>>().join(", "))
                .unwrap_or_default();
            let edit = ui.add(
                egui::TextEdit::singleline(&mut text)
                    .hint_text("all")
                    .desired_width(80.0),
            );
            edit.changed().then(|| {
                toml::Value::Array(
                    text.split(|c: char| !c.is_ascii_digit())
                        .filter_map(|n| n.parse::<i64>().ok())
                        .map(toml::Value::Integer)
                        .collect(),
                )
            })
        }
        KnobKind::Bool => {
            let mut v = current.as_bool().unwrap_or(false);
            ui.checkbox(&mut v, "").changed().then_some(toml::Value::Boolean(v))
        }
        KnobKind::Text => {
            let mut v = current.as_str().unwrap_or_default().to_string();
            ui.text_edit_singleline(&mut v)
                .changed()
                .then_some(toml::Value::String(v))
        }
    }
}

/// A grid row per knob of `keys` (registry order when `keys` is None), editing `cfg` in place. An edit is applied
/// as `--set key=value` is ([`RunConfig::with_overrides`]); one the config type refuses is not applied. Returns
/// whether `cfg` changed.
pub fn knob_grid(ui: &mut egui::Ui, id: &str, cfg: &mut RunConfig, keys: Option<&[&str]>) -> bool {
    let Ok(table) = toml::Table::try_from(&*cfg) else {
        return false;
    };
    let chosen: Vec<&Knob> = match keys {
        Some(keys) => keys.iter().filter_map(|k| knob(k)).collect(),
        None => KNOBS.iter().collect(),
    };
    let mut edits = Vec::new();
    let mut unset = Vec::new();
    egui::Grid::new(id).num_columns(2).striped(true).show(ui, |ui| {
        for k in chosen {
            ui.label(egui::RichText::new(k.key).monospace())
                .on_hover_text(hover_text(k));
            match knob_widget(ui, k, &table) {
                Some(Edit::Set(v)) => edits.push(format!("{}={v}", k.key)),
                Some(Edit::Unset) => unset.push(k.key),
                None => {}
            }
            ui.end_row();
        }
    });
    let mut new = match cfg.with_overrides(&edits) {
        Ok(new) => new,
        Err(_) => return false,
    };
    for key in unset {
        new = unset_knob(&new, key).unwrap_or(new);
    }
    if new == *cfg {
        return false;
    }
    *cfg = new;
    true
}

/// `cfg` with the optional field `key` removed (`None`), if the config type takes that.
fn unset_knob(cfg: &RunConfig, key: &str) -> Option<RunConfig> {
    let mut table = toml::Table::try_from(cfg).ok()?;
    let (parents, last) = key.rsplit_once('.').unwrap_or(("", key));
    let mut t = &mut table;
    for p in parents.split('.').filter(|p| !p.is_empty()) {
        t = t.get_mut(p)?.as_table_mut()?;
    }
    t.remove(last)?;
    toml::Value::Table(table).try_into().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a widget hands back reads as `--set` does, for every kind of knob.
    #[test]
    fn edits_apply_as_set_does() {
        let cfg = RunConfig::default();
        let edits = [
            format!("masks.fusion.tau={}", toml::Value::Float(0.25)),
            format!("lora.rank={}", toml::Value::Integer(4)),
            format!("objective={}", toml::Value::String("sft".into())),
            format!(
                "masks.attention.layers={}",
                toml::Value::Array(vec![toml::Value::Integer(0), toml::Value::Integer(2)])
            ),
        ];
        let new = cfg.with_overrides(&edits).expect("applies");
        assert_eq!(new.masks.fusion.tau, 0.25);
        assert_eq!(new.lora.rank, 4);
        assert_eq!(new.objective, crate::train::objective::ObjectiveKind::Sft);
        assert_eq!(new.masks.attention.layers, [0, 2]);
        let on = cfg
            .with_overrides(&["dpo.pair_filter_delta=0.0".into()])
            .expect("applies");
        assert_eq!(on.dpo.pair_filter_delta, Some(0.0));
        assert_eq!(unset_knob(&on, "dpo.pair_filter_delta"), Some(cfg));
    }
}
