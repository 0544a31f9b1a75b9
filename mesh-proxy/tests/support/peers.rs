//! A real Kubernetes API server for the tests (etcd and kube-apiserver started by
//! `.ci/peers-kube` on loopback), and `kubectl` from the same release.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// The directory of the Go-built test peers (`.ci/peers` builds them when missing); `None`
/// when they cannot be built here (then the test fails under `CI` and says it skipped
/// elsewhere).
pub fn peers_bin() -> Option<PathBuf> {
    let script = repo().join(".ci/peers");
    match Command::new("bash").arg(&script).output() {
        Ok(out) if out.status.success() => {
            Some(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
        }
        Ok(out) => skip(&format!(
            "the test peers could not be built:\n{}",
            String::from_utf8_lossy(&out.stderr)
        )),
        Err(e) => skip(&format!("running .ci/peers: {e}")),
    }
}

/// The test peer `name` (`h2spec`, `kubectl`, `helm`, ...), built when missing.
pub fn peer(name: &str) -> Option<PathBuf> {
    let bin = peers_bin()?.join(name);
    if bin.is_file() {
        Some(bin)
    } else {
        skip(&format!("{} is missing", bin.display()))
    }
}

fn skip<T>(why: &str) -> Option<T> {
    assert!(std::env::var_os("CI").is_none(), "{why}");
    eprintln!("SKIPPED: {why}");
    None
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Istio's CustomResourceDefinitions, as the Helm chart installs them.
pub const ISTIO_CRDS: &str = include_str!("../../../deploy/helm/mesh/files/istio-crds.yaml");

/// This machine's own non-loopback IPv4 address: the API server refuses loopback
/// addresses in EndpointSlices, so the pods of the tests have this one (processes listen
/// on it, each on its own port).
pub fn host_ip() -> IpAddr {
    for target in ["192.0.2.1:9", "198.51.100.1:9", "10.255.255.254:9"] {
        let Ok(socket) = std::net::UdpSocket::bind("0.0.0.0:0") else {
            continue;
        };
        if socket.connect(target).is_ok()
            && let Ok(local) = socket.local_addr()
            && !local.ip().is_loopback()
            && !local.ip().is_unspecified()
        {
            return local.ip();
        }
    }
    panic!("no non-loopback IPv4 address to give the pods");
}

/// Waits (at most a minute) until the source's state satisfies `f`; panics naming `what`
/// and showing the last state otherwise.
pub async fn wait_for_state(
    rx: &mut tokio::sync::watch::Receiver<
        std::sync::Arc<mesh_proxy::discovery::kube::ClusterState>,
    >,
    what: &str,
    f: impl Fn(&mesh_proxy::discovery::kube::ClusterState) -> bool,
) -> std::sync::Arc<mesh_proxy::discovery::kube::ClusterState> {
    let waited = tokio::time::timeout(std::time::Duration::from_secs(60), rx.wait_for(|s| f(s)))
        .await
        .ok()
        .and_then(Result::ok)
        .map(|s| s.clone());
    match waited {
        Some(s) => s,
        None => panic!(
            "timed out waiting for {what}; the last state was {:#?}",
            rx.borrow()
        ),
    }
}

/// etcd and kube-apiserver running in a directory of their own, stopped when dropped.
pub struct ApiServer {
    dir: tempfile::TempDir,
    /// The server's URL (`https://127.0.0.1:<port>`).
    pub url: String,
    /// A kubeconfig for the admin user (in `system:masters`).
    pub kubeconfig: PathBuf,
    kubectl: PathBuf,
}

impl ApiServer {
    /// Starts a fresh pair (2–3 s); `None` when the peers cannot be built here.
    pub fn start() -> Option<ApiServer> {
        let kubectl = peer("kubectl")?;
        let dir = tempfile::tempdir().expect("temporary directory");
        let out = Command::new("bash")
            .arg(repo().join(".ci/peers-kube"))
            .arg("start")
            .arg(dir.path())
            .stdin(Stdio::null())
            .output()
            .expect("running .ci/peers-kube");
        assert!(
            out.status.success(),
            "starting the API server failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut lines = stdout.lines();
        let url = lines.next().expect("the server URL").to_owned();
        let kubeconfig = PathBuf::from(lines.next().expect("the kubeconfig path"));
        Some(ApiServer {
            dir,
            url,
            kubeconfig,
            kubectl,
        })
    }

    /// The directory holding the server's state, keys (`pki/`) and logs.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The CA certificate that signed the server's certificate (PEM file).
    pub fn ca_file(&self) -> PathBuf {
        self.dir.path().join("pki/ca.crt")
    }

    /// Runs `kubectl` against this server with `args`, writing `stdin` to it.
    pub fn kubectl_output(&self, args: &[&str], stdin: &str) -> Output {
        use std::io::Write;
        let mut child = Command::new(&self.kubectl)
            .arg("--kubeconfig")
            .arg(&self.kubeconfig)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting kubectl");
        let mut input = child.stdin.take().expect("kubectl's stdin");
        input
            .write_all(stdin.as_bytes())
            .expect("writing to kubectl");
        drop(input);
        child.wait_with_output().expect("waiting for kubectl")
    }

    /// Runs `kubectl` with `args` and `stdin`; panics with its error output unless it
    /// succeeds; its standard output.
    pub fn kubectl(&self, args: &[&str], stdin: &str) -> String {
        let out = self.kubectl_output(args, stdin);
        assert!(
            out.status.success(),
            "kubectl {} failed:\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// `kubectl apply -f -` of `yaml`.
    pub fn apply(&self, yaml: &str) -> String {
        self.kubectl(&["apply", "-f", "-"], yaml)
    }

    /// Applies Istio's CRDs as the chart installs them, and waits until the server
    /// serves them.
    pub fn install_istio_crds(&self) {
        self.apply(ISTIO_CRDS);
        self.kubectl(
            &[
                "wait",
                "--for=condition=Established",
                "crd",
                "--all",
                "--timeout=60s",
            ],
            "",
        );
    }

    /// A client for this server as the admin user.
    pub async fn client(&self) -> kube::Client {
        let kubeconfig = kube::config::Kubeconfig::read_from(&self.kubeconfig).expect("kubeconfig");
        let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
            .await
            .expect("client configuration from the kubeconfig");
        kube::Client::try_from(config).expect("client")
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        let _ = Command::new("bash")
            .arg(repo().join(".ci/peers-kube"))
            .arg("stop")
            .arg(self.dir.path())
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
    }
}
