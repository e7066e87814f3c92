//! SVG drawing primitives: panels, axes with round ticks, curves, markers and legends.

use std::fmt::Write;

use super::{MAX_POINTS, WIDTH};

/// A plotting area in SVG coordinates.
#[derive(Clone, Copy)]
pub(super) struct Panel {
    x0: f64,
    y0: f64,
    w: f64,
    h: f64,
}

impl Panel {
    pub(super) fn new(top: f64) -> Self {
        Self {
            x0: 75.0,
            y0: top,
            w: WIDTH - 150.0,
            h: 220.0,
        }
    }

    fn px(&self, a: &Axis, x: f64) -> f64 {
        self.x0 + (x - a.lo) / (a.hi - a.lo) * self.w
    }

    fn py(&self, a: &Axis, y: f64) -> f64 {
        self.y0 + self.h - (y - a.lo) / (a.hi - a.lo) * self.h
    }

    pub(super) fn frame(&self, s: &mut String, title: &str) {
        let (x, y, w, h) = (self.x0, self.y0, self.w, self.h);
        let _ = writeln!(
            s,
            r##"<rect x="{x}" y="{y}" width="{w}" height="{h}" fill="none" stroke="#444"/>"##
        );
        let tx = x + w / 2.0;
        let _ = writeln!(
            s,
            r#"<text x="{tx}" y="{}" text-anchor="middle" font-size="14">{title}</text>"#,
            y - 12.0
        );
    }

    pub(super) fn no_data(&self, s: &mut String) {
        let (x, y) = (self.x0 + self.w / 2.0, self.y0 + self.h / 2.0);
        let _ = writeln!(
            s,
            r##"<text x="{x}" y="{y}" text-anchor="middle" fill="#888">no data</text>"##
        );
    }
}

/// An axis range with round tick values.
pub(super) struct Axis {
    pub(super) lo: f64,
    pub(super) hi: f64,
    pub(super) step: f64,
}

impl Axis {
    /// A range covering `values` with about five ticks at 1, 2 or 5 times a power of ten.
    pub(super) fn covering(values: impl Iterator<Item = f64>) -> Self {
        let (mut lo, mut hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(l, h), v| {
            (l.min(v), h.max(v))
        });
        if !lo.is_finite() || !hi.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if hi - lo < 1e-12 * lo.abs().max(1.0) {
            let pad = (lo.abs() * 0.1).max(0.5);
            (lo, hi) = (lo - pad, hi + pad);
        }
        let raw = (hi - lo) / 5.0;
        let mag = 10f64.powf(raw.log10().floor());
        let step = mag
            * match raw / mag {
                r if r < 1.5 => 1.0,
                r if r < 3.0 => 2.0,
                r if r < 7.0 => 5.0,
                _ => 10.0,
            };
        Self {
            lo: (lo / step).floor() * step,
            hi: (hi / step).ceil() * step,
            step,
        }
    }

    fn ticks(&self) -> impl Iterator<Item = f64> + '_ {
        let n = ((self.hi - self.lo) / self.step).round() as usize;
        (0..=n).map(move |i| self.lo + i as f64 * self.step)
    }

    pub(super) fn label(&self, v: f64) -> String {
        let decimals = (-self.step.log10().floor()).clamp(0.0, 8.0) as usize;
        format!("{v:.decimals$}")
    }
}

/// Which side a vertical axis is drawn on.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum Side {
    Left,
    Right,
}

