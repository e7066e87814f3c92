//! Training-time behaviour of the CNNs beyond parity: which tensors train under each plan
//! (LoRA + head, last blocks unfrozen, full), that BatchNorm statistics move only when asked and
//! travel with the adapter file, and clear errors on bad input and bad checkpoints.

use std::collections::HashMap;

use candle_core::{DType, Device, Tensor};
use peft_core::adapter_io::{self, AdapterMeta};
use peft_core::test_utils::max_abs_diff as max_diff;
use peft_core::{
    AdapterConfig, BatchNormMode, LoraConfig, ModelBuilder, TargetModules, TuningPlan, WeightSource,
};
use peft_models::{ImageModelOptions, MobileNetV2};

/// Every 1×1 convolution of MobileNetV2 (peft's regex in tests/fixtures/vision).
const ONE_BY_ONE: &str = r"features\.(1\.conv\.1|([2-9]|1[0-7])\.conv\.(0\.0|2)|18\.0)";

fn lora_plan() -> TuningPlan {
    let mut c = LoraConfig::new(4, 8.0, &[]);
    c.target_modules = TargetModules::Pattern(ONE_BY_ONE.into());
    TuningPlan {
        adapter: Some(AdapterConfig::Lora(c)),
        seed: 3,
        ..Default::default()
    }
}

fn model(plan: TuningPlan, batch_norm: BatchNormMode) -> MobileNetV2 {
    let b = ModelBuilder::new(WeightSource::Random(7), plan, DType::F32, Device::Cpu).unwrap();
    let options = ImageModelOptions {
        num_labels: 5,
        pretrained_head: false,
        batch_norm,
        dropout: 0.0,
    };
    MobileNetV2::new(b, options).unwrap()
}

fn images(n: usize, seed: u64) -> Tensor {
    let mut s = seed | 1;
    let v: Vec<f32> = (0..n * 3 * 32 * 32)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 7;
            s ^= s << 17;
            (s >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0
        })
        .collect();
    Tensor::from_vec(v, (n, 3, 32, 32), &Device::Cpu).unwrap()
}

/// One SGD step on a cross-entropy loss; returns the names of parameters with a gradient.
fn train_step(m: &MobileNetV2, x: &Tensor) -> Vec<String> {
    let labels = Tensor::new(&[0u32, 1, 2, 3], &Device::Cpu).unwrap();
    let logits = m.forward(x, true).unwrap();
    let loss = candle_nn::loss::cross_entropy(&logits, &labels).unwrap();
    let grads = loss.backward().unwrap();
    let mut with_grad = vec![];
    for (name, var) in m.parts.params.named_vars() {
        if let Some(g) = grads.get(&var) {
            var.set(&(var.as_tensor() - (g * 0.1).unwrap()).unwrap())
                .unwrap();
            with_grad.push(name);
        }
    }
    with_grad
}

fn meta(m: &MobileNetV2) -> AdapterMeta {
    AdapterMeta {
        base_model_fingerprint: m.parts.base_fingerprint.clone(),
        task: "image_classification".into(),
        id2label: Default::default(),
        unfreeze: m.parts.plan.unfreeze.clone(),
        tokenizer: String::new(),
        settings: Default::default(),
    }
}

#[test]
fn lora_trains_adapter_and_head_and_saves_batch_norm_statistics() {
    let m = model(lora_plan(), BatchNormMode::Update);
    let names: Vec<String> = m
        .parts
        .params
        .named_vars()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names
        .iter()
        .all(|n| n.contains("lora_") || n.starts_with("classifier.1.")));
    assert_eq!(names.iter().filter(|n| n.contains("lora_A")).count(), 34);
    let x = images(4, 1);
    let trained = train_step(&m, &x);
    assert_eq!(
        trained.len(),
        names.len(),
        "every trainable tensor gets a gradient"
    );
    let bn = &m.parts.registry.batch_norms()[0];
    let (mean, _) = bn.running_stats();
    assert!(
        mean.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            > 0.0
    );

    let dir = tempfile::tempdir().unwrap();
    adapter_io::save(
        dir.path(),
        &m.parts,
        "torchvision/mobilenet_v2",
        "IMAGE_CLS",
        &meta(&m),
    )
    .unwrap();
    let (plan, file) = adapter_io::read_plan(dir.path()).unwrap();
    assert_eq!(
        plan.unfreeze,
        [r"classifier\.1\..*"],
        "only the head trains: statistics make no BatchNorm trainable"
    );
    assert_eq!(file.modules_to_save.as_ref().map(Vec::len), Some(1 + 52));
    let fresh = model(plan, BatchNormMode::Update);
    let before = fresh.forward(&x, false).unwrap();
    adapter_io::load_trained(dir.path(), &fresh.parts).unwrap();
    let (a, b) = (
        m.forward(&x, false).unwrap(),
        fresh.forward(&x, false).unwrap(),
    );
    assert!(
        max_diff(&a, &b) < 1e-6,
        "reloaded model differs by {}",
        max_diff(&a, &b)
    );
    assert!(max_diff(&a, &before) > 1e-3, "the load changed something");
    // peft's form of a modules_to_save BatchNorm: its whole state dict.
    let st =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    for stat in [
        "weight",
        "bias",
        "running_mean",
        "running_var",
        "num_batches_tracked",
    ] {
        assert!(
            st.contains_key(&format!("base_model.model.features.0.1.{stat}")),
            "{stat}"
        );
    }
    let tracked = &st["base_model.model.features.0.1.num_batches_tracked"];
    assert_eq!(tracked.to_scalar::<i64>().unwrap(), 1, "one training step");
    // The plain loader refuses the BatchNorm state it cannot place.
    let err = adapter_io::load_weights(dir.path(), &fresh.parts.params).unwrap_err();
    assert!(err.to_string().contains("features."), "{err}");
}

