//! One PNG per study: a panel per table column with the mean and its 95 % CI error bar per value. When every
//! replacement sets one numeric knob value the x axis is that number and the baseline is a horizontal line (its CI
//! a dashed pair of lines); otherwise the values are categories, the baseline first (grey). A value with one finished
//! seed has no interval (a bare point).
//!
//! Drawn with `plotters` (its bitmap backend is not available offline here, so [`ImageBackend`] draws into an
//! `image::RgbImage`, encoded as PNG by `image`), text with `plotters`' `ab_glyph` renderer and the Ubuntu Light
//! font that egui already ships (`epaint_default_fonts`). Pure: returns the PNG bytes.

use std::sync::OnceLock;

use image::{Rgb, RgbImage};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters_backend::{BackendColor, BackendCoord, DrawingErrorKind};

use super::results::{Column, Row, StudyTable};
use crate::eval::study::Better;

/// Width of one metric panel, pixels.
pub const PANEL_WIDTH_PX: u32 = 420;
/// Height of one metric panel, pixels.
pub const PANEL_HEIGHT_PX: u32 = 300;
/// Height of the title strip, pixels.
pub const TITLE_HEIGHT_PX: u32 = 46;
/// Panels per row at most.
pub const MAX_PANELS_PER_ROW: u32 = 3;

const FONT: &str = "sans-serif";

/// A plot that cannot be drawn or encoded.
#[derive(Debug, thiserror::Error)]
pub enum PlotError {
    /// The embedded font could not be registered.
    #[error("cannot register the plot font: {0}")]
    Font(String),
    /// Drawing failed.
    #[error("plot of study \"{study}\": {message}")]
    Draw {
        /// Study title.
        study: String,
        /// What failed.
        message: String,
    },
    /// PNG encoding failed.
    #[error("plot of study \"{study}\": cannot encode PNG: {message}")]
    Encode {
        /// Study title.
        study: String,
        /// What failed.
        message: String,
    },
}

/// A plotters backend drawing into an RGB image (alpha-blended pixels).
pub struct ImageBackend<'a> {
    img: &'a mut RgbImage,
}

impl<'a> ImageBackend<'a> {
    /// Draws into `img`.
    pub fn new(img: &'a mut RgbImage) -> Self {
        Self { img }
    }
}

impl DrawingBackend for ImageBackend<'_> {
    type ErrorType = std::convert::Infallible;

    fn get_size(&self) -> (u32, u32) {
        self.img.dimensions()
    }

    fn ensure_prepared(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        Ok(())
    }

    fn present(&mut self) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        Ok(())
    }

    fn draw_pixel(
        &mut self,
        point: BackendCoord,
        color: BackendColor,
    ) -> Result<(), DrawingErrorKind<Self::ErrorType>> {
        let (Ok(x), Ok(y)) = (u32::try_from(point.0), u32::try_from(point.1)) else {
            return Ok(());
        };
        if let Some(p) = self.img.get_pixel_mut_checked(x, y) {
            let a = color.alpha.clamp(0.0, 1.0);
            let (r, g, b) = color.rgb;
            let blend = |old: u8, new: u8| (f64::from(old) * (1.0 - a) + f64::from(new) * a).round() as u8;
            *p = Rgb([blend(p.0[0], r), blend(p.0[1], g), blend(p.0[2], b)]);
        }
        Ok(())
    }
}

/// Registers the plots' font with plotters (once per process). Plotters' `ab_glyph` text, which our plots use,
/// has no system fonts: anything else in the process that draws text with plotters (criterion's bench reports)
/// needs this call first.
pub fn register_font() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<Result<(), String>> = OnceLock::new();
    REGISTERED
        .get_or_init(|| {
            plotters::style::register_font(FONT, FontStyle::Normal, epaint_default_fonts::UBUNTU_LIGHT)
                .map_err(|_| "Ubuntu-Light.ttf of epaint_default_fonts is not a valid font".to_string())
        })
        .clone()
        .map_err(PlotError::Font)
}

