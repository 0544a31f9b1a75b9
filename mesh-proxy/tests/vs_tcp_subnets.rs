//! VirtualService `tcp[].match[].destinationSubnets` and `sourceSubnet` through the real
//! binary: one sidecar with TCP listeners for the same service port on two loopback
//! addresses; the address a client connected to (the listener's address, there being no
//! capture) and the client's own address choose the destination.

// Test code: helpers outside #[test] functions unwrap too.
#![allow(clippy::unwrap_used)]

mod support;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use support::*;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::net::{TcpListener, TcpSocket};

/// A server that greets each connection with `HELLO <name>` and closes.
async fn greeter(name: &'static str) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt;
                let _ = stream.write_all(format!("HELLO {name}\n").as_bytes()).await;
            });
        }
    });
    addr
}

/// Connects from `from` to `to` and reads the greeting.
async fn greeting(from: Ipv4Addr, to: SocketAddr) -> String {
    let socket = TcpSocket::new_v4().unwrap();
    socket.bind(SocketAddr::from((from, 0))).unwrap();
    let stream = socket.connect(to).await.unwrap();
    let mut lines = BufReader::new(stream).lines();
    lines.next_line().await.unwrap().unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_routes_choose_by_destination_and_source_subnet() {
    let world = World::new();
    let (a, b, c) = (
        greeter("default").await,
        greeter("by-destination").await,
        greeter("by-source").await,
    );
    let yaml = format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: db, namespace: production}}
spec:
  hosts: [db]
  location: MESH_INTERNAL
  resolution: STATIC
  ports:
  - {{number: 5432, name: tcp-db, protocol: TCP}}
  endpoints:
  - {{address: 127.0.0.1, ports: {{tcp-db: {a}}}, labels: {{pool: default}}}}
  - {{address: 127.0.0.1, ports: {{tcp-db: {b}}}, labels: {{pool: destination}}}}
  - {{address: 127.0.0.1, ports: {{tcp-db: {c}}}, labels: {{pool: source}}}}
---
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {{name: db, namespace: production}}
spec:
  host: db
  subsets:
  - {{name: default, labels: {{pool: default}}}}
  - {{name: destination, labels: {{pool: destination}}}}
  - {{name: source, labels: {{pool: source}}}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: db, namespace: production}}
spec:
  hosts: [db]
  tcp:
  - match: [{{port: 5432, destinationSubnets: [127.0.0.2/32]}}]
    route: [{{destination: {{host: db, subset: destination}}}}]
  - match: [{{sourceSubnet: 127.0.0.3}}]
    route: [{{destination: {{host: db, subset: source}}}}]
  - route: [{{destination: {{host: db, subset: default}}}}]
",
        a = a.port(),
        b = b.port(),
        c = c.port(),
    );
    let config = world.write_config("istio", "mesh.yaml", &yaml);
    let (p1, p2) = (free_port(), free_port());
    let ports = Ports::new();
    let nowhere = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let settings = format!(
        "workload:\n  namespace: production\n  serviceAccount: client\n  labels: {{app: client}}\n\
         configDir: {config}\nsvid:\n  caDir: {ca}\n\
         listeners:\n  inbound: 127.0.0.1:{i}\n  outbound: 127.0.0.1:{o}\n  admin: 127.0.0.1:{adm}\n  app: {nowhere}\n\
         \x20 tcp:\n    127.0.0.1:{p1}: db:5432\n    127.0.0.2:{p2}: db:5432\n",
        config = config.display(),
        ca = world.ca_dir.display(),
        i = ports.inbound,
        o = ports.outbound,
        adm = ports.admin,
    );
    let _proxy = Proxy::start(&world, "sidecar", "client", &settings, ports).await;
    let local = |last: u8| Ipv4Addr::new(127, 0, 0, last);
    let to = |ip: Ipv4Addr, port: u16| SocketAddr::new(IpAddr::V4(ip), port);
    assert_eq!(greeting(local(1), to(local(1), p1)).await, "HELLO default");
    assert_eq!(
        greeting(local(1), to(local(2), p2)).await,
        "HELLO by-destination"
    );
    assert_eq!(
        greeting(local(3), to(local(1), p1)).await,
        "HELLO by-source"
    );
    // The destination rule comes first.
    assert_eq!(
        greeting(local(3), to(local(2), p2)).await,
        "HELLO by-destination"
    );
}
