//! A real kube-apiserver (with etcd) for the operator's integration tests,
//! and the local processes (operator, sidecars) that stand in for pods,
//! since no kubelet runs here.
//!
//! Which API server: the running testbed in `INFERGATE_TESTBED` (a
//! directory holding `kubeconfig`; `scripts/test` starts one for the whole
//! run), else one started here by `scripts/k8s-testbed start` when
//! `scripts/k8s-testbed install` has built kube-apiserver and installed
//! etcd. Without either the test prints a loud SKIPPED line and returns;
//! with `INFERGATE_KUBE_TESTS=1` (as in `scripts/test`) it fails instead.

#![allow(dead_code)] // each test binary uses a different part

pub mod objects;

use std::future::Future;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Namespace, Pod, ServiceAccount};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client};
use serde_json::json;

pub const TOKEN: &str = "integration-admin-token-0123456789";

pub struct Testbed {
    pub dir: PathBuf,
    started_here: bool,
}

impl Drop for Testbed {
    fn drop(&mut self) {
        if self.started_here {
            let _ = Command::new(script()).arg("stop").arg(&self.dir).status();
        }
    }
}

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn script() -> PathBuf {
    repo_root().join("scripts/k8s-testbed")
}

static SHARED: Mutex<Weak<Testbed>> = Mutex::new(Weak::new());

/// The testbed every test in this binary shares, or `None` (after a
/// SKIPPED line on stderr) when no real API server can run here.
pub fn testbed(test: &str) -> Option<Arc<Testbed>> {
    let mut shared = SHARED.lock().unwrap();
    if let Some(tb) = shared.upgrade() {
        return Some(tb);
    }
    let required = std::env::var("INFERGATE_KUBE_TESTS").as_deref() == Ok("1");
    let tb = match std::env::var_os("INFERGATE_TESTBED") {
        Some(dir) => Testbed {
            dir: dir.into(),
            started_here: false,
        },
        None if can_start() => start_testbed(),
        None => {
            assert!(
                !required,
                "{test}: INFERGATE_KUBE_TESTS=1 but no kube-apiserver and etcd here \
                 (run scripts/k8s-testbed install)"
            );
            // Straight to stderr: the harness captures `eprintln!` of passing
            // tests, and a test that did not run must be seen.
            let _ = writeln!(
                std::io::stderr(),
                "\n!! SKIPPED {test}: no real kube-apiserver + etcd here. \
                 `scripts/k8s-testbed install` builds one; scripts/test runs this test.\n"
            );
            return None;
        }
    };
    let tb = Arc::new(tb);
    assert!(
        tb.kubeconfig().is_file(),
        "no kubeconfig in the testbed dir {:?}",
        tb.dir
    );
    *shared = Arc::downgrade(&tb);
    Some(tb)
}

/// kube-apiserver where `scripts/k8s-testbed` looks for it, and etcd.
fn can_start() -> bool {
    let apiserver = std::env::var_os("KUBE_APISERVER").map_or_else(
        || repo_root().join(".testbed/bin/kube-apiserver"),
        PathBuf::from,
    );
    let etcd = std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|d| d.join("etcd").is_file()));
    apiserver.is_file() && etcd
}

fn start_testbed() -> Testbed {
    let dir = scratch_dir("testbed");
    let status = Command::new(script())
        .arg("start")
        .arg(&dir)
        .status()
        .unwrap_or_else(|e| panic!("{:?} cannot run: {e}", script()));
    assert!(
        status.success(),
        "scripts/k8s-testbed start failed: {status}"
    );
    Testbed {
        dir,
        started_here: true,
    }
}

impl Testbed {
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.join("kubeconfig")
    }

    pub async fn client(&self) -> Client {
        let kubeconfig = Kubeconfig::read_from(self.kubeconfig()).expect("read kubeconfig");
        let config =
            kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
                .await
                .expect("kubeconfig is usable");
        Client::try_from(config).expect("client")
    }
}