#[test]
fn frozen_batch_norm_keeps_statistics_and_saves_none() {
    let m = model(lora_plan(), BatchNormMode::Frozen);
    let before: Vec<_> = m
        .parts
        .registry
        .batch_norms()
        .iter()
        .map(|b| b.running_stats())
        .collect();
    train_step(&m, &images(4, 2));
    for (bn, (mean, var)) in m.parts.registry.batch_norms().iter().zip(before) {
        let (m2, v2) = bn.running_stats();
        assert_eq!(
            max_diff(&mean, &m2) + max_diff(&var, &v2),
            0.0,
            "{}",
            bn.path()
        );
    }
    let dir = tempfile::tempdir().unwrap();
    adapter_io::save(
        dir.path(),
        &m.parts,
        "torchvision/mobilenet_v2",
        "IMAGE_CLS",
        &meta(&m),
    )
    .unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(st.keys().all(|k| !k.contains("running_")));
}

#[test]
fn unfrozen_blocks_and_full_fine_tuning_train_what_they_name() {
    let plan = TuningPlan {
        unfreeze: vec![r"features\.(16|17|18)\..*".into()],
        ..Default::default()
    };
    let m = model(plan, BatchNormMode::Update);
    let names: Vec<String> = m
        .parts
        .params
        .named_vars()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert!(names.iter().all(|n| n.starts_with("features.16.")
        || n.starts_with("features.17.")
        || n.starts_with("features.18.")
        || n.starts_with("classifier.1.")));
    // depthwise kernels, 1×1 kernels and BatchNorm gains of those blocks all train
    for want in [
        "features.16.conv.1.0.weight",
        "features.17.conv.2.weight",
        "features.18.1.weight",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    let trained = train_step(&m, &images(4, 3));
    assert_eq!(trained.len(), names.len());

    let full = model(
        TuningPlan {
            unfreeze: vec![".*".into()],
            ..Default::default()
        },
        BatchNormMode::Update,
    );
    let n = full.parts.params.num_elements();
    assert_eq!(
        n,
        2_223_872 + 1280 * 5 + 5,
        "MobileNetV2 without its ImageNet head, plus ours"
    );
    assert_eq!(
        train_step(&full, &images(4, 4)).len(),
        full.parts.params.named_vars().len()
    );
}

#[test]
fn bad_input_and_bad_checkpoints_are_named() {
    let m = model(lora_plan(), BatchNormMode::Update);
    let gray = Tensor::zeros((2, 1, 32, 32), DType::F32, &Device::Cpu).unwrap();
    let err = m.forward(&gray, false).unwrap_err().to_string();
    assert!(
        err.contains("(batch, 3, height, width)") && err.contains("[2, 1, 32, 32]"),
        "{err}"
    );
    let flat = Tensor::zeros((2, 3 * 32 * 32), DType::F32, &Device::Cpu).unwrap();
    assert!(m.forward(&flat, false).is_err());

    // A checkpoint whose tensor has the wrong shape: the error names it and both shapes.
    let mut tensors: HashMap<String, Tensor> = HashMap::new();
    tensors.insert(
        "features.0.0.weight".into(),
        Tensor::zeros((32, 3, 5, 5), DType::F32, &Device::Cpu).unwrap(),
    );
    let b = ModelBuilder::new(
        WeightSource::Map(tensors),
        TuningPlan::default(),
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    let options = ImageModelOptions {
        num_labels: 3,
        pretrained_head: false,
        batch_norm: BatchNormMode::Update,
        dropout: 0.0,
    };
    let err = MobileNetV2::new(b, options)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("features.0.0.weight") && err.contains("[32, 3, 3, 3]"),
        "{err}"
    );

    // LoRA on a depthwise convolution is refused, naming it.
    let mut c = LoraConfig::new(4, 8.0, &[]);
    c.target_modules = TargetModules::Pattern(r"features\.2\.conv\.1\.0".into());
    let plan = TuningPlan {
        adapter: Some(AdapterConfig::Lora(c)),
        ..Default::default()
    };
    let b = ModelBuilder::new(WeightSource::Random(1), plan, DType::F32, Device::Cpu).unwrap();
    let err = MobileNetV2::new(b, options)
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("features.2.conv.1.0") && err.contains("grouped"),
        "{err}"
    );
}

