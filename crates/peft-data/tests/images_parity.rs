//! Parity of the preprocessing with Pillow + torchvision math, on the committed fixtures of
//! `tests/fixtures/images/gen_image_fixtures.py`.

mod images_common;

use peft_data::image::{AugmentConfig, Bitmap, CropBox, ImageConfig, Preprocessor};
use serde_json::Value;

/// PNG cases are byte-exact in `u8` (same fixed-point arithmetic as Pillow) and bit-exact after
/// normalisation (same `f32` operations as torch); the margin only guards float formatting.
const PNG_TOLERANCE: f32 = 1e-6;

/// JPEG decoders differ (zune-jpeg vs libjpeg-turbo): allow 2 `u8` levels (1 measured),
/// scaled by the largest 1/std.
const JPEG_LEVELS: f32 = 2.0;

fn read_f32(path: &std::path::Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

fn floats(v: &Value) -> Vec<f64> {
    v.as_array()
        .unwrap()
        .iter()
        .map(|x| x.as_f64().unwrap())
        .collect()
}

fn three(v: &Value) -> [f32; 3] {
    let f = floats(v);
    [f[0] as f32, f[1] as f32, f[2] as f32]
}

#[test]
fn preprocessing_matches_pillow_and_torchvision() {
    let dir = images_common::fixtures();
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("manifest.json")).unwrap()).unwrap();
    let cases = manifest["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    let mut worst_png = 0f32;
    for case in cases {
        let name = case["name"].as_str().unwrap();
        let image = Bitmap::open(dir.join(case["image"].as_str().unwrap())).unwrap();
        let expected = read_f32(&dir.join(case["expected"].as_str().unwrap()));
        let shape = floats(&case["shape"]);
        let (mean, std) = (three(&case["mean"]), three(&case["std"]));
        let side = shape[1] as usize;
        assert_eq!((shape[0], shape[2] as usize), (3.0, side), "{name}");
        let mut out = vec![0f32; 3 * side * side];
        match case["op"].as_str().unwrap() {
            "eval" => {
                let resize = case["resize"].as_u64().unwrap() as usize;
                let config = ImageConfig {
                    mean,
                    std,
                    ..ImageConfig::new(resize, side)
                };
                Preprocessor::new(config)
                    .unwrap()
                    .eval_into(&image, &mut out)
                    .unwrap();
            }
            "resized_crop" => {
                let b = floats(&case["box"]);
                let area = CropBox {
                    top: b[0] as usize,
                    left: b[1] as usize,
                    height: b[2] as usize,
                    width: b[3] as usize,
                };
                let config = ImageConfig {
                    mean,
                    std,
                    augment: AugmentConfig::none(),
                    ..ImageConfig::new(side, side)
                };
                let pre = Preprocessor::new(config).unwrap();
                let cropped = pre.resizer().resize_area(&image, area, side, side).unwrap();
                pre.normalize_into(&cropped, &mut out).unwrap();
            }
            op => panic!("unknown op {op}"),
        }
        assert_eq!(out.len(), expected.len(), "{name}");
        let diff = out
            .iter()
            .zip(&expected)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        let is_jpeg = case["image"].as_str().unwrap().ends_with(".jpg");
        let tolerance = if is_jpeg {
            JPEG_LEVELS / 255.0 / std.iter().copied().fold(f32::INFINITY, f32::min)
        } else {
            worst_png = worst_png.max(diff);
            PNG_TOLERANCE
        };
        println!("{name}: max abs difference {diff:e} (tolerance {tolerance:e})");
        assert!(
            diff <= tolerance,
            "{name}: max abs difference {diff} > {tolerance}"
        );
    }
    println!("worst PNG difference: {worst_png:e}");
}
