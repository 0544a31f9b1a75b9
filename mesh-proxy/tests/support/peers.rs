//! A real Kubernetes API server for the tests (etcd and kube-apiserver started by
//! `.ci/peers-kube` on loopback), and `kubectl` from the same release.

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