/// Bottom axis: grid lines, ticks, tick labels and the axis label.
pub(super) fn x_axis(s: &mut String, p: &Panel, a: &Axis, label: &str) {
    let bottom = p.y0 + p.h;
    for t in a.ticks() {
        let x = p.px(a, t);
        let _ = writeln!(
            s,
            r##"<line x1="{x:.2}" y1="{}" x2="{x:.2}" y2="{bottom}" stroke="#eee"/>"##,
            p.y0
        );
        let _ = writeln!(
            s,
            r##"<line x1="{x:.2}" y1="{bottom}" x2="{x:.2}" y2="{}" stroke="#444"/>"##,
            bottom + 5.0
        );
        let _ = writeln!(
            s,
            r#"<text x="{x:.2}" y="{}" text-anchor="middle">{}</text>"#,
            bottom + 18.0,
            a.label(t)
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">{label}</text>"#,
        p.x0 + p.w / 2.0,
        bottom + 36.0
    );
}

/// A vertical axis on either side; the left one also draws horizontal grid lines.
pub(super) fn y_axis(s: &mut String, p: &Panel, a: &Axis, label: &str, side: Side, color: &str) {
    let (edge, dir, anchor) = match side {
        Side::Left => (p.x0, -1.0, "end"),
        Side::Right => (p.x0 + p.w, 1.0, "start"),
    };
    for t in a.ticks() {
        let y = p.py(a, t);
        if side == Side::Left {
            let _ = writeln!(
                s,
                r##"<line x1="{}" y1="{y:.2}" x2="{}" y2="{y:.2}" stroke="#eee"/>"##,
                p.x0,
                p.x0 + p.w
            );
        }
        let _ = writeln!(
            s,
            r#"<line x1="{edge}" y1="{y:.2}" x2="{}" y2="{y:.2}" stroke="{color}"/>"#,
            edge + 5.0 * dir
        );
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.2}" text-anchor="{anchor}" fill="{color}">{}</text>"#,
            edge + 8.0 * dir,
            y + 4.0,
            a.label(t)
        );
    }
    let (x, y) = (edge + 58.0 * dir, p.y0 + p.h / 2.0);
    let _ = writeln!(
        s,
        r#"<text x="{x}" y="{y}" text-anchor="middle" fill="{color}" transform="rotate(-90 {x} {y})">{label}</text>"#
    );
}

/// A curve through `pts` (data coordinates), thinned to at most `MAX_POINTS` points.
pub(super) fn polyline(
    s: &mut String,
    p: &Panel,
    ax: (&Axis, &Axis),
    pts: &[(f64, f64)],
    color: &str,
    width: f64,
) {
    let stride = pts.len().div_ceil(MAX_POINTS).max(1);
    let mut coords = String::new();
    for (i, &(x, y)) in pts.iter().enumerate() {
        if i % stride == 0 || i + 1 == pts.len() {
            let _ = write!(coords, "{:.2},{:.2} ", p.px(ax.0, x), p.py(ax.1, y));
        }
    }
    let _ = writeln!(
        s,
        r#"<polyline fill="none" stroke="{color}" stroke-width="{width}" points="{}"/>"#,
        coords.trim_end()
    );
}

/// A dot at each point.
pub(super) fn markers(
    s: &mut String,
    p: &Panel,
    ax: (&Axis, &Axis),
    pts: &[(f64, f64)],
    color: &str,
) {
    for &(x, y) in pts {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.2}" cy="{:.2}" r="3" fill="{color}"/>"#,
            p.px(ax.0, x),
            p.py(ax.1, y)
        );
    }
}

/// A legend box in the top right corner of the panel.
pub(super) fn legend(s: &mut String, p: &Panel, entries: &[(&str, &str)]) {
    let (left, top) = (p.x0 + p.w - 178.0, p.y0 + 6.0);
    let height = 16.0 * entries.len() as f64 + 8.0;
    let _ = writeln!(
        s,
        r##"<rect x="{left}" y="{top}" width="170" height="{height}" fill="white" fill-opacity="0.85" stroke="#ccc"/>"##
    );
    for (i, (name, color)) in entries.iter().enumerate() {
        let (x, y) = (left + 8.0, top + 12.0 + 16.0 * i as f64);
        let _ = writeln!(
            s,
            r#"<line x1="{x}" y1="{y}" x2="{}" y2="{y}" stroke="{color}" stroke-width="2"/>"#,
            x + 20.0
        );
        let _ = writeln!(s, r#"<text x="{}" y="{}">{name}</text>"#, x + 26.0, y + 4.0);
    }
}
