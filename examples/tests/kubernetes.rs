//! The Kubernetes manifests in `deploy/kubernetes/`: they parse, the Istio YAML they
//! carry loads and compiles, and the paths and file names line up with what the sidecar
//! reads, with config and certificates mounted the way the kubelet mounts them (a
//! timestamped directory, a `..data` symlink, one symlink per key).

#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use examples::scenario::{DevCa, SVID_FILES};
use mesh_core::config::{LoadOptions, MeshConfig};
use mesh_routing::{CompileOptions, Routing};
use mesh_tls::{CertStore, PeerAuthMode, PolicySet};
use serde_json::Value;

fn deploy_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn manifests() -> Vec<(String, Vec<Value>)> {
    let mut out = Vec::new();
    let mut paths: Vec<PathBuf> = std::fs::read_dir(deploy_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    paths.sort();
    for p in paths {
        let text = std::fs::read_to_string(&p).unwrap();
        let docs: Vec<Value> =
            serde_saphyr::from_multiple(&text).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        out.push((p.file_name().unwrap().to_string_lossy().into_owned(), docs));
    }
    out
}

fn find<'a>(docs: &'a [(String, Vec<Value>)], kind: &str, name: &str) -> &'a Value {
    docs.iter()
        .flat_map(|(_, d)| d)
        .find(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind}/{name}"))
}

/// Writes `files` into `dir` as the kubelet does for a ConfigMap or Secret volume.
fn kubelet_mount(dir: &Path, files: &BTreeMap<String, String>) {
    let stamp = dir.join("..2026_11_27_03_00_00.000000001");
    std::fs::create_dir_all(&stamp).unwrap();
    for (k, v) in files {
        std::fs::write(stamp.join(k), v).unwrap();
    }
    std::os::unix::fs::symlink(stamp.file_name().unwrap(), dir.join("..data")).unwrap();
    for k in files.keys() {
        std::os::unix::fs::symlink(Path::new("..data").join(k), dir.join(k)).unwrap();
    }
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_owned()))
        .collect()
}

#[test]
fn every_manifest_parses_and_names_its_kind_and_namespace() {
    let docs = manifests();
    assert!(docs.len() >= 3);
    for (file, docs) in &docs {
        assert!(!docs.is_empty(), "{file}");
        for d in docs {
            assert!(
                d["apiVersion"].is_string() && d["kind"].is_string(),
                "{file}: {d}"
            );
            assert_eq!(
                d["metadata"]["namespace"], "production",
                "{file}: {}",
                d["metadata"]
            );
        }
    }
}

#[test]
fn istio_config_map_loads_and_compiles_when_mounted_by_the_kubelet() {
    let docs = manifests();
    let cm = find(&docs, "ConfigMap", "mesh-istio-config");
    let files = string_map(&cm["data"]);
    assert!(
        files.keys().all(|k| k.ends_with(".yaml")),
        "the loader reads *.yaml files"
    );
    let dir = tempfile::tempdir().unwrap();
    kubelet_mount(dir.path(), &files);

    let (config, report) = MeshConfig::load(&[dir.path()], &LoadOptions::default()).unwrap();
    assert_eq!(report.resources.len(), 5, "{:?}", report.diagnostics);
    assert_eq!(config.peer_authentications().len(), 1);
    assert_eq!(config.authorization_policies().len(), 1);
    assert_eq!(config.service_entries().len(), 1);
    assert!(Routing::compile(&config, &CompileOptions::default()).is_ok());

    let labels = BTreeMap::from([("app".to_owned(), "payment-service".to_owned())]);
    let authz = PolicySet::from_config(&config, "production", &labels).unwrap();
    assert_eq!(authz.len(), 1);
    let pa = mesh_tls::PeerAuthentication::from_config(&config);
    assert_eq!(
        pa.for_workload("production", &labels).mode(15006),
        PeerAuthMode::Strict
    );
}

