//! `peft-rs eval` and `peft-rs predict` for image-classification adapters.

use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::{Device, D};
use peft_data::image::{Bitmap, ImageDataset, ImageLoader, LoaderOptions, Mode, Preprocessor};
use peft_train::tasks::image_classification::evaluate_images;
use peft_train::vision::load_image_adapter;

/// Accuracy (overall and per class) of the adapter in `dir` on `split` of its data, or on an
/// image folder / CSV given as `data`.
pub fn eval(dir: &Path, split: &str, data: Option<&Path>, json: bool) -> Result<()> {
    let device = Device::Cpu;
    let a = load_image_adapter(dir, &device)?;
    let dataset: ImageDataset = match data {
        Some(path) => {
            let mut spec = a.data.clone();
            spec.path = path.to_path_buf();
            if path.extension().is_some_and(|e| e == "csv") {
                spec.format = peft_train::vision::ImageFormat::Csv;
            } else if path.is_dir() && spec.format == peft_train::vision::ImageFormat::Csv {
                spec.format = peft_train::vision::ImageFormat::Folder;
            }
            let s = spec.splits(0)?;
            s.test.unwrap_or(s.train)
        }
        None => {
            let splits = a.data.splits(seed(&a.meta))?;
            match split {
                "test" => splits.test.context("the data has no test split")?,
                "valid" => splits.valid.context("the data has no validation split")?,
                "train" => splits.train,
                other => bail!("--split {other}: expected test, valid or train"),
            }
        }
    };
    if dataset.classes() != a.classes.as_slice() {
        bail!(
            "the data's classes {:?} differ from the adapter's {:?}",
            dataset.classes(),
            a.classes
        );
    }
    let options = LoaderOptions {
        batch_size: 128,
        ..Default::default()
    };
    let loader = ImageLoader::new(dataset, a.data.preprocess.clone(), Mode::Eval, 0, options)?;
    let scores = evaluate_images(a.model.as_ref(), &loader, &a.classes, &device)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&scores)?);
        return Ok(());
    }
    println!("{} images ({} skipped)", scores.images, scores.skipped);
    for (class, acc) in &scores.per_class {
        println!("{class:<14} {acc:.4}");
    }
    println!("accuracy       {:.4}", scores.accuracy);
    println!("loss           {:.4}", scores.loss);
    Ok(())
}

/// The seed the adapter's splits were drawn with (so `valid`/`train` are the same images).
fn seed(meta: &peft_core::adapter_io::AdapterMeta) -> u64 {
    meta.settings
        .get("seed")
        .and_then(|v| v.as_u64())
        .unwrap_or(42)
}

/// The top classes of each image file.
pub fn predict(dir: &Path, images: &[String], json: bool) -> Result<()> {
    if images.is_empty() {
        bail!("name one or more image files");
    }
    let device = Device::Cpu;
    let a = load_image_adapter(dir, &device)?;
    let pre = Preprocessor::new(a.data.preprocess.clone())?;
    for path in images {
        let bitmap = Bitmap::open(Path::new(path))?;
        let mut pixels = vec![0f32; 3 * a.data.preprocess.crop * a.data.preprocess.crop];
        pre.eval_into(&bitmap, &mut pixels)?;
        let side = a.data.preprocess.crop;
        let x = candle_core::Tensor::from_vec(pixels, (1, 3, side, side), &device)?;
        let probs = candle_nn::ops::softmax(&a.model.forward(&x, false)?, D::Minus1)?
            .squeeze(0)?
            .to_vec1::<f32>()?;
        let mut ranked: Vec<(usize, f32)> = probs.into_iter().enumerate().collect();
        ranked.sort_by(|x, y| y.1.total_cmp(&x.1));
        ranked.truncate(3);
        if json {
            let top: Vec<_> = ranked
                .iter()
                .map(|(i, p)| serde_json::json!({"class": a.classes[*i], "probability": p}))
                .collect();
            println!("{}", serde_json::json!({"image": path, "top": top}));
        } else {
            let top: Vec<String> = ranked
                .iter()
                .map(|(i, p)| format!("{} {:.3}", a.classes[*i], p))
                .collect();
            println!("{path}\t{}", top.join("\t"));
        }
    }
    Ok(())
}
