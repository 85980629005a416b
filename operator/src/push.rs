//! Delivering a rendered config to sidecars: ask each for the version it
//! runs, `PUT` only where it differs, retry with back-off. A sidecar that
//! restarted (and so runs an older or no config) gets it again on the next
//! pass.

use std::time::Duration;

use futures_util::future::join_all;
use infergate_config::GatewayConfig;
use serde::Deserialize;

/// A pod, by namespace and name: kept apart, never joined into a string
/// that has to be split again.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PodRef {
    pub namespace: String,
    pub name: String,
}

impl std::fmt::Display for PodRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sidecar {
    /// The sidecar's pod, for events and logs.
    pub pod: PodRef,
    /// e.g. `http://10.0.0.7:9090`
    pub admin_url: String,
}

/// Backend ids the sidecar left out of routing (an upstream key file it
/// cannot read), as its admin API reports them.
pub type Unavailable = Vec<String>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pushed {
    /// The sidecar already ran this version; nothing was sent.
    Current(Unavailable),
    Applied(Unavailable),
    /// The sidecar refused the config (its message), or could not be reached.
    Failed(String),
}

impl Pushed {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Pushed::Current(_) => "current",
            Pushed::Applied(_) => "applied",
            Pushed::Failed(_) => "failed",
        }
    }

    pub fn runs_version(&self) -> bool {
        !matches!(self, Pushed::Failed(_))
    }

    pub fn unavailable(&self) -> &[String] {
        match self {
            Pushed::Current(u) | Pushed::Applied(u) => u,
            Pushed::Failed(_) => &[],
        }
    }
}

fn unavailable(resp: &reqwest::Response) -> Unavailable {
    resp.headers()
        .get(infergate_config::UNAVAILABLE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(|v| {
            v.split(',')
                .filter(|id| !id.is_empty())
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Deserialize)]
struct Versioned {
    version: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    error: ErrorMessage,
}

#[derive(Deserialize)]
struct ErrorMessage {
    message: String,
}

const ATTEMPTS: u32 = 3;

pub async fn push_one(
    client: &reqwest::Client,
    sidecar: &Sidecar,
    config: &GatewayConfig,
    version: &str,
    token: &str,
) -> Pushed {
    let url = format!(
        "{}/admin/v1/config",
        sidecar.admin_url.trim_end_matches('/')
    );
    let mut last = Pushed::Failed("not tried".into());
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        let current = client.get(&url).bearer_auth(token).send().await;
        if let Ok(resp) = current {
            if resp.status().is_success() {
                let unavailable = unavailable(&resp);
                if let Ok(v) = resp.json::<Versioned>().await {
                    if v.version.as_deref() == Some(version) {
                        return Pushed::Current(unavailable);
                    }
                }
            }
        }
        match client
            .put(&url)
            .bearer_auth(token)
            .json(config)
            .send()
            .await
        {
            Ok(resp) if resp.status().is_success() => return Pushed::Applied(unavailable(&resp)),
            Ok(resp) if resp.status().is_client_error() => {
                // A refusal will not change on retry: report it now.
                let message = resp
                    .json::<ErrorBody>()
                    .await
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "refused without an error body".into());
                return Pushed::Failed(message);
            }
            Ok(resp) => last = Pushed::Failed(format!("sidecar answered {}", resp.status())),
            Err(e) => {
                last = Pushed::Failed(if e.is_connect() {
                    "sidecar unreachable".into()
                } else {
                    "transport error".into()
                })
            }
        }
    }
    last
}

/// Push to every sidecar at once; results in the input order.
pub async fn push_all(
    client: &reqwest::Client,
    sidecars: &[Sidecar],
    config: &GatewayConfig,
    version: &str,
    token: &str,
) -> Vec<Pushed> {
    join_all(
        sidecars
            .iter()
            .map(|s| push_one(client, s, config, version, token)),
    )
    .await
}
