//! infergate operator library: the pure `render` of cluster objects into the
//! sidecars' `GatewayConfig`, status condition diffing, pushing configs to
//! sidecars, leader election and the reconcile pass that ties them together.

pub mod cache;
pub mod conditions;
pub mod error;
pub mod inputs;
pub mod leader;
pub mod metrics;
pub mod push;
pub mod reconcile;
pub mod render;
pub mod writes;

pub use error::{Error, Result};
