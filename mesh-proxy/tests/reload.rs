//! Configuration reload with real processes: a Kubernetes-style atomic `..data` symlink
//! swap is picked up, and SIGHUP reloads without stopping the proxy.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::os::unix::fs::symlink;
use std::path::Path;
use std::time::Duration;

use support::*;

fn route_to(host: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: order-service, namespace: production}}
spec:
  hosts: [order-service]
  http:
  - route:
    - destination: {{host: {host}}}
"
    )
}

/// Publishes `files` the way the kubelet updates a ConfigMap volume: a new timestamped
/// directory, a `..data_tmp` symlink to it renamed over `..data`.
fn publish(dir: &Path, generation: u32, files: &[(&str, String)]) {
    let data = dir.join(format!("..gen_{generation}"));
    std::fs::create_dir_all(&data).unwrap();
    for (name, text) in files {
        std::fs::write(data.join(name), text).unwrap();
        let link = dir.join(name);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(Path::new("..data").join(name), &link).unwrap();
        }
    }
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(format!("..gen_{generation}"), &tmp).unwrap();
    std::fs::rename(&tmp, dir.join("..data")).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_symlink_swap_and_sighup_reload() {
    let world = World::new();
    let (a1, a2) = (
        App::start(Behaviour::Ok("one")).await,
        App::start(Behaviour::Ok("two")).await,
    );
    let (p1, p2, caller_ports) = (Ports::new(), Ports::new(), Ports::new());
    let services = format!(
        "{}---\n{}---\n{}",
        service_entry("order-service", 80, &[(p1.inbound, "v1", "order-service")]),
        service_entry("order-one", 80, &[(p1.inbound, "v1", "order-service")]),
        service_entry("order-two", 80, &[(p2.inbound, "v1", "order-service")]),
    );
    let dir = world.path("configmap");
    publish(
        &dir,
        1,
        &[
            ("services.yaml", services.clone()),
            ("routes.yaml", route_to("order-one")),
        ],
    );
    let mut replicas = Vec::new();
    for (name, ports, app) in [("one", p1, a1.addr), ("two", p2, a2.addr)] {
        let s = sidecar_settings(
            &world,
            "order-service",
            &labels(&[("app", "order-service")]),
            &dir,
            ports,
            app,
            "",
        );
        replicas.push(Proxy::start(&world, "sidecar", name, &s, ports).await);
    }
    let s = sidecar_settings(
        &world,
        "api-service",
        &labels(&[("app", "api-service")]),
        &dir,
        caller_ports,
        "127.0.0.1:9".parse().unwrap(),
        "",
    );
    let caller = Proxy::start(&world, "sidecar", "api-service", &s, caller_ports).await;
    let client = Client::new(caller.outbound());
    assert_eq!(
        client
            .request("GET", "order-service", "/", &[])
            .await
            .unwrap(),
        (200, "one".into())
    );

    publish(
        &dir,
        2,
        &[
            ("services.yaml", services),
            ("routes.yaml", route_to("order-two")),
        ],
    );
    let mut switched = false;
    for _ in 0..200 {
        if client
            .request("GET", "order-service", "/", &[])
            .await
            .unwrap()
            == (200, "two".into())
        {
            switched = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    assert!(
        switched,
        "the symlink swap was not picked up:\n{}",
        caller.output()
    );

    // SIGHUP reloads (and does not kill the process, which is its default action).
    let pid = caller.child.id().unwrap().to_string();
    assert!(
        std::process::Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    let mut logged = false;
    for _ in 0..200 {
        if caller.output().contains("SIGHUP: reloading configuration") {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(logged, "{}", caller.output());
    assert_eq!(
        client
            .request("GET", "order-service", "/", &[])
            .await
            .unwrap(),
        (200, "two".into())
    );
}

fn metric(text: &str, name: &str) -> Option<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ').map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_generation_moves_on_applied_reloads_and_stays_on_rejected_ones() {
    let world = World::new();
    let app = App::start(Behaviour::Ok("one")).await;
    let ports = Ports::new();
    let services = service_entry("order-one", 80, &[(ports.inbound, "v1", "order-service")]);
    let dir = world.write_config("istio", "services.yaml", &services);
    world.write_config("istio", "routes.yaml", &route_to("order-one"));
    let proxy = start_sidecar(&world, "order-service", &dir, ports, app.addr).await;
    let generation = |text: &str| metric(text, "mesh_config_generation");
    let text = proxy.admin("/metrics").await;
    assert_eq!(generation(&text).as_deref(), Some("1"), "{text}");

    // An applied reload moves the generation on.
    world.write_config("istio", "routes.yaml", &route_to("order-two"));
    let text = proxy
        .metrics_when(|t| generation(t).as_deref() == Some("2"))
        .await;
    assert_eq!(
        generation(&text).as_deref(),
        Some("2"),
        "{}",
        proxy.output()
    );
    assert_eq!(
        metric(&text, "mesh_config_reloads_total").as_deref(),
        Some("1")
    );

    // A rejected reload leaves it where it was.
    world.write_config(
        "istio",
        "routes.yaml",
        &route_to("order-two").replace("http:", "http: 5"),
    );
    let text = proxy
        .metrics_when(|t| metric(t, "mesh_config_reload_failures_total").as_deref() == Some("1"))
        .await;
    assert_eq!(
        metric(&text, "mesh_config_reload_failures_total").as_deref(),
        Some("1"),
        "{}",
        proxy.output()
    );
    assert_eq!(generation(&text).as_deref(), Some("2"));

    // The next good one is generation 3.
    world.write_config("istio", "routes.yaml", &route_to("order-one"));
    let text = proxy
        .metrics_when(|t| generation(t).as_deref() == Some("3"))
        .await;
    assert_eq!(
        generation(&text).as_deref(),
        Some("3"),
        "{}",
        proxy.output()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deny_rule_for_a_port_the_app_does_not_serve_is_warned_and_the_served_port_enforced() {
    let world = World::new();
    let app = App::start(Behaviour::Ok("one")).await;
    let ports = Ports::new();
    let policy = format!(
        "apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {{name: no-admin, namespace: production}}
spec:
  selector:
    matchLabels: {{app: order-service}}
  action: DENY
  rules:
  - to:
    - operation:
        ports: [\"{served}\", \"9\"]
        paths: [/admin]
",
        served = app.addr.port()
    );
    let dir = world.write_config("istio", "policy.yaml", &policy);
    let proxy = start_sidecar(&world, "order-service", &dir, ports, app.addr).await;
    let log = proxy.output();
    let warned: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("DENY for port"))
        .collect();
    assert_eq!(warned.len(), 1, "{log}");
    assert!(
        warned[0].contains(&format!(
            "policy.yaml:11:{}: warning: document 1, AuthorizationPolicy/production/no-admin, \
             spec.rules[0].to[0].operation.ports[1]: DENY for port 9, which this workload does \
             not serve (it serves {})",
            // `        ports: ["<served>", "9"]`: the second value's column.
            21 + app.addr.port().to_string().len(),
            app.addr.port()
        )),
        "{log}"
    );
    // The rule for the served port is enforced: ports are the application's, as Istio's
    // `destination.port` is the original destination port, not the sidecar's listener.
    let inbound = std::net::SocketAddr::from(([127, 0, 0, 1], proxy.ports.inbound));
    assert_eq!(
        send(inbound, "GET", "order-service", "/admin", &[])
            .await
            .map(|(status, _)| status),
        Ok(403)
    );
    assert_eq!(
        send(inbound, "GET", "order-service", "/", &[]).await,
        Ok((200, "one".to_owned()))
    );
}
