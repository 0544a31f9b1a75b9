//! A plain-HTTP ingress gateway in front of one backend.

use std::net::SocketAddr;

use super::{Ports, Proxy, World, free_port};

/// A plain-HTTP gateway `edge` (labels `istio: ingress` and the Gateway API name label
/// `edge`) routing `api.example.com` to `backend` (the route's other fields in `route`,
/// indented by four spaces), with more resources in `policy` and `extra` settings; the
/// gateway and the address of its HTTP port.
pub async fn plain_gateway(
    world: &World,
    backend: SocketAddr,
    route: &str,
    policy: &str,
    extra: &str,
) -> (Proxy, SocketAddr) {
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: backend, namespace: production}}
spec:
  hosts: [backend]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 8080, name: http, protocol: HTTP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{http: {port}}}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: production}}
spec:
  selector: {{istio: ingress}}
  servers:
  - port: {{number: 80, name: http, protocol: HTTP}}
    hosts: [api.example.com]
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: api, namespace: production}}
spec:
  hosts: [api.example.com]
  gateways: [edge]
  http:
  - route:
    - destination: {{host: backend, port: {{number: 8080}}}}
{route}---
{policy}",
        port = backend.port()
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let ports = Ports::new();
    let http = free_port();
    let settings = format!(
        "workload: {{namespace: production, serviceAccount: istio-ingressgateway, \
         labels: {{istio: ingress, gateway.networking.k8s.io/gateway-name: edge}}}}\n\
         configDir: {config}\nsvid: {{caDir: {ca}}}\n\
         listeners: {{admin: 127.0.0.1:{admin}}}\n\
         gateway:\n  name: edge\n  ports:\n    80: 127.0.0.1:{http}\n{extra}",
        config = config.display(),
        ca = world.ca_dir.display(),
        admin = ports.admin,
    );
    let gw = Proxy::start(world, "gateway", "gateway", &settings, ports).await;
    (gw, SocketAddr::from(([127, 0, 0, 1], http)))
}
