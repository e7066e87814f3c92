//! LoRA invariants on a tiny two-layer model: base output at init, the closed form of the
//! update, exact merge/unmerge, gradients only for trainable values, and save/load symmetry.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use peft_core::adapter_io::{self, AdapterMeta};
use peft_core::test_utils::max_abs_diff as max_diff;
use peft_core::{
    AdapterConfig, LinearAdapter, LoraConfig, ModelBuilder, TargetModules, TunableLinear,
    TunedParts, TuningPlan, WeightSource,
};

struct Tiny {
    q: Arc<TunableLinear>,
    v: Arc<TunableLinear>,
    head: Arc<TunableLinear>,
    parts: TunedParts,
}

impl Tiny {
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        self.forward_mode(x, false)
    }

    /// `train = true` builds the autograd graph (evaluation uses detached parameters).
    fn forward_mode(&self, x: &Tensor, train: bool) -> candle_core::Result<Tensor> {
        let h = self.q.forward(x, train).unwrap().tanh()?;
        let h = self.v.forward(&h, train).unwrap();
        Ok(self.head.forward(&h, train).unwrap())
    }
}

fn weights(seed: u64) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let t = |shape: &[usize], k: u64| {
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|i| (((i as u64 * 7919 + k * 104729 + seed) % 1000) as f32 / 500.0) - 1.0)
            .collect();
        Tensor::from_vec(v, shape, &dev).unwrap()
    };
    HashMap::from([
        ("enc.layer.0.query.weight".to_string(), t(&[6, 5], 1)),
        ("enc.layer.0.query.bias".to_string(), t(&[6], 2)),
        ("enc.layer.0.value.weight".to_string(), t(&[4, 6], 3)),
        ("enc.layer.0.value.bias".to_string(), t(&[4], 4)),
    ])
}

fn lora(use_rslora: bool) -> LoraConfig {
    LoraConfig {
        r: 2,
        lora_alpha: 8.0,
        lora_dropout: 0.0,
        target_modules: TargetModules::Names(vec!["query".into(), "value".into()]),
        layers_to_transform: None,
        layers_pattern: vec![],
        use_rslora,
        use_dora: false,
        init: Default::default(),
    }
}

fn build(seed: u64, cfg: LoraConfig) -> Tiny {
    try_build(seed, cfg).unwrap()
}

fn try_build(seed: u64, cfg: LoraConfig) -> peft_core::Result<Tiny> {
    let plan = TuningPlan {
        adapter: Some(AdapterConfig::Lora(cfg)),
        unfreeze: vec![],
        seed: 3,
    };
    let b = ModelBuilder::new(
        WeightSource::Map(weights(seed)),
        plan,
        DType::F32,
        Device::Cpu,
    )
    .unwrap();
    let layer = b.pp("enc").pp("layer").pp(0);
    let q = layer.linear(5, 6, true, "query").unwrap();
    let v = layer.linear(6, 4, true, "value").unwrap();
    let head = b.new_linear(4, 3, "classifier").unwrap();
    Ok(Tiny {
        q,
        v,
        head,
        parts: b.parts()?,
    })
}

/// The LoRA layer of `l`'s active adapter.
fn lora_of(l: &TunableLinear) -> Arc<dyn LinearAdapter> {
    l.active_adapter().expect("an active adapter")
}

fn input() -> Tensor {
    Tensor::randn(0f32, 1., (2, 4, 5), &Device::Cpu).unwrap()
}

fn randomise_b(m: &Tiny) {
    for l in [&m.q, &m.v] {
        let ad = lora_of(l);
        let b = &ad.as_lora().unwrap().b;
        b.set(&Tensor::randn(0f32, 0.5, b.dims(), &Device::Cpu).unwrap())
            .unwrap();
    }
}

