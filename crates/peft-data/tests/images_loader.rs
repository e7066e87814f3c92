//! The background batch loader: completeness, determinism across worker counts, resuming,
//! early drop, and bad-image handling.

mod images_common;

use std::time::{Duration, Instant};

use images_common::write_rgb;
use peft_data::image::{
    read_image_folder, ImageBatch, ImageConfig, ImageDataset, ImageLoader, LoaderOptions, Mode,
    OnBadImage, RawImages,
};

/// `n` 6×5 gray images whose pixels are their index, labels `i % 3`.
fn raw_dataset(n: usize) -> ImageDataset {
    let data = (0..n)
        .flat_map(|i| std::iter::repeat_n(i as u8, 30))
        .collect();
    let raw = RawImages::new("raw", 6, 5, 1, data).unwrap();
    let labels = (0..n).map(|i| (i % 3) as u32).collect();
    ImageDataset::from_raw(raw, labels, vec!["a".into(), "b".into(), "c".into()]).unwrap()
}

fn loader(data: ImageDataset, mode: Mode, batch_size: usize, workers: usize) -> ImageLoader {
    let options = LoaderOptions {
        batch_size,
        workers,
        prefetch: 2,
        drop_last: false,
    };
    ImageLoader::new(data, ImageConfig::new(8, 8), mode, 7, options).unwrap()
}

fn collect(loader: &ImageLoader, epoch: u64) -> Vec<ImageBatch> {
    loader.epoch(epoch).map(Result::unwrap).collect()
}

#[test]
fn every_item_once_in_the_same_order_for_any_worker_count() {
    let n = 103;
    for mode in [Mode::Train, Mode::Eval] {
        let reference = collect(&loader(raw_dataset(n), mode, 10, 1), 0);
        let mut seen: Vec<usize> = reference.iter().flat_map(|b| b.indices.clone()).collect();
        if mode == Mode::Eval {
            assert_eq!(seen, (0..n).collect::<Vec<_>>());
        }
        seen.sort_unstable();
        assert_eq!(seen, (0..n).collect::<Vec<_>>(), "{mode:?}");
        assert_eq!(reference.len(), 11);
        assert_eq!(reference.last().unwrap().batch_size, 3);
        for b in &reference {
            assert_eq!(b.pixels.len(), b.batch_size * 3 * 8 * 8);
            assert_eq!((b.height, b.width, b.skipped), (8, 8, 0));
            let expect: Vec<u32> = b.indices.iter().map(|&i| (i % 3) as u32).collect();
            assert_eq!(b.labels, expect);
        }
        for workers in [2, 3, 5] {
            let other = collect(&loader(raw_dataset(n), mode, 10, workers), 0);
            assert_eq!(other, reference, "{mode:?} with {workers} workers");
        }
    }
}

#[test]
fn epochs_reshuffle_and_resume_reproduces_batches() {
    let l = loader(raw_dataset(50), Mode::Train, 8, 2);
    let e0 = collect(&l, 0);
    let e1 = collect(&l, 1);
    assert_ne!(e0[0].indices, e1[0].indices);
    assert_eq!(e0, collect(&l, 0));
    // Resuming at batch 3 gives the same batches as the uninterrupted epoch.
    let resumed: Vec<ImageBatch> = l.epoch_from(1, 3).map(Result::unwrap).collect();
    assert_eq!(resumed, e1[3..]);
    // The synchronous path builds the same content.
    let plan = l.plan(1);
    assert_eq!(l.batch(1, &plan[4]).unwrap(), e1[4]);
    // drop_last.
    let options = LoaderOptions {
        batch_size: 8,
        drop_last: true,
        ..LoaderOptions::default()
    };
    let l = ImageLoader::new(
        raw_dataset(50),
        ImageConfig::new(8, 8),
        Mode::Train,
        7,
        options,
    )
    .unwrap();
    assert_eq!(l.num_batches(), 6);
    assert!(collect(&l, 0).iter().all(|b| b.batch_size == 8));
}

#[test]
fn dropping_mid_epoch_does_not_hang() {
    let l = loader(raw_dataset(5000), Mode::Train, 4, 3);
    let start = Instant::now();
    for take in [0, 1, 5] {
        let mut epoch = l.epoch(take as u64);
        for _ in 0..take {
            epoch.next().unwrap().unwrap();
        }
        // Let the workers fill the prefetch window and block on it.
        std::thread::sleep(Duration::from_millis(20));
        drop(epoch);
    }
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "{:?}",
        start.elapsed()
    );
}