/// Image size of a study plot with `panels` metric panels: up to [`MAX_PANELS_PER_ROW`] per row.
pub fn plot_size(panels: usize) -> (u32, u32) {
    let n = u32::try_from(panels.max(1)).unwrap_or(u32::MAX);
    let cols = n.min(MAX_PANELS_PER_ROW);
    let rows = n.div_ceil(cols);
    (cols * PANEL_WIDTH_PX, TITLE_HEIGHT_PX + rows * PANEL_HEIGHT_PX)
}

/// The y range of a column: every mean ± CI, padded by 10 % (a flat column gets a small band around its value).
fn y_range(rows: &[&Row], column: &Column) -> Option<(f64, f64)> {
    let mut lo = f64::INFINITY;
    let mut hi = f64::NEG_INFINITY;
    for s in rows.iter().filter_map(|r| r.stats.get(&column.id)) {
        let ci = if s.ci95.is_finite() { s.ci95 } else { 0.0 };
        lo = lo.min(s.mean - ci);
        hi = hi.max(s.mean + ci);
    }
    if !(lo.is_finite() && hi.is_finite()) {
        return None;
    }
    let pad = if hi > lo {
        (hi - lo) * 0.1
    } else {
        (lo.abs() * 0.1).max(1e-3)
    };
    Some((lo - pad, hi + pad))
}

/// Decimals that tell apart y labels ~`span / 6` apart.
fn y_decimals(y0: f64, y1: f64) -> usize {
    let step = ((y1 - y0) / 6.0).abs();
    if step > 0.0 && step.is_finite() {
        (-step.log10().ceil()).clamp(0.0, 8.0) as usize + 1
    } else {
        2
    }
}

fn short(label: &str, max: usize) -> String {
    if label.chars().count() <= max {
        label.to_string()
    } else {
        let mut s: String = label.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

fn caption(column: &Column) -> String {
    // Ubuntu Light has no arrows.
    let better = match column.better {
        Better::Higher => "higher is better",
        Better::Lower => "lower is better",
    };
    format!("{} ({better})", column.label)
}

type Area<'a> = DrawingArea<ImageBackend<'a>, Shift>;

fn draw_err<E: std::fmt::Display>(study: &str) -> impl Fn(E) -> PlotError + '_ {
    move |e| PlotError::Draw {
        study: study.to_string(),
        message: e.to_string(),
    }
}

/// Numeric x: the replacements at their knob values, the baseline as a horizontal line with its CI dashed.
fn numeric_panel(area: &Area<'_>, table: &StudyTable, column: &Column) -> Result<(), PlotError> {
    let err = draw_err(&table.title);
    let all: Vec<&Row> = table.rows.iter().collect();
    let Some((y0, y1)) = y_range(&all, column) else {
        return Ok(());
    };
    let points: Vec<(f64, f64, f64)> = table.rows[1..]
        .iter()
        .filter_map(|r| Some((r.x?, r.stats.get(&column.id)?)))
        .map(|(x, s)| (x, s.mean, if s.ci95.is_finite() { s.ci95 } else { 0.0 }))
        .collect();
    let xs: Vec<f64> = table.rows[1..].iter().filter_map(|r| r.x).collect();
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| (a.min(x), b.max(x)));
    let pad = if xmax > xmin {
        (xmax - xmin) * 0.08
    } else {
        (xmin.abs() * 0.1).max(0.5)
    };
    let (x0, x1) = (xmin - pad, xmax + pad);
    let mut chart = ChartBuilder::on(area)
        .caption(caption(column), (FONT, 16))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(56)
        .build_cartesian_2d(x0..x1, y0..y1)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .x_labels(6)
        .y_labels(6)
        .x_desc(table.knob.as_deref().unwrap_or(""))
        .y_label_formatter(&|y| format!("{y:.*}", y_decimals(y0, y1)))
        .label_style((FONT, 12))
        .axis_desc_style((FONT, 12))
        .light_line_style(RGBColor(246, 246, 246))
        .draw()
        .map_err(&err)?;
    if let Some(base) = table.rows.first().and_then(|r| r.stats.get(&column.id)) {
        let grey = RGBColor(120, 120, 120);
        chart
            .draw_series(LineSeries::new(
                [(x0, base.mean), (x1, base.mean)],
                grey.stroke_width(2),
            ))
            .map_err(&err)?;
        if base.ci95.is_finite() {
            for y in [base.mean - base.ci95, base.mean + base.ci95] {
                chart
                    .draw_series(DashedLineSeries::new([(x0, y), (x1, y)], 6, 4, grey.into()))
                    .map_err(&err)?;
            }
        }
    }
    let blue = RGBColor(31, 119, 180);
    let mut sorted = points.clone();
    sorted.sort_by(|a, b| a.0.total_cmp(&b.0));
    chart
        .draw_series(LineSeries::new(
            sorted.iter().map(|&(x, m, _)| (x, m)),
            blue.stroke_width(1),
        ))
        .map_err(&err)?;
    chart
        .draw_series(
            points
                .iter()
                .map(|&(x, m, ci)| ErrorBar::new_vertical(x, m - ci, m, m + ci, blue.stroke_width(2), 10)),
        )
        .map_err(&err)?;
    Ok(())
}