#[test]
fn zero_b_gives_the_base_output_at_init() {
    let m = build(0, lora(false));
    let x = input();
    let base = {
        let h = x
            .broadcast_matmul(&m.q.weight().t().unwrap())
            .unwrap()
            .broadcast_add(&m.q.bias().unwrap())
            .unwrap()
            .tanh()
            .unwrap();
        let h = h
            .broadcast_matmul(&m.v.weight().t().unwrap())
            .unwrap()
            .broadcast_add(&m.v.bias().unwrap())
            .unwrap();
        m.head.forward(&h, false).unwrap()
    };
    assert!(max_diff(&m.forward(&x).unwrap(), &base) < 1e-6);
    // A is kaiming-uniform(a=√5): |A| ≤ 1/√in.
    let a = lora_of(&m.q)
        .as_lora()
        .unwrap()
        .a
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap();
    assert!(a.iter().all(|v| v.abs() <= 1.0 / 5f32.sqrt()) && a.iter().any(|v| *v != 0.0));
}

#[test]
fn update_follows_the_closed_form_with_either_scaling() {
    for (rs, scale) in [(false, 8.0 / 2.0), (true, 8.0 / 2f64.sqrt())] {
        let m = build(0, lora(rs));
        randomise_b(&m);
        let x = Tensor::randn(0f32, 1., (7, 5), &Device::Cpu).unwrap();
        let ad = lora_of(&m.q);
        let ad = ad.as_lora().unwrap();
        let expected = x
            .matmul(&m.q.weight().t().unwrap())
            .unwrap()
            .broadcast_add(&m.q.bias().unwrap())
            .unwrap()
            .add(
                &(x.matmul(&ad.a.t().unwrap())
                    .unwrap()
                    .matmul(&ad.b.t().unwrap())
                    .unwrap()
                    * scale)
                    .unwrap(),
            )
            .unwrap();
        assert!(
            max_diff(&m.q.forward(&x, false).unwrap(), &expected) < 1e-5,
            "rslora={rs}"
        );
    }
}

#[test]
fn merge_and_unmerge_are_exact_to_float_tolerance() {
    let m = build(0, lora(false));
    randomise_b(&m);
    let x = input();
    let w0 = m.q.weight();
    let unmerged = m.forward(&x).unwrap();
    m.parts.registry.merge_all().unwrap();
    assert_eq!(m.q.merged_adapter().as_deref(), Some("default"));
    assert!(max_diff(&m.forward(&x).unwrap(), &unmerged) < 1e-5);
    m.parts.registry.unmerge_all().unwrap();
    assert!(max_diff(&m.q.weight(), &w0) < 1e-6);
    assert!(max_diff(&m.forward(&x).unwrap(), &unmerged) < 1e-6);
}

#[test]
fn only_adapter_and_head_receive_gradients() {
    let m = build(0, lora(false));
    randomise_b(&m);
    let loss = m
        .forward_mode(&input(), true)
        .unwrap()
        .sqr()
        .unwrap()
        .sum_all()
        .unwrap();
    let grads = loss.backward().unwrap();
    let names: Vec<String> = m
        .parts
        .params
        .named_vars()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(
        names,
        [
            "classifier.bias",
            "classifier.weight",
            "enc.layer.0.query.lora_A.weight",
            "enc.layer.0.query.lora_B.weight",
            "enc.layer.0.value.lora_A.weight",
            "enc.layer.0.value.lora_B.weight",
        ]
    );
    for (n, v) in m.parts.params.named_vars() {
        assert!(grads.get(v.as_tensor()).is_some(), "{n} has no gradient");
    }
    for w in [m.q.weight(), m.v.weight()] {
        assert!(grads.get(&w).is_none());
        for id in grads.get_ids() {
            assert_ne!(
                grads.get_id(*id).unwrap().dims(),
                w.dims(),
                "a frozen-weight-sized gradient exists"
            );
        }
    }
}

fn meta(parts: &TunedParts) -> AdapterMeta {
    AdapterMeta {
        base_model_fingerprint: parts.base_fingerprint.clone(),
        task: "token_classification".into(),
        unfreeze: vec![],
        id2label: Default::default(),
        tokenizer: "t".into(),
        settings: Default::default(),
    }
}

