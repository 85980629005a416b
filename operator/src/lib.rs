//! infergate operator library: the pure `render` of cluster objects into the
//! sidecars' `GatewayConfig`, and status condition diffing.

pub mod conditions;
pub mod push;
pub mod render;
