//! One module per subcommand.

pub mod eval;
pub mod inspect;
pub mod merge;
pub mod predict;
pub mod train;