#[test]
fn save_then_load_round_trips_with_peft_key_names() {
    let m = build(0, lora(false));
    randomise_b(&m);
    let dir = tempfile::tempdir().unwrap();
    adapter_io::save(dir.path(), &m.parts, "base", "TOKEN_CLS", &meta(&m.parts)).unwrap();
    let st =
        candle_core::safetensors::load(dir.path().join("adapter_model.safetensors"), &Device::Cpu)
            .unwrap();
    assert!(st.contains_key("base_model.model.enc.layer.0.query.lora_A.weight"));
    assert!(st.contains_key("base_model.model.classifier.weight"));
    let cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(cfg["peft_type"], "LORA");
    assert_eq!(cfg["modules_to_save"], serde_json::json!(["classifier"]));

    let fresh = build(0, lora(false));
    let x = input();
    assert!(max_diff(&fresh.forward(&x).unwrap(), &m.forward(&x).unwrap()) > 1e-3);
    let (adapter, _) = adapter_io::read_config(dir.path()).unwrap();
    assert_eq!(adapter, AdapterConfig::Lora(lora(false)));
    adapter_io::check_fingerprint(
        dir.path(),
        &adapter_io::read_meta(dir.path()).unwrap().unwrap(),
        &fresh.parts,
    )
    .unwrap();
    adapter_io::load_weights(dir.path(), &fresh.parts.params).unwrap();
    assert!(max_diff(&fresh.forward(&x).unwrap(), &m.forward(&x).unwrap()) < 1e-6);
}

#[test]
fn mismatched_adapters_are_refused_by_name_and_leave_the_model_unchanged() {
    let m = build(0, lora(false));
    randomise_b(&m);
    let dir = tempfile::tempdir().unwrap();
    adapter_io::save(dir.path(), &m.parts, "base", "TOKEN_CLS", &meta(&m.parts)).unwrap();

    // Another base model: the fingerprint differs.
    let other = build(1, lora(false));
    let err = adapter_io::check_fingerprint(
        dir.path(),
        &adapter_io::read_meta(dir.path()).unwrap().unwrap(),
        &other.parts,
    )
    .unwrap_err();
    assert!(err.to_string().contains("different base model"), "{err}");

    // Another rank: the shapes differ, and the tensor is named.
    let mut r4 = lora(false);
    r4.r = 4;
    let wide = build(0, r4);
    let before = wide.forward(&input());
    let err = adapter_io::load_weights(dir.path(), &wide.parts.params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("lora_A.weight") && err.contains("[2, 5]") && err.contains("[4, 5]"),
        "{err}"
    );
    let a = lora_of(&wide.q).as_lora().unwrap().a.as_tensor().clone();
    assert!(before.is_ok() && a.dims() == [4, 5]);

    // A truncated weights file.
    let f = dir.path().join("adapter_model.safetensors");
    let bytes = std::fs::read(&f).unwrap();
    std::fs::write(&f, &bytes[..bytes.len() / 2]).unwrap();
    let err = adapter_io::load_weights(dir.path(), &m.parts.params)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("adapter_model.safetensors") && err.contains("truncated"),
        "{err}"
    );

    // An unsupported method.
    std::fs::write(
        dir.path().join("adapter_config.json"),
        r#"{"peft_type": "LOHA", "r": 2}"#,
    )
    .unwrap();
    let err = adapter_io::read_config(dir.path()).unwrap_err().to_string();
    assert!(err.contains("LOHA") && err.contains("LORA"), "{err}");
}

#[test]
fn layers_to_transform_limits_injection() {
    let mut cfg = lora(false);
    cfg.layers_to_transform = Some(vec![1]);
    // No layer 1 in the model: like peft, an adapter that targets nothing is an error.
    let err = try_build(0, cfg).err().expect("refused").to_string();
    assert!(
        err.contains("target_modules") && err.contains("enc.layer.0.query"),
        "{err}"
    );
    let mut cfg = lora(false);
    cfg.layers_to_transform = Some(vec![0]);
    let m = build(0, cfg);
    assert_eq!(m.parts.registry.adapted_paths().len(), 2);
}