#[test]
fn sidecar_mounts_match_its_settings() {
    let docs = manifests();
    for app in ["order-service", "payment-service"] {
        let settings_cm = find(&docs, "ConfigMap", &format!("{app}-sidecar"));
        let settings: Value =
            serde_saphyr::from_str(settings_cm["data"]["sidecar.yaml"].as_str().unwrap()).unwrap();
        let known = [
            "workload",
            "trustDomain",
            "clusterId",
            "configDir",
            "svid",
            "listeners",
            "tracing",
            "accessLog",
            "pathNormalization",
            "limits",
            "outboundTrafficPolicy",
            "gateway",
        ];
        for key in settings.as_object().unwrap().keys() {
            assert!(
                known.contains(&key.as_str()),
                "{app}: unknown settings key {key}"
            );
        }
        assert_eq!(settings["workload"]["serviceAccount"], app);

        let deployment = find(&docs, "Deployment", &format!("{app}-v1"));
        let pod = &deployment["spec"]["template"]["spec"];
        assert_eq!(pod["serviceAccountName"], app);
        assert_eq!(
            deployment["spec"]["template"]["metadata"]["labels"],
            settings["workload"]["labels"]
        );
        let sidecar = pod["containers"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["name"] == "mesh-proxy")
            .unwrap();
        let args: Vec<&str> = sidecar["args"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| a.as_str().unwrap())
            .collect();
        assert_eq!(args, ["sidecar", "--settings", "/etc/mesh/sidecar.yaml"]);

        let mount_of = |volume_source: &str, name: &str| -> String {
            let volume = pod["volumes"]
                .as_array()
                .unwrap()
                .iter()
                .find(|v| {
                    v[volume_source]["name"] == name || v[volume_source]["secretName"] == name
                })
                .unwrap_or_else(|| panic!("{app}: no volume for {name}"));
            let m = sidecar["volumeMounts"]
                .as_array()
                .unwrap()
                .iter()
                .find(|m| m["name"] == volume["name"])
                .unwrap();
            m["mountPath"].as_str().unwrap().to_owned()
        };
        assert_eq!(
            mount_of("configMap", &format!("{app}-sidecar")),
            "/etc/mesh"
        );
        assert_eq!(
            mount_of("configMap", "mesh-istio-config"),
            settings["configDir"].as_str().unwrap()
        );
        assert_eq!(
            mount_of("secret", &format!("{app}-svid")),
            settings["svid"]["certDir"].as_str().unwrap()
        );

        let secret = find(&docs, "Secret", &format!("{app}-svid"));
        let keys: Vec<&String> = secret["stringData"].as_object().unwrap().keys().collect();
        let mut want: Vec<&str> = SVID_FILES.to_vec();
        want.sort_unstable();
        assert_eq!(keys, want);

        let inbound_port: u16 = settings["listeners"]["inbound"]
            .as_str()
            .unwrap()
            .rsplit(':')
            .next()
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(sidecar["ports"][0]["containerPort"], inbound_port);
        let service = find(&docs, "Service", app);
        assert_eq!(
            service["spec"]["ports"][0]["targetPort"],
            sidecar["ports"][0]["name"]
        );
    }
}

#[test]
fn svid_secret_mounted_by_the_kubelet_loads_as_the_workload_identity() {
    let scratch = tempfile::tempdir().unwrap();
    let ca = DevCa::new(scratch.path()).unwrap();
    let issued = ca.write_svid("production", "payment-service").unwrap();
    let files: BTreeMap<String, String> = SVID_FILES
        .iter()
        .map(|f| {
            (
                (*f).to_owned(),
                std::fs::read_to_string(issued.join(f)).unwrap(),
            )
        })
        .collect();
    let mount = tempfile::tempdir().unwrap();
    kubelet_mount(mount.path(), &files);
    let store = CertStore::load_dir(mount.path()).unwrap();
    assert_eq!(
        store.identity().as_str(),
        "spiffe://cluster.local/ns/production/sa/payment-service"
    );
}

