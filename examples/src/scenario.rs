//! Building blocks of the example programs: a development CA writing Istio's SVID files,
//! loopback service replicas behind the inbound path, and the ServiceEntry that tells the
//! mesh where those replicas listen.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use http::{Request, Response, StatusCode};
use mesh_core::PeerIdentity;
use mesh_core::body::{self, BoxBody};
use mesh_core::config::MeshConfig;
use mesh_core::error::BoxError;
use mesh_proxy::{Certificates, Mesh};
use mesh_telemetry::{Telemetry, Workload};
use mesh_tls::{CertStore, CertificateAuthority};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tower::util::BoxCloneSyncService;

/// An application service behind the inbound path.
pub type AppService = BoxCloneSyncService<Request<BoxBody>, Response<BoxBody>, BoxError>;

/// Istio's SVID file names, as Kubernetes mounts them.
pub const SVID_FILES: [&str; 3] = ["cert-chain.pem", "key.pem", "root-cert.pem"];

/// A development CA that writes each workload's SVID the way Istio mounts it.
#[derive(Debug)]
pub struct DevCa {
    ca: Arc<CertificateAuthority>,
    dir: PathBuf,
}

impl DevCa {
    /// A new CA for trust domain `cluster.local`, writing under `dir`.
    pub fn new(dir: &Path) -> Result<Self, BoxError> {
        Ok(Self {
            ca: Arc::new(CertificateAuthority::new("cluster.local")?),
            dir: dir.to_owned(),
        })
    }

    /// The CA.
    pub fn authority(&self) -> &Arc<CertificateAuthority> {
        &self.ca
    }

    /// Issues an SVID for `namespace/service_account`, writes `cert-chain.pem`, `key.pem`
    /// and `root-cert.pem` into its own directory and returns that directory.
    pub fn write_svid(&self, namespace: &str, service_account: &str) -> Result<PathBuf, BoxError> {
        let dir = self.dir.join(format!("{namespace}.{service_account}"));
        std::fs::create_dir_all(&dir)?;
        self.ca.issue(namespace, service_account)?.write_dir(&dir)?;
        Ok(dir)
    }
}

/// What a replica answers: who it is and who called it.
pub fn replica_body(app: &str, version: &str, replica: &str, peer: Option<&str>) -> String {
    format!(
        "{{\"app\":\"{app}\",\"version\":\"{version}\",\"replica\":\"{replica}\",\"peer\":\"{}\"}}",
        peer.unwrap_or("")
    )
}