#[test]
fn bad_images_are_skipped_and_counted_or_fail_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    for i in 0..10 {
        write_rgb(&root.join(format!("a/{i}.png")), 9, 7, i);
    }
    let good = std::fs::read(root.join("a/3.png")).unwrap();
    std::fs::write(root.join("a/3.png"), &good[..good.len() / 2]).unwrap(); // truncated
    std::fs::write(root.join("a/7.png"), b"garbage").unwrap();
    let data = read_image_folder(root).unwrap();
    let options = LoaderOptions {
        batch_size: 4,
        workers: 2,
        ..LoaderOptions::default()
    };

    let skip = ImageConfig {
        on_bad_image: OnBadImage::Skip,
        ..ImageConfig::new(8, 8)
    };
    let l = ImageLoader::new(data.clone(), skip, Mode::Eval, 0, options.clone()).unwrap();
    let mut epoch = l.epoch(0);
    let batches: Vec<ImageBatch> = epoch.by_ref().map(Result::unwrap).collect();
    let sizes: Vec<(usize, usize)> = batches.iter().map(|b| (b.batch_size, b.skipped)).collect();
    assert_eq!(sizes, [(3, 1), (3, 1), (2, 0)]);
    assert_eq!(epoch.skipped(), 2);
    assert!(
        epoch.bad_images()[0].contains("3.png"),
        "{:?}",
        epoch.bad_images()
    );
    assert!(
        epoch.bad_images()[1].contains("7.png"),
        "{:?}",
        epoch.bad_images()
    );
    let delivered: Vec<usize> = batches.iter().flat_map(|b| b.indices.clone()).collect();
    assert_eq!(delivered, [0, 1, 2, 4, 5, 6, 8, 9]);

    let fail = ImageConfig::new(8, 8);
    let l = ImageLoader::new(data, fail, Mode::Eval, 0, options).unwrap();
    let mut epoch = l.epoch(0);
    let e = epoch.next().unwrap().unwrap_err().to_string();
    assert!(
        e.contains("cannot decode image") && e.contains("3.png"),
        "{e}"
    );
    assert!(epoch.next().is_none(), "the epoch ends after an error");
}

#[test]
fn a_batch_of_only_bad_images_is_not_yielded() {
    let dir = tempfile::tempdir().unwrap();
    for i in 0..4 {
        std::fs::create_dir_all(dir.path().join("x")).unwrap();
        std::fs::write(dir.path().join(format!("x/{i}.png")), b"bad").unwrap();
    }
    write_rgb(&dir.path().join("x/9.png"), 4, 4, 0);
    let data = read_image_folder(dir.path()).unwrap();
    let config = ImageConfig {
        on_bad_image: OnBadImage::Skip,
        ..ImageConfig::new(4, 4)
    };
    let options = LoaderOptions {
        batch_size: 2,
        ..LoaderOptions::default()
    };
    let l = ImageLoader::new(data, config, Mode::Train, 0, options).unwrap();
    let mut epoch = l.epoch(0);
    let batches: Vec<ImageBatch> = epoch.by_ref().map(Result::unwrap).collect();
    assert_eq!(batches.iter().map(|b| b.batch_size).sum::<usize>(), 1);
    assert_eq!(epoch.skipped(), 4);
}

#[test]
fn options_are_validated() {
    for options in [
        LoaderOptions {
            batch_size: 0,
            ..LoaderOptions::default()
        },
        LoaderOptions {
            workers: 0,
            ..LoaderOptions::default()
        },
        LoaderOptions {
            prefetch: 0,
            ..LoaderOptions::default()
        },
    ] {
        assert!(ImageLoader::new(
            raw_dataset(3),
            ImageConfig::new(4, 4),
            Mode::Eval,
            0,
            options
        )
        .is_err());
    }
    let bad = ImageConfig::new(4, 5);
    assert!(
        ImageLoader::new(raw_dataset(3), bad, Mode::Eval, 0, LoaderOptions::default())
            .unwrap_err()
            .to_string()
            .contains("crop")
    );
}
