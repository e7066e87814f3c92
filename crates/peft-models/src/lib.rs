//! peft-models: model definitions with Hugging Face module paths, written against
//! [`peft_core::ModelBuilder`] so that adapters are injected at construction.

pub mod bert;
pub mod cnn;
pub mod dinov2;
pub mod image_models;
pub mod mobilenet_v2;
pub mod onnx;
pub mod resnet;
pub mod resolve;
pub mod vit;
pub mod vit_common;

pub use bert::{BertConfig, BertForTokenClassification, BertModel};
pub use cnn::ImageModelOptions;
pub use dinov2::{
    dinov2_image_classifier, Dinov2Config, Dinov2ForImageClassification, Dinov2Model,
};
pub use image_models::{
    cnn_checkpoint, image_classifier, onnx_graph, torch_hub_checkpoints, ImageClassifier,
};
pub use mobilenet_v2::MobileNetV2;
pub use onnx::{dinov2_onnx_image_classifier, read_onnx_dinov2, OnnxDinov2Backbone};
pub use resnet::{ResNet, ResNetDepth};
pub use resolve::{resolve_model, ModelFiles, ResolveError};
pub use vit::{vit_image_classifier, ViTConfig, ViTForImageClassification, ViTModel};
pub use vit_common::{interpolate_bicubic, Resize};
pub mod load;
pub mod merge;

pub use load::{bert_token_classifier, read_bert_config};
pub use merge::{
    merged_tensors, write_merged_hf_image_classifier, write_merged_image_classifier,
    write_merged_onnx_dinov2_classifier, write_merged_token_classifier,
};
pub mod pth;
pub use pth::read_pth;
