//! The two key layouts of ViT and DINOv2 and the renaming between them. transformers 4 (and so
//! Hub checkpoints and `save_pretrained` output, in both versions) names a layer's modules
//! `encoder.layer.<i>.attention.attention.{query,key,value}`, `attention.output.dense` and, for
//! ViT, `intermediate.dense` / `output.dense`; transformers 5.24's modules are
//! `attention.{q,k,v,o}_proj` and `mlp.fc1` / `mlp.fc2`, with ViT's layers at `layers.<i>.`.
//! Loading converts the first to the second ([`convert_sublayer`]); a merged checkpoint is
//! written back in the first ([`legacy_sublayer`]), so that transformers 4 and 5 both load it.

/// transformers 4's attention sublayer names and transformers 5.24's, in matching order.
const ATTENTION: [(&str, &str); 4] = [
    ("attention.attention.query.", "attention.q_proj."),
    ("attention.attention.key.", "attention.k_proj."),
    ("attention.attention.value.", "attention.v_proj."),
    ("attention.output.dense.", "attention.o_proj."),
];

/// ViT's MLP, transformers 4 then 5.24 (DINOv2 already says `mlp.fc1` / `mlp.fc2` in both).
const VIT_MLP: [(&str, &str); 2] = [
    ("intermediate.dense.", "mlp.fc1."),
    ("output.dense.", "mlp.fc2."),
];

/// The renaming rules `(transformers 4, transformers 5.24)` of a layer, with ViT's MLP when `mlp`.
fn rules(mlp: bool) -> impl Iterator<Item = &'static (&'static str, &'static str)> {
    ATTENTION.iter().chain(if mlp { &VIT_MLP[..] } else { &[] })
}

/// `(prefix, layer index, rest)` of a key under `<marker><i>.` (at the start or after a dot).
fn split_layer<'k>(key: &'k str, marker: &str) -> Option<(&'k str, &'k str, &'k str)> {
    let start = if key.starts_with(marker) {
        0
    } else {
        key.find(&format!(".{marker}"))? + 1
    };
    let (index, rest) = key[start + marker.len()..].split_once('.')?;
    index.parse::<usize>().ok()?;
    Some((&key[..start], index, rest))
}

/// `(prefix, layer index, rest)` of a key under `encoder.layer.<i>.` (at the start or after a
/// dot), the layout of transformers 4 checkpoints (and of DINOv2's modules in 5.24).
pub(crate) fn split_legacy_layer(key: &str) -> Option<(&str, &str, &str)> {
    split_layer(key, "encoder.layer.")
}

/// `(prefix, layer index, rest)` of a key under `layers.<i>.` (at the start or after a dot),
/// where transformers 5.24 puts ViT's layers.
pub(crate) fn split_vit_layer(key: &str) -> Option<(&str, &str, &str)> {
    split_layer(key, "layers.")
}

/// transformers 5.24's renaming of a transformers 4 sublayer (`rest` after `encoder.layer.<i>.`):
/// `attention.attention.{query,key,value}` → `attention.{q,k,v}_proj`, `attention.output.dense`
/// → `attention.o_proj`, and with `mlp` (ViT) `intermediate.dense` → `mlp.fc1`, `output.dense` →
/// `mlp.fc2`; anything else unchanged.
pub(crate) fn convert_sublayer(rest: &str, mlp: bool) -> String {
    rename(rest, rules(mlp).map(|(old, new)| (*old, *new)))
}

/// The inverse of [`convert_sublayer`]: a transformers 5.24 sublayer name back to transformers 4's.
pub(crate) fn legacy_sublayer(rest: &str, mlp: bool) -> String {
    rename(rest, rules(mlp).map(|(old, new)| (*new, *old)))
}

/// `rest` with the first matching `from` prefix replaced by its `to`.
fn rename<'r>(rest: &str, mut rules: impl Iterator<Item = (&'r str, &'r str)>) -> String {
    rules
        .find_map(|(from, to)| rest.strip_prefix(from).map(|tail| format!("{to}{tail}")))
        .unwrap_or_else(|| rest.to_string())
}

#[cfg(test)]
mod tests {
    use crate::dinov2::{convert_dinov2_key, legacy_dinov2_key};
    use crate::vit::{convert_vit_key, legacy_vit_key};

