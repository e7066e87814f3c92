//! One module per subcommand.

pub mod bench;
pub mod card;
pub mod eval;
pub mod eval_image;
pub mod inspect;
pub mod merge;
pub mod predict;
pub mod train;
pub mod train_image;

/// Whether the adapter folder holds an image classifier (by its `peft_rs.json`).
pub fn is_image_adapter(dir: &std::path::Path) -> anyhow::Result<bool> {
    Ok(peft_core::adapter_io::read_meta(dir)?.is_some_and(|m| m.task == peft_train::vision::TASK))
}

/// Sets the process's frozen matmul precision from `value` (`f32` or `bf16`; `key` names the
/// recipe key or flag in errors) and says what the products will actually run as: `f32`,
/// `bf16 (AMX)`, or `f32 (bf16 asked for; this CPU has no AMX)`.
pub fn apply_matmul_precision(value: &str, key: &str) -> anyhow::Result<&'static str> {
    use peft_core::ops::{set_frozen_matmul_precision, MatmulPrecision};
    let precision: MatmulPrecision = value.parse().map_err(|e| anyhow::anyhow!("{key}: {e}"))?;
    let honoured = set_frozen_matmul_precision(precision);
    Ok(match (precision, honoured) {
        (MatmulPrecision::F32, _) => "f32",
        (MatmulPrecision::Bf16, true) => "bf16 (AMX)",
        (MatmulPrecision::Bf16, false) => "f32 (bf16 asked for; this CPU has no AMX)",
    })
}
