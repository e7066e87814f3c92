//! Tests of the SVG plot.

use super::*;
use crate::log::{read_log, MetricsLog};

/// Checks that every element is closed in order (a small well-formedness check).
fn assert_well_formed(svg: &str) {
    assert!(svg.starts_with("<svg xmlns=\"http://www.w3.org/2000/svg\""));
    assert!(svg.ends_with("</svg>\n"));
    let mut stack: Vec<&str> = Vec::new();
    let mut rest = svg;
    while let Some(start) = rest.find('<') {
        let end = rest[start..].find('>').expect("unclosed tag") + start;
        let tag = &rest[start + 1..end];
        assert!(!tag.contains('<'), "nested '<' in {tag}");
        assert_eq!(
            tag.matches('"').count() % 2,
            0,
            "unbalanced quotes in {tag}"
        );
        if let Some(name) = tag.strip_prefix('/') {
            assert_eq!(stack.pop(), Some(name), "mismatched </{name}>");
        } else if !tag.ends_with('/') {
            stack.push(tag.split_whitespace().next().unwrap());
        }
        let text = &rest[end + 1..];
        let next = text.find('<').unwrap_or(text.len());
        assert!(!text[..next].contains('&'), "unescaped '&'");
        rest = text;
    }
    assert!(stack.is_empty(), "unclosed {stack:?}");
}

fn records() -> Vec<LogRecord> {
    let mut out = Vec::new();
    for step in 1..=300u64 {
        let loss = 2.0 / (1.0 + step as f64 / 50.0) + 0.1 * ((step * 7 % 11) as f64 / 11.0);
        out.push(LogRecord {
            step,
            epoch: Some(step as f64 / 100.0),
            loss: Some(loss),
            lr: Some(1e-3),
            ..LogRecord::default()
        });
        if step % 100 == 0 {
            out.push(LogRecord {
                event: Event::Eval,
                step,
                epoch: Some(step as f64 / 100.0),
                loss: Some(0.5 - step as f64 / 1000.0),
                f1: Some(0.6 + step as f64 / 1000.0),
                ..LogRecord::default()
            });
        }
    }
    out
}

#[test]
fn plot_from_reread_log_is_well_formed() {
    let dir = tempfile::tempdir().unwrap();
    let log_path = dir.path().join("metrics.jsonl");
    let mut log = MetricsLog::create(&log_path).unwrap();
    for r in records() {
        log.log(&r).unwrap();
    }
    let back = read_log(&log_path).unwrap();
    assert_eq!(back.len(), records().len());
    for (a, b) in back.iter().zip(records()) {
        assert_eq!((a.event, a.step), (b.event, b.step));
        assert!((a.loss.unwrap() - b.loss.unwrap()).abs() < 1e-12);
    }
    let svg_path = dir.path().join("curves.svg");
    svg_plot(&back, &svg_path).unwrap();
    let svg = std::fs::read_to_string(&svg_path).unwrap();
    assert_well_formed(&svg);
    // Raw loss, its moving average, F1 and eval loss.
    assert_eq!(svg.matches("<polyline").count(), 4);
    assert!(svg.contains(LOSS_AVG) && svg.contains(F1_COLOR) && svg.contains(EVAL_LOSS_COLOR));
    assert!(svg.contains(">epoch</text>") && svg.contains(">step</text>"));
    assert!(svg.contains("moving average (15)"));
    assert_eq!(svg.matches("<circle").count(), 6);
    // Only the SVG and the log in the directory: the write left no temp file.
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 2);
}

#[test]
fn empty_and_degenerate_logs_still_plot() {
    let svg = render_svg(&[]);
    assert_well_formed(&svg);
    assert_eq!(svg.matches("no data").count(), 2);
    let one = LogRecord {
        step: 5,
        loss: Some(f64::NAN),
        ..LogRecord::default()
    };
    let flat = LogRecord {
        event: Event::Eval,
        step: 5,
        f1: Some(0.0),
        ..LogRecord::default()
    };
    let svg = render_svg(&[one, flat]);
    assert_well_formed(&svg);
    assert!(svg.contains(">step</text>"));
    assert!(!svg.contains("NaN") && !svg.contains("inf"));
}

#[test]
fn long_curves_are_thinned() {
    let many: Vec<LogRecord> = (0..50_000u64)
        .map(|step| LogRecord {
            step,
            loss: Some(1.0 + (step % 13) as f64),
            ..LogRecord::default()
        })
        .collect();
    let svg = render_svg(&many);
    assert_well_formed(&svg);
    let line = svg.lines().find(|l| l.starts_with("<polyline")).unwrap();
    assert!(line.matches(',').count() <= MAX_POINTS + 1);
}

#[test]
fn axis_ticks_are_round() {
    let a = Axis::covering([0.0, 0.87].into_iter());
    assert_eq!((a.lo, a.hi, a.step), (0.0, 1.0, 0.2));
    assert_eq!(a.label(0.2), "0.2");
    let a = Axis::covering([1.0, 300.0].into_iter());
    assert_eq!((a.lo, a.hi, a.step), (0.0, 300.0, 50.0));
    assert_eq!(a.label(150.0), "150");
    let a = Axis::covering([3.0, 3.0].into_iter());
    assert!(a.lo < 3.0 && a.hi > 3.0);
}