    #[test]
    fn legacy_keys_convert_as_transformers_does() {
        let cases = [
            (
                "vit.encoder.layer.3.attention.attention.query.weight",
                "vit.layers.3.attention.q_proj.weight",
            ),
            (
                "encoder.layer.0.attention.output.dense.bias",
                "layers.0.attention.o_proj.bias",
            ),
            (
                "vit.encoder.layer.1.intermediate.dense.weight",
                "vit.layers.1.mlp.fc1.weight",
            ),
            (
                "vit.encoder.layer.1.output.dense.weight",
                "vit.layers.1.mlp.fc2.weight",
            ),
            (
                "vit.encoder.layer.1.layernorm_before.bias",
                "vit.layers.1.layernorm_before.bias",
            ),
            ("vit.embeddings.cls_token", "vit.embeddings.cls_token"),
            (
                "vit.layers.0.attention.q_proj.weight",
                "vit.layers.0.attention.q_proj.weight",
            ),
        ];
        for (old, new) in cases {
            assert_eq!(convert_vit_key(old), new);
        }
        assert_eq!(
            convert_dinov2_key("dinov2.encoder.layer.2.attention.attention.key.bias"),
            "dinov2.encoder.layer.2.attention.k_proj.bias"
        );
        assert_eq!(
            convert_dinov2_key("dinov2.encoder.layer.2.mlp.fc1.weight"),
            "dinov2.encoder.layer.2.mlp.fc1.weight"
        );
    }

    /// Every kind of key of a transformers 4 ViT / DINOv2 checkpoint: `outer` under `prefix`, and
    /// `layer` under `prefix` + `encoder.layer.<i>.` (10 and 11 so that an index is not taken for a
    /// prefix of another).
    fn legacy_keys(prefix: &str, layer: &[String], outer: &[&str]) -> Vec<String> {
        let mut keys: Vec<String> = outer.iter().map(|k| format!("{prefix}{k}")).collect();
        for i in [0, 1, 10, 11] {
            keys.extend(
                layer
                    .iter()
                    .map(|k| format!("{prefix}encoder.layer.{i}.{k}")),
            );
        }
        keys
    }

    /// `<module>.weight` and `<module>.bias` of each module.
    fn weight_and_bias(modules: &[&str]) -> Vec<String> {
        modules
            .iter()
            .flat_map(|m| [format!("{m}.weight"), format!("{m}.bias")])
            .collect()
    }

    /// A transformers 4 layer's attention modules.
    const LEGACY_ATTENTION: [&str; 4] = [
        "attention.attention.query",
        "attention.attention.key",
        "attention.attention.value",
        "attention.output.dense",
    ];

    #[test]
    fn vit_keys_round_trip() {
        let mut modules = LEGACY_ATTENTION.to_vec();
        modules.extend([
            "layernorm_before",
            "layernorm_after",
            "intermediate.dense",
            "output.dense",
        ]);
        let layer = weight_and_bias(&modules);
        let outer = [
            "embeddings.cls_token",
            "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.projection.bias",
            "layernorm.weight",
            "layernorm.bias",
            "pooler.dense.weight",
        ];
        for prefix in ["vit.", ""] {
            for key in legacy_keys(prefix, &layer, &outer) {
                let new = convert_vit_key(&key);
                if key.contains("encoder.layer.") {
                    assert!(
                        new.contains(".layers.") || new.starts_with("layers."),
                        "{new}"
                    );
                    assert!(!new.contains("dense") && !new.contains("attention.attention"));
                }
                assert_eq!(legacy_vit_key(&new), key, "via {new}");
            }
        }
        for head in ["classifier.weight", "classifier.bias"] {
            assert_eq!(legacy_vit_key(&convert_vit_key(head)), head);
        }
    }

    #[test]
    fn dinov2_keys_round_trip() {
        let mut modules = LEGACY_ATTENTION.to_vec();
        modules.extend(["norm1", "norm2", "mlp.fc1", "mlp.fc2"]);
        let mut layer = weight_and_bias(&modules);
        layer.extend(["layer_scale1.lambda1".into(), "layer_scale2.lambda1".into()]);
        let outer = [
            "embeddings.cls_token",
            "embeddings.mask_token",
            "embeddings.position_embeddings",
            "embeddings.patch_embeddings.projection.weight",
            "embeddings.patch_embeddings.projection.bias",
            "layernorm.weight",
            "layernorm.bias",
        ];
        for prefix in ["dinov2.", ""] {
            for key in legacy_keys(prefix, &layer, &outer) {
                let new = convert_dinov2_key(&key);
                assert!(!new.contains("attention.attention") && !new.contains("output.dense"));
                assert_eq!(legacy_dinov2_key(&new), key, "via {new}");
            }
        }
        for head in ["classifier.weight", "classifier.bias"] {
            assert_eq!(legacy_dinov2_key(&convert_dinov2_key(head)), head);
        }
    }
}
