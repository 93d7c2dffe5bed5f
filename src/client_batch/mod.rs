//! Client batch requests (contract §2), in three pure steps the proxy's
//! batch stage calls in order:
//! - [`parse`]: recognise and validate a batch in any encoding;
//! - [`plan`]: which items stand alone, each item's identity, what writes
//!   touched;
//! - [`reply`]: one entry per item, in request order.

pub mod parse;
pub mod plan;
pub mod reply;

pub use parse::{parse, BatchInputError, ClientBatch, Item};