/// A fresh directory under the system temp dir.
pub fn scratch_dir(what: &str) -> PathBuf {
    static N: AtomicU32 = AtomicU32::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    let dir = std::env::temp_dir().join(format!(
        "infergate-{what}-{}-{}-{nanos}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A namespace name no earlier run used (namespaces never finish deleting
/// without a controller-manager, so each run takes new ones).
pub fn unique_ns(prefix: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{prefix}-{:x}", nanos % 0xff_ffff_ffff)
}

/// Apply the generated CRDs from crds/ (the files the chart ships) and wait
/// until they serve.
pub async fn apply_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for name in [
        "infergate.dev_inferenceproviders.yaml",
        "infergate.dev_modelroutes.yaml",
    ] {
        let text = std::fs::read_to_string(repo_root().join("crds").join(name)).unwrap();
        let crd: CustomResourceDefinition = serde_yaml::from_str(&text).unwrap();
        let crd_name = crd.metadata.name.clone().unwrap();
        api.patch(
            &crd_name,
            &PatchParams::apply("infergate-tests").force(),
            &Patch::Apply(&crd),
        )
        .await
        .unwrap();
        eventually(&format!("CRD {crd_name} established"), || {
            let api = api.clone();
            let crd_name = crd_name.clone();
            async move {
                let crd = api.get(&crd_name).await.ok()?;
                let conds = crd.status?.conditions?;
                conds
                    .iter()
                    .any(|c| c.type_ == "Established" && c.status == "True")
                    .then_some(())
            }
        })
        .await;
    }
}

/// A namespace with the `default` ServiceAccount pods need (no
/// controller-manager here creates it).
pub async fn create_namespace(client: &Client, name: &str) {
    let ns: Namespace = serde_json::from_value(json!({"metadata": {"name": name}})).unwrap();
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .unwrap();
    let sa: ServiceAccount =
        serde_json::from_value(json!({"metadata": {"name": "default"}})).unwrap();
    match Api::<ServiceAccount>::namespaced(client.clone(), name)
        .create(&PostParams::default(), &sa)
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => panic!("create service account: {e}"),
    }
}

/// A Pod object for a sidecar process running on 127.0.0.1, marked Ready
/// with the given admin port: what a kubelet would report.
pub async fn sidecar_pod(client: &Client, ns: &str, name: &str, admin_port: u16) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {
            "name": name,
            "labels": {"infergate.dev/sidecar": "true"},
            "annotations": {"infergate.dev/admin-port": admin_port.to_string()},
        },
        "spec": {"containers": [{"name": "sidecar", "image": "infergate/sidecar:test"}]},
    }))
    .unwrap();
    pods.create(&PostParams::default(), &pod).await.unwrap();
    set_pod_ready(client, ns, name, true).await;
}

