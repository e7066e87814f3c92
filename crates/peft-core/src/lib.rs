//! peft-core: the tuning plan, adapter methods, tunable layers and adapter I/O of peft-rs.
//!
//! Models are written against [`ModelBuilder`], which knows the Hugging Face module path of each
//! layer. A layer built with [`ModelBuilder::linear`] is a [`TunableLinear`]: the frozen base plus
//! whatever the [`TuningPlan`] assigns to its path. Trainable values are `Var`s in one
//! [`ParamStore`]; frozen weights stay plain tensors and get no gradient (see [`ops`]).

pub mod adapter_io;
mod batch_norm;
mod builder;
pub mod conv;
#[cfg(feature = "cuda")]
mod cuda;
pub mod device;
mod embedding;
mod error;
pub mod fsio;
mod heads;
mod layers;
mod linear;
pub mod methods;
pub mod ops;
mod params;
mod plan;
mod registry;
mod site;
mod switch;
mod target;
pub mod test_utils;
mod weights;

pub use batch_norm::{BatchNorm2d, BatchNormMode, RunningState};
pub use builder::{ModelBuilder, TunedParts};
pub use conv::{ConvGeometry, TunableConv2d};
pub use embedding::TunableEmbedding;
pub use error::{PeftError, Result};
pub use layers::LayerNorm;
pub use linear::TunableLinear;
pub use methods::{
    AdapterConfig, BaseLinear, BottleneckConfig, BottleneckHook, HookPoint, Ia3Config,
    LinearAdapter, LoraConfig, LoraInit, LoraLayer, PrefixTuningConfig, PromptSite,
    PromptTuningConfig, VirtualInput,
};
pub use params::ParamStore;
pub use plan::{CompiledPlan, TuningPlan};
pub use registry::{AdapterEntry, HeadsOf, Registry};
pub use site::Site;
pub use target::{TargetMatcher, TargetModules};
pub use weights::{Init, WeightSource};