/// Categories: one slot per row, the baseline first (grey), each with its mean and CI bar.
fn category_panel(area: &Area<'_>, table: &StudyTable, column: &Column) -> Result<(), PlotError> {
    let err = draw_err(&table.title);
    let all: Vec<&Row> = table.rows.iter().collect();
    let Some((y0, y1)) = y_range(&all, column) else {
        return Ok(());
    };
    let n = i32::try_from(table.rows.len()).unwrap_or(i32::MAX);
    let labels: Vec<String> = table.rows.iter().map(|r| short(&r.value, 16)).collect();
    let mut chart = ChartBuilder::on(area)
        .caption(caption(column), (FONT, 16))
        .margin(8)
        .x_label_area_size(34)
        .y_label_area_size(56)
        .build_cartesian_2d((0..n - 1).into_segmented(), y0..y1)
        .map_err(&err)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(table.rows.len())
        .y_labels(6)
        .y_label_formatter(&|y| format!("{y:.*}", y_decimals(y0, y1)))
        .x_label_formatter(&|v| match v {
            SegmentValue::CenterOf(i) | SegmentValue::Exact(i) => usize::try_from(*i)
                .ok()
                .and_then(|i| labels.get(i).cloned())
                .unwrap_or_default(),
            SegmentValue::Last => String::new(),
        })
        .label_style((FONT, 12))
        .light_line_style(RGBColor(246, 246, 246))
        .draw()
        .map_err(&err)?;
    let bars = table.rows.iter().enumerate().filter_map(|(i, r)| {
        let s = r.stats.get(&column.id)?;
        let ci = if s.ci95.is_finite() { s.ci95 } else { 0.0 };
        let color = if i == 0 {
            RGBColor(120, 120, 120)
        } else {
            RGBColor(31, 119, 180)
        };
        let x = SegmentValue::CenterOf(i32::try_from(i).ok()?);
        Some(ErrorBar::new_vertical(
            x,
            s.mean - ci,
            s.mean,
            s.mean + ci,
            color.stroke_width(2),
            12,
        ))
    });
    chart.draw_series(bars).map_err(&err)?;
    Ok(())
}