/// Swaps a kubelet-style mount to new contents the way the kubelet does: a new
/// timestamped directory, then an atomic rename of a fresh `..data` symlink.
fn kubelet_update(dir: &Path, files: &BTreeMap<String, String>) {
    let stamp = dir.join("..2026_11_27_04_00_00.000000002");
    std::fs::create_dir_all(&stamp).unwrap();
    for (k, v) in files {
        std::fs::write(stamp.join(k), v).unwrap();
    }
    std::os::unix::fs::symlink(stamp.file_name().unwrap(), dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
}

async fn admin_get(addr: std::net::SocketAddr, path: &str) -> Value {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    tcp.write_all(
        format!("GET {path} HTTP/1.1\r\nhost: admin\r\nconnection: close\r\n\r\n").as_bytes(),
    )
    .await
    .unwrap();
    let mut out = String::new();
    tcp.read_to_string(&mut out).await.unwrap();
    let body = out.split_once("\r\n\r\n").unwrap().1;
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {out}"))
}

#[tokio::test]
async fn sidecar_starts_from_the_manifests_mounted_by_the_kubelet_and_follows_configmap_updates() {
    let docs = manifests();
    let scratch = tempfile::tempdir().unwrap();
    let (config_mount, certs_mount) = (scratch.path().join("config"), scratch.path().join("certs"));
    std::fs::create_dir_all(&config_mount).unwrap();
    std::fs::create_dir_all(&certs_mount).unwrap();

    let istio = string_map(&find(&docs, "ConfigMap", "mesh-istio-config")["data"]);
    kubelet_mount(&config_mount, &istio);
    let ca = DevCa::new(&scratch.path().join("ca")).unwrap();
    let issued = ca.write_svid("production", "payment-service").unwrap();
    let svid: BTreeMap<String, String> = SVID_FILES
        .iter()
        .map(|f| {
            (
                (*f).to_owned(),
                std::fs::read_to_string(issued.join(f)).unwrap(),
            )
        })
        .collect();
    kubelet_mount(&certs_mount, &svid);

    // The manifest's settings, with the pod's mount points mapped to the scratch mounts
    // and the listeners moved to free loopback ports.
    let text = find(&docs, "ConfigMap", "payment-service-sidecar")["data"]["sidecar.yaml"]
        .as_str()
        .unwrap()
        .replace("/etc/istio/config", &config_mount.display().to_string())
        .replace("/etc/certs", &certs_mount.display().to_string())
        .replace("0.0.0.0:15006", "127.0.0.1:0")
        .replace("127.0.0.1:15001", "127.0.0.1:0")
        .replace("127.0.0.1:15000", "127.0.0.1:0")
        .replace("path: \"-\"", "path: \"/dev/null\"");
    let settings = mesh_proxy::Settings::from_yaml("sidecar.yaml", &text).unwrap();
    let proxy = mesh_proxy::Sidecar::start(settings).await.unwrap();
    let admin = proxy.address("admin").unwrap();

    let certs = admin_get(admin, "/certs").await;
    assert_eq!(
        certs["identity"],
        "spiffe://cluster.local/ns/production/sa/payment-service"
    );
    let dump = admin_get(admin, "/config_dump").await;
    assert_eq!(dump["resources"].as_array().unwrap().len(), 5, "{dump}");

    // `kubectl apply` of a changed ConfigMap: the kubelet swaps `..data`.
    let mut changed = istio.clone();
    changed.insert(
        "payment-service-resilience.yaml".into(),
        istio["payment-service-resilience.yaml"].replace("attempts: 3", "attempts: 2"),
    );
    kubelet_update(&config_mount, &changed);
    let before = dump["version"].clone();
    let mut reloaded = false;
    for _ in 0..100 {
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        if admin_get(admin, "/config_dump").await["version"] != before {
            reloaded = true;
            break;
        }
    }
    proxy.shutdown();
    assert!(reloaded, "the sidecar did not follow the ConfigMap update");
}
