//! Which parameters get weight decay: the Hugging Face convention by name.

/// The Hugging Face `Trainer` default: decay every parameter except biases and the weights of
/// normalization layers.
///
/// Matching is by name, case-insensitive, because modules have no types here: no decay when the
/// last path segment contains `bias`, or when a module segment contains `norm` (`LayerNorm`,
/// `layer_norm1`, `layernorm_before`, `pre_layrnorm`, `rmsnorm`, `norm`, `final_norm`, ...) or is
/// a GPT-style `ln`/`ln_*` layer (`ln_f`, `ln_1`).
///
/// ```
/// use peft_train::optim::hf_weight_decay;
/// assert!(hf_weight_decay("encoder.layer.0.attention.self.query.lora_A.weight"));
/// assert!(!hf_weight_decay("encoder.layer.0.attention.output.LayerNorm.weight"));
/// assert!(!hf_weight_decay("classifier.bias"));
/// ```
pub fn hf_weight_decay(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    let mut segments: Vec<&str> = lower.split('.').collect();
    let param = segments.pop().unwrap_or_default();
    if param.contains("bias") {
        return false;
    }
    !segments
        .iter()
        .any(|s| s.contains("norm") || *s == "ln" || s.starts_with("ln_"))
}

#[cfg(test)]
mod tests {
    use super::hf_weight_decay;

    #[test]
    fn hf_convention() {
        for name in [
            "bert.encoder.layer.3.output.dense.weight",
            "base_model.model.classifier.lora_B.weight",
            "embeddings.word_embeddings.weight",
            "vit.embeddings.cls_token",
            "model.layers.0.mlp.down_proj.weight",
        ] {
            assert!(hf_weight_decay(name), "{name}");
        }
        for name in [
            "bias",
            "bert.encoder.layer.3.output.dense.bias",
            "embeddings.LayerNorm.weight",
            "embeddings.LayerNorm.bias",
            "vision_model.pre_layrnorm.weight",
            "text_model.encoder.layers.0.layer_norm1.weight",
            "vit.encoder.layer.0.layernorm_before.weight",
            "model.layers.0.input_layernorm.weight",
            "model.norm.weight",
            "transformer.ln_f.weight",
            "blocks.0.norm1.weight",
        ] {
            assert!(!hf_weight_decay(name), "{name}");
        }
    }
}