/// The study's plot as PNG bytes ([`plot_size`] of its column count); `None` when the table has no column or no
/// replacement row.
pub fn study_plot_png(table: &StudyTable) -> Result<Option<Vec<u8>>, PlotError> {
    if table.columns.is_empty() || table.rows.len() < 2 {
        return Ok(None);
    }
    register_font()?;
    let err = draw_err(&table.title);
    let (w, h) = plot_size(table.columns.len());
    let mut img = RgbImage::from_pixel(w, h, Rgb([255, 255, 255]));
    {
        let root = ImageBackend::new(&mut img).into_drawing_area();
        let (title, body) = root.split_vertically(TITLE_HEIGHT_PX);
        let heading = match &table.knob {
            Some(k) => format!("{} ({k})", table.title),
            None => table.title.clone(),
        };
        title
            .draw_text(&short(&heading, 110), &(FONT, 18).into_text_style(&title), (10, 4))
            .map_err(&err)?;
        let legend = if table.numeric_x {
            "blue: mean ± 95 % CI per value; grey line: baseline (dashed: its CI)"
        } else {
            "mean ± 95 % CI per value; grey: baseline"
        };
        title
            .draw_text(legend, &(FONT, 12).into_text_style(&title), (10, 27))
            .map_err(&err)?;
        let cols = (table.columns.len() as u32).min(MAX_PANELS_PER_ROW) as usize;
        let rows = table.columns.len().div_ceil(cols);
        let panels = body.split_evenly((rows, cols));
        for (panel, column) in panels.iter().zip(&table.columns) {
            if table.numeric_x {
                numeric_panel(panel, table, column)?;
            } else {
                category_panel(panel, table, column)?;
            }
        }
        root.present().map_err(&err)?;
    }
    let mut bytes = Vec::new();
    img.write_to(&mut std::io::Cursor::new(&mut bytes), image::ImageFormat::Png)
        .map_err(|e| PlotError::Encode {
            study: table.title.clone(),
            message: e.to_string(),
        })?;
    Ok(Some(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiment::results::study_tables;
    use crate::experiment::results::tests::{hand_plan, hand_results};

    fn decode(png: &[u8]) -> RgbImage {
        image::load_from_memory_with_format(png, image::ImageFormat::Png)
            .expect("a valid PNG")
            .to_rgb8()
    }

    #[test]
    fn numeric_study_plot_is_a_png_of_the_expected_size() -> Result<(), PlotError> {
        let resolution = hand_plan();
        let tables = study_tables(&resolution, &hand_results(&resolution));
        let png = study_plot_png(&tables[0])?.expect("a plot");
        if let Ok(dir) = std::env::var("FOCUSDPO_PLOT_DUMP") {
            let _ = std::fs::write(std::path::Path::new(&dir).join("numeric.png"), &png);
        }
        let img = decode(&png);
        assert_eq!(img.dimensions(), plot_size(3));
        assert_eq!(plot_size(3), (3 * PANEL_WIDTH_PX, TITLE_HEIGHT_PX + PANEL_HEIGHT_PX));
        assert_eq!(
            plot_size(4),
            (3 * PANEL_WIDTH_PX, TITLE_HEIGHT_PX + 2 * PANEL_HEIGHT_PX)
        );
        // Something is drawn in every panel and in the title (text rendered with the embedded font).
        let inked = |x0: u32, y0: u32, w: u32, h: u32| {
            (x0..x0 + w).any(|x| (y0..y0 + h).any(|y| img.get_pixel(x, y).0 != [255, 255, 255]))
        };
        assert!(inked(0, 0, 400, TITLE_HEIGHT_PX), "title");
        for k in 0..3 {
            assert!(
                inked(k * PANEL_WIDTH_PX, TITLE_HEIGHT_PX, PANEL_WIDTH_PX, PANEL_HEIGHT_PX),
                "panel {k}"
            );
        }
        Ok(())
    }

    #[test]
    fn y_labels_have_enough_decimals() {
        assert_eq!(y_decimals(0.0, 6.0), 1);
        assert_eq!(y_decimals(0.0, 0.6), 2);
        assert_eq!(y_decimals(0.51144, 0.51146), 6);
        assert_eq!(y_decimals(1.0, 1.0), 2);
    }

    #[test]
    fn categorical_plot_and_empty_tables() -> Result<(), PlotError> {
        let mut resolution = hand_plan();
        let mut table = study_tables(&resolution, &hand_results(&resolution)).remove(0);
        table.numeric_x = false;
        table.columns.truncate(1);
        let png = study_plot_png(&table)?.expect("a plot");
        if let Ok(dir) = std::env::var("FOCUSDPO_PLOT_DUMP") {
            let _ = std::fs::write(std::path::Path::new(&dir).join("categorical.png"), &png);
        }
        let img = decode(&png);
        assert_eq!(img.dimensions(), plot_size(1));
        table.columns.clear();
        assert_eq!(study_plot_png(&table)?, None);
        resolution.studies.clear();
        Ok(())
    }
}