/// A trained LoRA model merged into a torchvision state dict: the new head, every BatchNorm's
/// running statistics and batch count, and the folded 1×1 kernels; a plain MobileNetV2 built
/// from that state dict (no adapter, its head kept) gives the adapted model's logits.
#[test]
fn merged_state_dict_rebuilds_the_adapted_model() {
    let m = model(lora_plan(), BatchNormMode::Update);
    for step in 0..2 {
        train_step(&m, &images(4, 11 + step));
    }
    let x = images(3, 99);
    let adapted = m.forward(&x, false).unwrap();
    let refuse = |key: &str| -> peft_core::Result<Tensor> {
        panic!("a CNN's base tensors are all in its layers; `{key}` was asked for")
    };
    let merged = peft_models::merged_tensors(&m.parts, &refuse).unwrap();
    let tracked = merged["features.3.conv.1.1.num_batches_tracked"]
        .to_scalar::<i64>()
        .unwrap();
    assert_eq!(tracked, 2, "two training batches went into the statistics");
    assert!(merged.contains_key("classifier.1.weight"));
    assert!(merged.keys().all(|k| !k.contains("lora")));
    let b = ModelBuilder::new(
        WeightSource::Map(merged.into_iter().collect()),
        TuningPlan::default(),
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    let options = ImageModelOptions {
        num_labels: 5,
        pretrained_head: true,
        batch_norm: BatchNormMode::Update,
        dropout: 0.0,
    };
    let plain = MobileNetV2::new(b, options).unwrap();
    let diff = max_diff(&plain.forward(&x, false).unwrap(), &adapted);
    assert!(diff < 1e-4, "merged logits differ by {diff}");
}

/// BatchNorm running statistics are per adapter, as peft keeps a BatchNorm in
/// `modules_to_save`: two adapters trained on different images and saved, then loaded into one
/// model (the first as trained, the second by name), each give their own model's logits when
/// active; with adapters disabled the statistics are the base's, untouched by either.
#[test]
fn batch_norm_statistics_follow_the_active_adapter() {
    let base = model(TuningPlan::default(), BatchNormMode::Update);
    let base_stats = base.parts.registry.batch_norms()[3].running_stats();
    let x = images(4, 1);
    let trained: Vec<_> = [5, 8]
        .into_iter()
        .map(|data| {
            let m = model(lora_plan(), BatchNormMode::Update);
            train_step(&m, &images(4, data));
            let dir = tempfile::tempdir().unwrap();
            adapter_io::save(dir.path(), &m.parts, "base", "", &meta(&m)).unwrap();
            (dir, m.forward(&x, false).unwrap())
        })
        .collect();
    let both = model(lora_plan(), BatchNormMode::Update);
    adapter_io::load_trained(trained[0].0.path(), &both.parts).unwrap();
    adapter_io::load_adapter(trained[1].0.path(), &both.parts, "second").unwrap();
    let registry = &both.parts.registry;
    let first = registry.adapter_names()[0].clone();
    let check = |want: &Tensor, what: &str| {
        let d = max_diff(&both.forward(&x, false).unwrap(), want);
        assert!(d < 1e-6, "{what}: logits differ by {d}");
    };
    check(&trained[0].1, "first adapter");
    registry.set_active("second").unwrap();
    check(&trained[1].1, "second adapter, loaded by name");
    assert!(
        max_diff(&trained[0].1, &trained[1].1) > 1e-3,
        "the two adapters differ"
    );
    registry.disable().unwrap();
    let bn = &registry.batch_norms()[3];
    let (mean, var) = bn.running_stats();
    assert_eq!(max_diff(&mean, &base_stats.0), 0.0, "disabled: base mean");
    assert_eq!(max_diff(&var, &base_stats.1), 0.0, "disabled: base var");
    registry.enable();
    registry.set_active(&first).unwrap();
    check(&trained[0].1, "first adapter again");
    // Saving the selected adapter while adapters are disabled writes its statistics.
    registry.disable().unwrap();
    let dir = tempfile::tempdir().unwrap();
    adapter_io::save(dir.path(), &both.parts, "base", "", &meta(&both)).unwrap();
    registry.enable();
    let again = model(lora_plan(), BatchNormMode::Update);
    adapter_io::load_trained(dir.path(), &again.parts).unwrap();
    let d = max_diff(&again.forward(&x, false).unwrap(), &trained[0].1);
    assert!(d < 1e-6, "saved while disabled: logits differ by {d}");
    registry.delete_adapter("second").unwrap();
    check(&trained[0].1, "after deleting the second");
}
