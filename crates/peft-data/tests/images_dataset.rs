//! Decoding and channel conversion, stratified subsets and splits, and the pipeline config.

mod images_common;

use images_common::write_rgb;
use peft_data::image::{Bitmap, ImageConfig, ImageDataset, ImageSource, OnBadImage, RawImages};
use peft_data::DataError;

fn err_text<T: std::fmt::Debug>(r: Result<T, DataError>) -> String {
    r.unwrap_err().to_string()
}

// ---------------------------------------------------------------- decoding

#[test]
fn decoding_converts_channels_and_names_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let rgba = image::RgbaImage::from_raw(2, 1, vec![10, 20, 30, 0, 40, 50, 60, 255]).unwrap();
    rgba.save(d.join("rgba.png")).unwrap();
    let b = Bitmap::open(d.join("rgba.png")).unwrap();
    assert_eq!((b.channels(), b.data()), (3, &[10, 20, 30, 40, 50, 60][..]));
    image::GrayAlphaImage::from_raw(1, 1, vec![77, 3])
        .unwrap()
        .save(d.join("la.png"))
        .unwrap();
    let b = Bitmap::open(d.join("la.png")).unwrap();
    assert_eq!(
        (b.channels(), b.data(), b.to_rgb().data()),
        (1, &[77][..], &[77, 77, 77][..])
    );
    // 16-bit: wrong format, named.
    image::ImageBuffer::<image::Rgb<u16>, _>::from_raw(1, 1, vec![1u16, 2, 3])
        .unwrap()
        .save(d.join("deep.png"))
        .unwrap();
    let e = err_text(Bitmap::open(d.join("deep.png")));
    assert!(
        e.contains("deep.png") && e.contains("unsupported pixel format Rgb16"),
        "{e}"
    );
    // Truncated PNG, garbage, missing file.
    write_rgb(&d.join("ok.png"), 16, 16, 0);
    let bytes = std::fs::read(d.join("ok.png")).unwrap();
    std::fs::write(d.join("cut.png"), &bytes[..bytes.len() / 2]).unwrap();
    let e = err_text(Bitmap::open(d.join("cut.png")));
    assert!(
        e.starts_with("cannot decode image") && e.contains("cut.png"),
        "{e}"
    );
    std::fs::write(d.join("junk.jpg"), b"not an image at all").unwrap();
    assert!(err_text(Bitmap::open(d.join("junk.jpg"))).contains("junk.jpg"));
    assert!(err_text(Bitmap::open(d.join("gone.png"))).contains("gone.png"));
}

// ---------------------------------------------------------------- splits and subsets

fn toy(counts: &[usize]) -> ImageDataset {
    let labels: Vec<u32> = counts
        .iter()
        .enumerate()
        .flat_map(|(c, &n)| std::iter::repeat_n(c as u32, n))
        .collect();
    let raw = RawImages::new("toy", 1, 1, 1, vec![0; labels.len()]).unwrap();
    let classes = (0..counts.len()).map(|c| format!("c{c}")).collect();
    ImageDataset::from_raw(raw, labels, classes).unwrap()
}

#[test]
fn limit_and_split_are_stratified_and_seeded() {
    let data = toy(&[600, 300, 100]);
    let small = data.limit(100, 1).unwrap();
    assert_eq!(small.class_counts(), [60, 30, 10]);
    let picked = |d: &ImageDataset| {
        d.items()
            .iter()
            .map(|i| i.source.clone())
            .collect::<Vec<_>>()
    };
    assert_eq!(picked(&small), picked(&data.limit(100, 1).unwrap()));
    assert_ne!(picked(&small), picked(&data.limit(100, 2).unwrap()));
    // Largest remainder: 7 of (600, 300, 100) = (4.2, 2.1, 0.7) -> (4, 2, 1).
    assert_eq!(data.limit(7, 0).unwrap().class_counts(), [4, 2, 1]);
    assert_eq!(data.limit(5000, 0).unwrap().len(), 1000);
    assert!(data.limit(0, 0).is_err());
    let (rest, valid) = data.split_off(0.1, 5).unwrap();
    assert_eq!(valid.class_counts(), [60, 30, 10]);
    assert_eq!(rest.class_counts(), [540, 270, 90]);
    let mut all: Vec<_> = picked(&rest).into_iter().chain(picked(&valid)).collect();
    all.sort_by_key(|s| match s {
        ImageSource::Raw(i) => *i,
        ImageSource::File(_) => usize::MAX,
    });
    assert_eq!(all, (0..1000).map(ImageSource::Raw).collect::<Vec<_>>());
    for bad in [0.0, 1.0, -0.5, 0.0001] {
        assert!(data.split_off(bad, 0).is_err(), "{bad}");
    }
}

// ---------------------------------------------------------------- config

#[test]
fn config_validation_names_the_option() {
    assert!(ImageConfig::default().validate().is_ok());
    let bad = |f: &dyn Fn(&mut ImageConfig), name: &str| {
        let mut c = ImageConfig::new(64, 64);
        f(&mut c);
        let e = err_text(c.validate());
        assert!(e.contains(name), "{e}");
    };
    bad(&|c| c.crop = 65, "crop");
    bad(&|c| c.resize = 0, "resize");
    bad(&|c| c.std[1] = 0.0, "std");
    bad(&|c| c.mean[2] = f32::NAN, "mean");
    bad(&|c| c.augment.scale = [0.5, 0.1], "augment.scale");
    bad(&|c| c.augment.ratio = [0.0, 1.0], "augment.ratio");
    bad(
        &|c| c.augment.flip_probability = 1.5,
        "augment.flip_probability",
    );
    let c: ImageConfig =
        serde_json::from_str(r#"{"resize": 32, "crop": 28, "on_bad_image": "skip"}"#).unwrap();
    assert_eq!(
        (c.resize, c.crop, c.on_bad_image),
        (32, 28, OnBadImage::Skip)
    );
    assert!(serde_json::from_str::<ImageConfig>(r#"{"augment": {"flip": true}}"#).is_err());
    assert!(serde_json::from_str::<ImageConfig>(r#"{"on_bad_image": "ignore"}"#).is_err());
}
