//! Training augmentation: reproducible per (seed, epoch, item), exact flips, crop boxes
//! inside the image, plausible crop statistics.

mod images_common;

use peft_data::image::{
    random_resized_crop_box, AugmentConfig, Bitmap, ImageConfig, ItemRng, Preprocessor,
};

fn picture(w: usize, h: usize) -> Bitmap {
    Bitmap::new(w, h, 3, images_common::rgb_pixels(w as u32, h as u32, 5)).unwrap()
}

fn train(pre: &Preprocessor, image: &Bitmap, seed: u64, epoch: u64, index: u64) -> Vec<f32> {
    let mut out = vec![0f32; pre.config().image_len()];
    let mut rng = ItemRng::new(seed, epoch, index);
    pre.train_into(image, &mut rng, &mut out).unwrap();
    out
}

#[test]
fn same_key_same_pixels_other_keys_differ() {
    let pre = Preprocessor::new(ImageConfig::new(24, 24)).unwrap();
    let image = picture(40, 30);
    let a = train(&pre, &image, 1, 2, 3);
    assert_eq!(a, train(&pre, &image, 1, 2, 3));
    for (seed, epoch, index) in [(2, 2, 3), (1, 3, 3), (1, 2, 4)] {
        assert_ne!(
            a,
            train(&pre, &image, seed, epoch, index),
            "{seed} {epoch} {index}"
        );
    }
}

#[test]
fn flip_is_an_exact_mirror() {
    let config = |p: f64| ImageConfig {
        augment: AugmentConfig {
            random_resized_crop: false,
            flip_probability: p,
            ..AugmentConfig::default()
        },
        ..ImageConfig::new(20, 16)
    };
    let image = picture(33, 21);
    let always = Preprocessor::new(config(1.0)).unwrap();
    let never = Preprocessor::new(config(0.0)).unwrap();
    let mut rng = ItemRng::new(0, 0, 0);
    let flipped = always.train_bitmap(&image, &mut rng).unwrap();
    let plain = never.train_bitmap(&image, &mut rng).unwrap();
    assert_eq!(plain, never.eval_bitmap(&image).unwrap());
    for y in 0..16 {
        for x in 0..16 {
            for c in 0..3 {
                assert_eq!(flipped.get(x, y, c), plain.get(15 - x, y, c));
            }
        }
    }
    // About half of the items are flipped at p = 0.5.
    let half = Preprocessor::new(config(0.5)).unwrap();
    let flips = (0..1000)
        .filter(|&i| {
            half.train_bitmap(&image, &mut ItemRng::new(9, 0, i))
                .unwrap()
                != plain
        })
        .count();
    assert!((430..=570).contains(&flips), "{flips}");
}

#[test]
fn crop_boxes_fit_every_image_shape() {
    let sizes = [
        (1, 1),
        (1, 100),
        (100, 1),
        (2, 3),
        (28, 28),
        (640, 480),
        (31, 977),
    ];
    let ranges = [
        ([0.08, 1.0], [0.75, 4.0 / 3.0]),
        ([0.9, 1.0], [0.1, 10.0]),
        ([1.0, 1.0], [2.0, 2.0]),
    ];
    for (w, h) in sizes {
        for (scale, ratio) in ranges {
            for i in 0..300 {
                let mut rng = ItemRng::new(4, 0, i);
                let b = random_resized_crop_box(w, h, scale, ratio, &mut rng);
                assert!(b.fits(w, h), "{b:?} in {w}×{h}");
            }
        }
    }
    // The output is always crop × crop, also for tiny images (upscaled).
    let pre = Preprocessor::new(ImageConfig::new(16, 16)).unwrap();
    for (w, h) in [(1, 1), (1, 9), (300, 2)] {
        let out = pre
            .train_bitmap(&picture(w, h), &mut ItemRng::new(0, 0, 0))
            .unwrap();
        assert_eq!((out.width(), out.height()), (16, 16));
    }
}

#[test]
fn crop_statistics_match_torchvision() {
    // torchvision's get_params on a 500×500 image (simulated in Python, 20k draws): mean area
    // fraction 0.479, 28% of crops under 0.3 of the area, no fallback.
    let (w, h) = (500, 500);
    let n = 20_000;
    let mut fractions = Vec::with_capacity(n);
    for i in 0..n as u64 {
        let mut rng = ItemRng::new(11, 0, i);
        let b = random_resized_crop_box(w, h, [0.08, 1.0], [0.75, 4.0 / 3.0], &mut rng);
        let f = (b.width * b.height) as f64 / (w * h) as f64;
        assert!((0.075..=1.0).contains(&f), "{b:?}");
        let r = b.width as f64 / b.height as f64;
        assert!((0.74..=1.35).contains(&r), "{b:?}");
        fractions.push(f);
    }
    let mean = fractions.iter().sum::<f64>() / n as f64;
    let small = fractions.iter().filter(|&&f| f < 0.3).count() as f64 / n as f64;
    assert!((0.46..=0.50).contains(&mean), "mean area fraction {mean}");
    assert!((0.26..=0.30).contains(&small), "share under 0.3: {small}");
    // Positions cover the image: left offsets of small crops spread over the width.
    let lefts: Vec<usize> = (0..2000)
        .map(|i| {
            random_resized_crop_box(w, h, [0.08, 0.1], [1.0, 1.0], &mut ItemRng::new(1, 1, i)).left
        })
        .collect();
    assert!(lefts.iter().any(|&l| l < 50) && lefts.iter().any(|&l| l > 300));
}
