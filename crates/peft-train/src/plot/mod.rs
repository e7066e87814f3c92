//! A dependency-free SVG plot of a metrics log.
//!
//! Top panel: training loss per optimizer step (light) and its trailing moving average.
//! Bottom panel: validation F1 (left axis) and validation loss (right axis) per epoch, or per
//! step when evaluations carry no epoch.

use std::fmt::Write;
use std::path::Path;

mod draw;

use draw::{legend, markers, polyline, x_axis, y_axis, Axis, Panel, Side};

use crate::error::Result;
use crate::log::{Event, LogRecord};

const WIDTH: f64 = 860.0;
const HEIGHT: f64 = 640.0;
const LOSS_LIGHT: &str = "#9ecae1";
const LOSS_AVG: &str = "#08519c";
const F1_COLOR: &str = "#d95f02";
const EVAL_LOSS_COLOR: &str = "#1b9e77";
/// Most points drawn per curve; longer curves are thinned evenly.
const MAX_POINTS: usize = 2000;

/// Writes the plot of `records` to `path` (atomically).
pub fn svg_plot(records: &[LogRecord], path: impl AsRef<Path>) -> Result<()> {
    Ok(peft_core::fsio::write_atomic(
        path.as_ref(),
        render_svg(records).as_bytes(),
    )?)
}

/// The plot of `records` as an SVG document.
pub fn render_svg(records: &[LogRecord]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<rect width="{WIDTH}" height="{HEIGHT}" fill="white"/>"#
    );
    train_panel(&mut s, records, Panel::new(40.0));
    eval_panel(&mut s, records, Panel::new(370.0));
    s.push_str("</svg>\n");
    s
}

/// Points `(x, y)` of the records where both are finite.
fn series(
    records: &[&LogRecord],
    x: impl Fn(&LogRecord) -> Option<f64>,
    y: impl Fn(&LogRecord) -> Option<f64>,
) -> Vec<(f64, f64)> {
    records
        .iter()
        .filter_map(|r| Some((x(r)?, y(r)?)))
        .filter(|(a, b)| a.is_finite() && b.is_finite())
        .collect()
}

/// Trailing moving average over `window` points.
fn moving_average(pts: &[(f64, f64)], window: usize) -> Vec<(f64, f64)> {
    let mut sum = 0.0;
    let mut out = Vec::with_capacity(pts.len());
    for (i, &(x, y)) in pts.iter().enumerate() {
        sum += y;
        if i >= window {
            sum -= pts[i - window].1;
        }
        out.push((x, sum / (i + 1).min(window) as f64));
    }
    out
}

fn train_panel(s: &mut String, records: &[LogRecord], p: Panel) {
    p.frame(s, "Training loss");
    let train: Vec<&LogRecord> = records.iter().filter(|r| r.event == Event::Train).collect();
    let pts = series(&train, |r| Some(r.step as f64), |r| r.loss);
    let xa = Axis::covering(pts.iter().map(|p| p.0));
    let ya = Axis::covering(pts.iter().map(|p| p.1));
    x_axis(s, &p, &xa, "step");
    y_axis(s, &p, &ya, "loss", Side::Left, "#444");
    if pts.is_empty() {
        return p.no_data(s);
    }
    let window = (pts.len() / 20).clamp(1, 100);
    polyline(s, &p, (&xa, &ya), &pts, LOSS_LIGHT, 1.0);
    polyline(
        s,
        &p,
        (&xa, &ya),
        &moving_average(&pts, window),
        LOSS_AVG,
        2.0,
    );
    let avg = format!("moving average ({window})");
    legend(s, &p, &[("loss per step", LOSS_LIGHT), (&avg, LOSS_AVG)]);
}

fn eval_panel(s: &mut String, records: &[LogRecord], p: Panel) {
    p.frame(s, "Validation");
    let eval: Vec<&LogRecord> = records.iter().filter(|r| r.event == Event::Eval).collect();
    let by_epoch = !eval.is_empty() && eval.iter().all(|r| r.epoch.is_some());
    let x = |r: &LogRecord| {
        if by_epoch {
            r.epoch
        } else {
            Some(r.step as f64)
        }
    };
    let f1 = series(&eval, x, |r| r.f1);
    let loss = series(&eval, x, |r| r.loss);
    let xa = Axis::covering(f1.iter().chain(&loss).map(|p| p.0));
    x_axis(s, &p, &xa, if by_epoch { "epoch" } else { "step" });
    let in_unit = f1.iter().all(|p| (0.0..=1.0).contains(&p.1));
    let fa = Axis::covering(
        f1.iter()
            .map(|p| p.1)
            .chain(in_unit.then_some([0.0, 1.0]).into_iter().flatten()),
    );
    y_axis(s, &p, &fa, "F1", Side::Left, F1_COLOR);
    if f1.is_empty() && loss.is_empty() {
        return p.no_data(s);
    }
    let mut entries = Vec::new();
    if !f1.is_empty() {
        polyline(s, &p, (&xa, &fa), &f1, F1_COLOR, 2.0);
        markers(s, &p, (&xa, &fa), &f1, F1_COLOR);
        entries.push(("F1", F1_COLOR));
    }
    if !loss.is_empty() {
        let la = Axis::covering(loss.iter().map(|p| p.1));
        y_axis(s, &p, &la, "loss", Side::Right, EVAL_LOSS_COLOR);
        polyline(s, &p, (&xa, &la), &loss, EVAL_LOSS_COLOR, 2.0);
        markers(s, &p, (&xa, &la), &loss, EVAL_LOSS_COLOR);
        entries.push(("loss", EVAL_LOSS_COLOR));
    }
    legend(s, &p, &entries);
}

#[cfg(test)]
mod tests;
