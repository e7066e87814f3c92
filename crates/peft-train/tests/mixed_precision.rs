//! bf16 mixed precision on the CPU (the same code path the GPU takes, minus the kernels): frozen
//! weights and activations in bf16, LoRA and head weights f32, gradients f32, loss close to f32's.

use candle_core::{DType, Device, Tensor};
use peft_core::{AdapterConfig, LoraConfig, ModelBuilder, TargetModules, TuningPlan, WeightSource};
use peft_models::{BertConfig, BertForTokenClassification};
use peft_train::tasks::token_classification::masked_cross_entropy;

fn tiny_bert(dtype: DType) -> BertForTokenClassification {
    let cfg = BertConfig::from_json(
        r#"{"vocab_size": 100, "hidden_size": 32, "num_hidden_layers": 2,
            "num_attention_heads": 4, "intermediate_size": 64, "max_position_embeddings": 64,
            "type_vocab_size": 2, "hidden_act": "gelu", "hidden_dropout_prob": 0.1,
            "attention_probs_dropout_prob": 0.1, "layer_norm_eps": 1e-12}"#,
        "tiny",
    )
    .unwrap();
    let plan = TuningPlan {
        adapter: Some(AdapterConfig::Lora(LoraConfig {
            r: 4,
            lora_alpha: 8.0,
            lora_dropout: 0.1,
            target_modules: TargetModules::Names(vec!["query".into(), "value".into()]),
            layers_to_transform: None,
            layers_pattern: vec![],
            use_rslora: false,
            use_dora: false,
            init: Default::default(),
        })),
        unfreeze: vec![],
        seed: 3,
    };
    let builder = ModelBuilder::new(WeightSource::Random(7), plan, dtype, Device::Cpu).unwrap();
    BertForTokenClassification::new(&cfg, 5, builder).unwrap()
}

#[test]
fn bf16_step_matches_f32_and_keeps_f32_master_weights() {
    let ids = Tensor::new(
        &[[5u32, 17, 42, 9, 3, 0], [8, 8, 64, 2, 0, 0]],
        &Device::Cpu,
    )
    .unwrap();
    let types = ids.zeros_like().unwrap();
    let mask = Tensor::new(&[[1u32, 1, 1, 1, 1, 0], [1, 1, 1, 1, 0, 0]], &Device::Cpu).unwrap();
    let labels: Vec<i64> = vec![0, 1, 2, 3, 4, -100, 1, 1, 0, 2, -100, -100];
    let mut losses = vec![];
    for dtype in [DType::F32, DType::BF16] {
        let model = tiny_bert(dtype);
        // B starts at zero; give it values so that the adapter matters.
        for (name, var) in model.parts.params.named_vars() {
            assert_eq!(
                var.dtype(),
                DType::F32,
                "{name} is a trainable f32 master weight"
            );
            if name.contains("lora_B") {
                let n = var.elem_count();
                let t = Tensor::arange(0f32, n as f32, &Device::Cpu)
                    .unwrap()
                    .affine(0.3, 0.0)
                    .unwrap()
                    .sin()
                    .unwrap()
                    .affine(0.1, 0.0)
                    .unwrap()
                    .reshape(var.shape())
                    .unwrap();
                var.set(&t).unwrap();
            }
        }
        let logits = model.forward(&ids, &types, &mask, true).unwrap();
        assert_eq!(
            logits.dtype(),
            dtype,
            "activations run in the model's dtype"
        );
        let (loss, _) = masked_cross_entropy(&logits, &labels).unwrap();
        assert_eq!(loss.dtype(), DType::F32, "the loss is f32");
        let grads = loss.backward().unwrap();
        for (name, var) in model.parts.params.named_vars() {
            let g = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("{name}: no gradient ({dtype:?})"));
            assert_eq!(
                g.dtype(),
                DType::F32,
                "{name}: gradient in the master weight's dtype"
            );
            let norm = g
                .sqr()
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                norm.is_finite() && norm > 0.0,
                "{name}: gradient norm {norm}"
            );
        }
        losses.push(loss.to_scalar::<f32>().unwrap());
    }
    // Same weights (bf16-rounded) and the same dropout masks: the losses agree to bf16 precision.
    let rel = (losses[0] - losses[1]).abs() / losses[0];
    assert!(
        rel < 2e-2,
        "f32 loss {} vs bf16 loss {}",
        losses[0],
        losses[1]
    );
}
