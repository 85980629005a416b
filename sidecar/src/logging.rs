//! Process-wide logging for the binaries that serve a sidecar.

use crate::LogLevelSetter;

/// Logs go to stderr (stdout carries the listening line and usage records);
/// the filter can be changed later through the admin port. Colour only on a
/// terminal: log files and pipes get plain text.
pub fn init(json: bool) -> LogLevelSetter {
    use std::io::IsTerminal as _;
    use tracing_subscriber::prelude::*;
    use tracing_subscriber::{fmt, reload, EnvFilter};
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let (filter, handle) = reload::Layer::new(filter);
    let layer = fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        registry.with(layer.json()).init();
    } else {
        registry.with(layer).init();
    }
    Box::new(move |directive: &str| {
        let filter = EnvFilter::try_new(directive).map_err(|e| e.to_string())?;
        handle.reload(filter).map_err(|e| e.to_string())
    })
}
