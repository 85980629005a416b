//! Delivering a rendered config to sidecars: ask each for the version it
//! runs; where it runs the previous one, `PATCH` only the change (a key
//! revocation is a few bytes); elsewhere `PUT` the whole config; retry with
//! back-off. Serialised once per version, pushed to a bounded number of
//! sidecars at a time. A sidecar that restarted (and so runs an older or no
//! config) gets the whole config again on the next pass.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
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
    /// The whole config was sent and taken.
    Applied(Unavailable),
    /// Only the change from the version it ran was sent, and taken.
    Patched(Unavailable),
    /// The sidecar refused the config (its message), or could not be reached.
    Failed(String),
}

impl Pushed {
    pub fn metric_label(&self) -> &'static str {
        match self {
            Pushed::Current(_) => "current",
            Pushed::Applied(_) => "applied",
            Pushed::Patched(_) => "patched",
            Pushed::Failed(_) => "failed",
        }
    }

    pub fn runs_version(&self) -> bool {
        !matches!(self, Pushed::Failed(_))
    }

    pub fn unavailable(&self) -> &[String] {
        match self {
            Pushed::Current(u) | Pushed::Applied(u) | Pushed::Patched(u) => u,
            Pushed::Failed(_) => &[],
        }
    }
}

/// One version of the config as it goes on the wire, serialised once for
/// every sidecar: the whole config, and the delta from the version before
/// it for the sidecars that run that one.
pub struct Payload {
    pub version: String,
    /// The whole config, gzipped (JSON of this shape compresses ~5-10x).
    full: Bytes,
    /// (the version it applies to, the delta)
    delta: Option<(String, Bytes)>,
}

impl Payload {
    /// `previous`: the config pushed before this one, with its version.
    pub fn new(
        config: &GatewayConfig,
        version: &str,
        previous: Option<(&GatewayConfig, &str)>,
    ) -> Self {
        let delta = previous
            .filter(|(_, from)| *from != version)
            .and_then(|(old, from)| old.diff(config, from, version))
            .map(|d| (d.from.clone(), json(&d)));
        Payload {
            version: version.to_owned(),
            full: gzip(&json(config)),
            delta,
        }
    }

    /// Bytes on the wire of the whole config (gzipped) and of the delta.
    pub fn sizes(&self) -> (usize, Option<usize>) {
        (self.full.len(), self.delta.as_ref().map(|(_, d)| d.len()))
    }
}

fn gzip(bytes: &[u8]) -> Bytes {
    use std::io::Write as _;
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    // Writing to a Vec cannot fail.
    let _ = enc.write_all(bytes);
    Bytes::from(enc.finish().unwrap_or_default())
}

/// Plain data always serialises; were it ever to fail, the empty body is
/// refused by the sidecar and reported, never sent as a config.
fn json(value: &impl serde::Serialize) -> Bytes {
    Bytes::from(serde_json::to_vec(value).unwrap_or_default())
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
/// Sidecars pushed to at once: a thousand pods are not a thousand
/// simultaneous connections from the operator.
pub const CONCURRENCY: usize = 64;

/// What one request to the admin API came to.
enum Answer {
    Taken(Unavailable),
    /// The delta was for another version: send the whole config.
    Conflict,
    Refused(String),
    Retry(String),
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    match req.send().await {
        Ok(resp) if resp.status().is_success() => Answer::Taken(unavailable(&resp)),
        Ok(resp) if resp.status() == reqwest::StatusCode::CONFLICT => Answer::Conflict,
        Ok(resp) if resp.status().is_client_error() => {
            // A refusal will not change on retry: report it now.
            Answer::Refused(
                resp.json::<ErrorBody>()
                    .await
                    .map(|b| b.error.message)
                    .unwrap_or_else(|_| "refused without an error body".into()),
            )
        }
        Ok(resp) => Answer::Retry(format!("sidecar answered {}", resp.status())),
        Err(e) if e.is_connect() => Answer::Retry("sidecar unreachable".into()),
        Err(_) => Answer::Retry("transport error".into()),
    }
}

pub async fn push_one(
    client: &reqwest::Client,
    sidecar: &Sidecar,
    payload: &Payload,
    token: &str,
) -> Pushed {
    let base = sidecar.admin_url.trim_end_matches('/');
    let url = format!("{base}/admin/v1/config");
    let mut last = Pushed::Failed("not tried".into());
    let json = |req: reqwest::RequestBuilder, body: &Bytes| {
        req.bearer_auth(token)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body.clone())
    };
    // A sidecar on the previous version (the usual case) takes the delta in
    // one request; any other version answers 409 and gets the whole config.
    if let Some((_, delta)) = &payload.delta {
        match send(json(client.patch(&url), delta)).await {
            Answer::Taken(u) => return Pushed::Patched(u),
            Answer::Refused(why) => return Pushed::Failed(why),
            Answer::Conflict | Answer::Retry(_) => {}
        }
    }
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(100 << attempt)).await;
        }
        if let Ok(resp) = client
            .get(format!("{url}/version"))
            .bearer_auth(token)
            .send()
            .await
        {
            if resp.status().is_success() {
                let unavailable = unavailable(&resp);
                if let Ok(v) = resp.json::<Versioned>().await {
                    if v.version.as_deref() == Some(payload.version.as_str()) {
                        return Pushed::Current(unavailable);
                    }
                }
            }
        }
        let put = client
            .put(&url)
            .header(reqwest::header::CONTENT_ENCODING, "gzip");
        match send(json(put, &payload.full)).await {
            Answer::Taken(u) => return Pushed::Applied(u),
            Answer::Refused(why) => return Pushed::Failed(why),
            Answer::Conflict => return Pushed::Failed("conflict on a whole config".into()),
            Answer::Retry(why) => last = Pushed::Failed(why),
        }
    }
    last
}

/// Push to every sidecar, `CONCURRENCY` at a time; results in input order.
pub async fn push_all(
    client: &reqwest::Client,
    sidecars: &[Sidecar],
    payload: &Payload,
    token: &str,
) -> Vec<Pushed> {
    // Futures made first: a stream over a borrowing `map` closure trips the
    // compiler's Send check for the spawned reconcile task.
    let pushes: Vec<_> = sidecars
        .iter()
        .map(|s| push_one(client, s, payload, token))
        .collect();
    futures_util::stream::iter(pushes)
        .buffered(CONCURRENCY)
        .collect()
        .await
}
