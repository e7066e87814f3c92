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
