//! The operator's one error type. Each variant has a short, stable
//! `metric_label` so failures can be counted by kind without leaking
//! object names or secrets into metric labels.

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    /// The renderer produced a config the sidecar schema rejects: a bug, so
    /// nothing is stored or pushed.
    #[error("rendered config is invalid: {0}")]
    InvalidConfig(#[from] infergate_config::ConfigError),
    #[error("{failed} of {total} sidecars did not take the config")]
    Push { failed: usize, total: usize },
    /// The admin token file could not be read (the token itself is never
    /// part of any message).
    #[error("reading the admin token file: {0}")]
    Token(std::io::Error),
    /// This replica's leader term ran out (or the Lease was lost): it must
    /// not write.
    #[error("not the leader (any more)")]
    NotLeader,
}

impl Error {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Error::Kube(_) => "kube",
            Error::InvalidConfig(_) => "invalid_config",
            Error::Push { .. } => "push",
            Error::Token(_) => "admin_token",
            Error::NotLeader => "not_leader",
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
