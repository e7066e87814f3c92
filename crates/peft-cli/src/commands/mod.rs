//! One module per subcommand.

pub mod bench;
pub mod card;
pub mod eval;
pub mod inspect;
pub mod merge;
pub mod predict;
pub mod train;
