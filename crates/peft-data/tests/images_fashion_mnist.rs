//! Checks on the real Fashion-MNIST files when `assets/data/fashion-mnist` holds them; skipped
//! with a note otherwise, unless `PEFT_RS_REQUIRE_ASSETS=1`. Also prints the loader's
//! throughput on the 28×28 gray → 64×64 RGB path (not asserted):
//!
//! `cargo test -p peft-data --release --test images_fashion_mnist -- --nocapture`

use std::path::{Path, PathBuf};
use std::time::Instant;

use peft_data::image::{
    read_idx_dir, ImageConfig, ImageDataset, ImageLoader, LoaderOptions, Mode,
    FASHION_MNIST_CLASSES,
};

fn fashion_dir() -> Option<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../assets/data/fashion-mnist");
    if dir.join("train-images-idx3-ubyte.gz").is_file() {
        return Some(dir);
    }
    assert!(
        std::env::var("PEFT_RS_REQUIRE_ASSETS").as_deref() != Ok("1"),
        "PEFT_RS_REQUIRE_ASSETS=1 but {} has no Fashion-MNIST files",
        dir.display()
    );
    eprintln!("note: skipped, assets/data/fashion-mnist absent (run scripts/setup-assets.sh)");
    None
}

fn pixel_sum(data: &ImageDataset, i: usize) -> u64 {
    data.load(i)
        .unwrap()
        .data()
        .iter()
        .map(|&p| u64::from(p))
        .sum()
}

#[test]
fn fashion_mnist_splits_labels_and_subsets() {
    let Some(dir) = fashion_dir() else { return };
    let splits = read_idx_dir(&dir, Some(&FASHION_MNIST_CLASSES)).unwrap();
    let (train, test) = (&splits.train, splits.test.as_ref().unwrap());
    assert_eq!((train.len(), test.len()), (60_000, 10_000));
    assert_eq!(train.classes()[0], "T-shirt/top");
    assert_eq!(train.class_counts(), [6000; 10]);
    assert_eq!(test.class_counts(), [1000; 10]);
    assert_eq!(train.labels()[..5], [9, 0, 0, 3, 0]);
    assert_eq!(test.labels()[..5], [9, 2, 1, 1, 6]);
    let first = train.load(0).unwrap();
    assert_eq!(
        (first.width(), first.height(), first.channels()),
        (28, 28, 1)
    );
    assert_eq!((pixel_sum(train, 0), pixel_sum(train, 2)), (76_247, 28_662));
    assert_eq!(pixel_sum(test, 1), 100_994);

    let small = train.limit(20_000, 0).unwrap();
    assert_eq!(small.class_counts(), [2000; 10]);
    let splits = splits.with_valid_fraction(1.0 / 12.0, 0).unwrap();
    assert_eq!(splits.valid.as_ref().unwrap().class_counts(), [500; 10]);
    assert_eq!(splits.train.class_counts(), [5500; 10]);
}

#[test]
fn fashion_mnist_loader_throughput() {
    let Some(dir) = fashion_dir() else { return };
    let splits = read_idx_dir(&dir, Some(&FASHION_MNIST_CLASSES)).unwrap();
    let config = ImageConfig {
        mean: [0.5; 3],
        std: [0.5; 3],
        ..ImageConfig::new(64, 64)
    };
    let options = LoaderOptions::default(); // 64 per batch, 2 workers
    let test = splits.test.unwrap();
    let train = splits.train.limit(20_000, 0).unwrap();
    for (name, data, mode) in [("eval", test, Mode::Eval), ("train", train, Mode::Train)] {
        let n = data.len();
        let loader = ImageLoader::new(data, config.clone(), mode, 0, options.clone()).unwrap();
        let start = Instant::now();
        let mut images = 0;
        for batch in loader.epoch(0) {
            let batch = batch.unwrap();
            assert_eq!(batch.pixels.len(), batch.batch_size * 3 * 64 * 64);
            images += batch.batch_size;
        }
        let secs = start.elapsed().as_secs_f64();
        assert_eq!(images, n);
        println!(
            "fashion-mnist {name} ({}): {images} images 28×28 gray -> 3×64×64 in {secs:.3} s = \
             {:.0} images/s ({} workers, batch {})",
            if mode == Mode::Train {
                "random resized crop + flip"
            } else {
                "resize + crop"
            },
            images as f64 / secs,
            options.workers,
            options.batch_size
        );
    }
}