/// One replica of a service: a tiny application behind the inbound path (STRICT mTLS
/// per PeerAuthentication, telemetry, AuthorizationPolicy).
#[derive(Debug)]
pub struct Replica {
    /// Where it listens.
    pub address: SocketAddr,
    /// `version` label.
    pub version: String,
    /// Replica name (`v1-a`).
    pub name: String,
    /// While set, the application answers 503.
    pub failing: Arc<AtomicBool>,
    /// Requests the application received (after authorization).
    pub hits: Arc<AtomicU64>,
    /// The replica's telemetry (`reporter="destination"`).
    pub telemetry: Telemetry,
    /// The replica's mesh (update its configuration, read its certificate).
    pub mesh: Mesh,
    task: JoinHandle<()>,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Options of [`start_replica`].
#[derive(Debug, Clone)]
pub struct ReplicaSpec {
    /// `app` label and service account.
    pub app: String,
    /// `version` label.
    pub version: String,
    /// Replica name.
    pub name: String,
    /// Namespace.
    pub namespace: String,
    /// Directory holding the SVID files.
    pub svid_dir: PathBuf,
}

/// Starts a replica on `127.0.0.1:0`: the application embedded behind the mesh's
/// inbound stack (mTLS per PeerAuthentication, telemetry, AuthorizationPolicy).
pub async fn start_replica(config: &MeshConfig, spec: ReplicaSpec) -> Result<Replica, BoxError> {
    let store = CertStore::load_dir(&spec.svid_dir)?;
    let workload = mesh_proxy::Workload::new(&spec.namespace, &spec.app)
        .label("app", &spec.app)
        .label("version", &spec.version);
    let mut w = Workload::new(format!("{}-{}", spec.app, spec.version), &spec.namespace);
    w.version = spec.version.clone();
    w.canonical_revision = spec.version.clone();
    w.principal = Some(store.identity());
    let telemetry = Telemetry::builder(w).sampling(100.0).build();
    let mesh = Mesh::builder(workload)
        .config(config.clone())
        .certificates(Certificates::Store(store))
        .telemetry(telemetry.clone())
        .build()?;
    let failing = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(AtomicU64::new(0));
    let app = replica_app(&spec, failing.clone(), hits.clone());
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let address = listener.local_addr()?;
    let task = mesh.serve_inbound(listener, app);
    Ok(Replica {
        address,
        version: spec.version,
        name: spec.name,
        failing,
        hits,
        telemetry,
        mesh,
        task,
    })
}

fn replica_app(spec: &ReplicaSpec, failing: Arc<AtomicBool>, hits: Arc<AtomicU64>) -> AppService {
    let (app, version, name) = (spec.app.clone(), spec.version.clone(), spec.name.clone());
    BoxCloneSyncService::new(tower::service_fn(move |req: Request<BoxBody>| {
        hits.fetch_add(1, Ordering::Relaxed);
        let peer = req
            .extensions()
            .get::<PeerIdentity>()
            .map(|p| p.0.to_string());
        let res = if failing.load(Ordering::Relaxed) {
            Response::builder()
                .status(StatusCode::SERVICE_UNAVAILABLE)
                .body(body::full("replica failing"))
        } else {
            Response::builder()
                .header("content-type", "application/json")
                .header("x-replica", name.as_str())
                .header("x-version", version.as_str())
                .body(body::full(replica_body(
                    &app,
                    &version,
                    &name,
                    peer.as_deref(),
                )))
        };
        std::future::ready(res.map_err(BoxError::from))
    }))
}

/// An endpoint of a ServiceEntry.
#[derive(Debug, Clone)]
pub struct EntryEndpoint {
    /// Where it listens.
    pub address: SocketAddr,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its service account (the identity clients expect); empty for an endpoint without
    /// a sidecar (auto-mTLS then sends plaintext).
    pub service_account: String,
}

/// A `ServiceEntry` for `host` (short name) in `namespace` on `port` (named `http`),
/// with the given loopback endpoints: the one piece of configuration a loopback run
/// adds to the Istio YAML, in place of Kubernetes endpoints. Each endpoint names its
/// `serviceAccount`, which is what makes auto-mTLS send Istio mTLS to it, as Istio does
/// for ServiceEntry endpoints (ISTIO.md SR-25); no `security.istio.io/tlsMode` label is
/// needed.
pub fn service_entry_yaml(
    host: &str,
    namespace: &str,
    port: u16,
    endpoints: &[EntryEndpoint],
) -> String {
    let mut y = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {host}\n  namespace: {namespace}\nspec:\n  hosts: [{host}]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - {{number: {port}, name: http, protocol: HTTP}}\n  endpoints:\n"
    );
    for ep in endpoints {
        let _ = write!(
            y,
            "  - address: {}\n    ports: {{http: {}}}\n",
            ep.address.ip(),
            ep.address.port(),
        );
        // An endpoint without a sidecar has no identity to check.
        if !ep.service_account.is_empty() {
            let _ = writeln!(y, "    serviceAccount: {}", ep.service_account);
        }
        y.push_str("    labels: {");
        let labels: Vec<String> = ep.labels.iter().map(|(k, v)| format!("{k}: {v}")).collect();
        y.push_str(&labels.join(", "));
        y.push_str("}\n");
    }
    y
}

/// Whether `hits` out of `n` is within 4.5 standard deviations (plus one) of `percent`:
/// a bound a correct weighted split misses about once in a hundred thousand runs.
pub fn within(hits: usize, n: usize, percent: f64) -> bool {
    let p = percent / 100.0;
    let mean = n as f64 * p;
    let sd = (n as f64 * p * (1.0 - p)).sqrt();
    (hits as f64 - mean).abs() <= 4.5 * sd + 1.0
}

/// The embedded example's Istio YAML copied into `dir/istio` with a ServiceEntry placing
/// payment-service's replicas (`(version, address)`); returns the directory.
pub fn doc_config(dir: &Path, replicas: &[(&str, SocketAddr)]) -> Result<PathBuf, BoxError> {
    let istio = dir.join("istio");
    std::fs::create_dir_all(&istio)?;
    for entry in std::fs::read_dir(crate::embedded::config_dir())? {
        let path = entry?.path();
        if let Some(name) = path.file_name() {
            std::fs::copy(&path, istio.join(name))?;
        }
    }
    let endpoints: Vec<EntryEndpoint> = replicas
        .iter()
        .map(|(version, address)| EntryEndpoint {
            address: *address,
            labels: BTreeMap::from([
                ("app".to_owned(), "payment-service".to_owned()),
                ("version".to_owned(), (*version).to_owned()),
            ]),
            service_account: "payment-service".into(),
        })
        .collect();
    std::fs::write(
        istio.join("payment-service-entry.yaml"),
        service_entry_yaml("payment-service", "production", 8080, &endpoints),
    )?;
    Ok(istio)
}