pub async fn set_pod_ready(client: &Client, ns: &str, name: &str, ready: bool) {
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let status = json!({"status": {
        "phase": "Running",
        "podIP": "127.0.0.1",
        "podIPs": [{"ip": "127.0.0.1"}],
        "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }}],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .unwrap();
}

/// Poll until `f` returns `Some`, or panic after 40 s naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + Duration::from_secs(40);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for: {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// A child process killed when dropped; its output goes to a log file that
/// is printed if the test fails while it runs.
pub struct Proc {
    pub name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, cmd: &mut Command, dir: &Path) -> Proc {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).unwrap();
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: the process dies without any clean-up, as on a node crash.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait: a graceful stop.
    pub fn terminate(&mut self) {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.kill();
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The value of `key=` on the first log line holding `marker`, waiting
    /// up to 20 s for it. Processes bind port 0 and report the address they
    /// got: a port picked free beforehand can be taken by another process
    /// (an outgoing connection's ephemeral port) before the child binds it.
    pub fn wait_for_field(&mut self, marker: &str, key: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let log = self.log();
            let found = log.lines().filter(|l| l.contains(marker)).find_map(|l| {
                l.split_whitespace()
                    .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
                    .map(str::to_owned)
            });
            if let Some(value) = found {
                return value;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "{} exited ({status}) before logging {marker:?}:\n{log}",
                    self.name
                );
            }
            assert!(
                Instant::now() < deadline,
                "{} did not log {marker:?} in 20 s:\n{log}",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// The port of `http://host:port` or `host:port`.
fn port_of(addr: &str) -> u16 {
    let addr = addr.trim_start_matches("http://");
    addr.rsplit(':')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {addr:?}"))
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            eprintln!("----- {} log -----\n{}", self.name, self.log());
        }
    }
}

/// Binaries built next to this test's own: the operator from this package,
/// the sidecar from the workspace (`cargo build --workspace --bins`).
pub fn operator_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_infergate-operator"))
}

pub fn sidecar_bin() -> PathBuf {
    let path = std::env::var_os("INFERGATE_SIDECAR_BIN").map_or_else(
        || operator_bin().with_file_name("infergate-sidecar"),
        PathBuf::from,
    );
    assert!(
        path.is_file(),
        "sidecar binary {path:?} missing: run `cargo build --workspace --bins` first"
    );
    path
}

pub struct Sidecar {
    pub proc: Proc,
    pub admin_port: u16,
    pub public_port: u16,
}

/// A sidecar on ports of its own choosing.
pub fn spawn_sidecar(name: &str, dir: &Path) -> Sidecar {
    spawn_sidecar_on(name, dir, 0, 0)
}

/// A sidecar on given ports (0: any), e.g. restarted where it ran before.
pub fn spawn_sidecar_on(name: &str, dir: &Path, admin_port: u16, public_port: u16) -> Sidecar {
    // One file per process: rewriting a shared file could be read half
    // written (empty) by a process starting at that moment.
    let token = dir.join(format!("{name}.token"));
    std::fs::write(&token, TOKEN).unwrap();
    let mut proc = Proc::spawn(
        name,
        Command::new(sidecar_bin())
            .arg("--listen")
            .arg(format!("127.0.0.1:{public_port}"))
            .arg("--admin-listen")
            .arg(format!("127.0.0.1:{admin_port}"))
            .arg("--admin-token-file")
            .arg(&token),
        dir,
    );
    let public_port = port_of(&proc.wait_for_field("infergate-sidecar listening", "public"));
    let admin_port = port_of(&proc.wait_for_field("infergate-sidecar listening", "admin"));
    Sidecar {
        proc,
        admin_port,
        public_port,
    }
}

/// The version of the config a sidecar process runs ("" when it has none).
pub async fn running_version(admin_port: u16) -> String {
    sidecar_config(admin_port)
        .await
        .and_then(|c| c["version"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// The config a sidecar process runs, from its admin API.
pub async fn sidecar_config(admin_port: u16) -> Option<serde_json::Value> {
    let resp = reqwest::Client::new()
        .get(format!("http://127.0.0.1:{admin_port}/admin/v1/config"))
        .bearer_auth(TOKEN)
        .send()
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

pub struct Operator {
    pub proc: Proc,
    pub identity: String,
    pub port: u16,
}

pub fn spawn_operator(tb: &Testbed, ns: &str, identity: &str, dir: &Path) -> Operator {
    let token = dir.join(format!("{identity}.token"));
    std::fs::write(&token, format!("{TOKEN}\n")).unwrap();
    let mut proc = Proc::spawn(
        identity,
        Command::new(operator_bin())
            .env("KUBECONFIG", tb.kubeconfig())
            .env("RUST_LOG", "info,infergate_operator=debug")
            .args(["--namespace", ns, "--watch-namespaces", ns])
            .args(["--config-map", "infergate-config"])
            .args(["--lease-name", "infergate-operator"])
            .args(["--identity", identity])
            .args(["--lease-seconds", "3", "--resync-seconds", "2"])
            .arg("--admin-token-file")
            .arg(&token)
            .arg("--listen")
            .arg("127.0.0.1:0"),
        dir,
    );
    let port = port_of(&proc.wait_for_field("operator started", "addr"));
    Operator {
        proc,
        identity: identity.to_owned(),
        port,
    }
}

impl Operator {
    pub async fn get(&self, path: &str) -> Option<(u16, String)> {
        let resp = reqwest::get(format!("http://127.0.0.1:{}{path}", self.port))
            .await
            .ok()?;
        let status = resp.status().as_u16();
        Some((status, resp.text().await.ok()?))
    }
}
