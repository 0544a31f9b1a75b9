//! mesh-routing: route selection, weighted picks, table compilation and router dispatch.

use std::fmt::Write as _;
use std::hint::black_box;
use std::sync::Arc;

use criterion::{BatchSize, Criterion, criterion_group, criterion_main};
use http::{Request, Response};
use mesh_core::body::{self, BoxBody};
use mesh_core::config::{LoadOptions, MeshConfig};
use mesh_core::error::BoxError;
use mesh_routing::{CompileOptions, RequestView, RouterHandle, Routing, Target, Weighted, compile};
use rand::SeedableRng;
use rand::rngs::SmallRng;
use tower::{Service, ServiceExt};

/// `hosts` VirtualServices with `routes` routes each; every route has a uri prefix and a
/// header condition, the last one is a weighted catch-all.
fn virtual_services(hosts: usize, routes: usize) -> String {
    let mut y = String::new();
    for h in 0..hosts {
        let _ = write!(
            y,
            "---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: svc{h}, namespace: bench}}\nspec:\n  hosts: [svc{h}]\n  http:\n"
        );
        for r in 0..routes - 1 {
            let _ = write!(
                y,
                "  - name: r{r}\n    match:\n    - uri: {{prefix: /api/v{r}/}}\n      headers: {{x-tenant: {{exact: t{r}}}}}\n    - uri: {{regex: '/items/{r}/[0-9]+'}}\n    route: [{{destination: {{host: svc{h}, subset: v1}}}}]\n"
            );
        }
        let _ = write!(
            y,
            "  - name: default\n    route:\n    - {{destination: {{host: svc{h}, subset: v1}}, weight: 95}}\n    - {{destination: {{host: svc{h}, subset: v2}}, weight: 5}}\n"
        );
    }
    y
}

fn load(yaml: &str) -> MeshConfig {
    MeshConfig::from_yaml_str("bench.yaml", yaml, &LoadOptions::default())
        .map(|(c, _)| c)
        .expect("valid bench config")
}

fn options() -> CompileOptions {
    let mut o = CompileOptions::default();
    o.naming.namespace = "bench".into();
    o
}

fn selection(c: &mut Criterion) {
    let cfg = load(&virtual_services(10, 10));
    let table = compile::route_table(&cfg, &options()).expect("compiles");
    // Worst case: last host, every route's blocks evaluated, catch-all wins.
    let last = Request::get("http://svc9:8080/api/v42/orders?x=1")
        .header("x-tenant", "t42")
        .header("user-agent", "bench")
        .body(())
        .expect("request");
    c.bench_function("routing/select/100_routes_10_hosts/catch_all", |b| {
        b.iter(|| {
            let view = RequestView::from_request(black_box(&last), None);
            table.select(&view).map(|s| s.route.name.is_some())
        })
    });
    let middle = Request::get("http://svc4.bench.svc.cluster.local/api/v5/orders")
        .header("x-tenant", "t5")
        .body(())
        .expect("request");
    c.bench_function("routing/select/100_routes_10_hosts/header_route", |b| {
        b.iter(|| {
            let view = RequestView::from_request(black_box(&middle), None);
            table.select(&view).map(|s| s.route.name.is_some())
        })
    });
}

fn weighted(c: &mut Criterion) {
    let canary = Weighted::new(vec![("v1", 95), ("v2", 5)]).expect("weights");
    let mut rng = SmallRng::seed_from_u64(1);
    c.bench_function("routing/weighted_pick/2", |b| {
        b.iter(|| *black_box(&canary).pick(&mut rng))
    });
    let ten = Weighted::new((0..10u32).map(|i| (i, i + 1)).collect()).expect("weights");
    c.bench_function("routing/weighted_pick/10", |b| {
        b.iter(|| *black_box(&ten).pick(&mut rng))
    });
}

fn compilation(c: &mut Criterion) {
    let cfg = load(&virtual_services(1_000, 3));
    assert_eq!(cfg.virtual_services().len(), 1_000);
    let mut g = c.benchmark_group("routing/compile");
    g.sample_size(20);
    g.bench_function("1000_virtual_services", |b| {
        b.iter(|| Routing::compile(black_box(&cfg), &options()).expect("compiles"))
    });
    g.finish();
}

fn dispatch(c: &mut Criterion) {
    let cfg = load(&format!(
        "{}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: svc9, namespace: bench}}\nspec:\n  hosts: [svc9.bench.svc.cluster.local]\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  endpoints: [{{address: 10.0.0.1, labels: {{version: v1}}}}, {{address: 10.0.0.2, labels: {{version: v2}}}}]\n---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: svc9, namespace: bench}}\nspec:\n  host: svc9\n  subsets: [{{name: v1, labels: {{version: v1}}}}, {{name: v2, labels: {{version: v2}}}}]\n",
        virtual_services(10, 10)
    ));
    let routing = Routing::compile(&cfg, &options()).expect("compiles");
    let make = |_t: &Arc<Target>| {
        tower::service_fn(|_req: Request<BoxBody>| async {
            Ok::<_, BoxError>(Response::new(body::empty()))
        })
    };
    let handle = RouterHandle::with_seed(make, routing, 7);
    let mut router = handle.router();
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("runtime");
    c.bench_function("routing/router_call/weighted_catch_all", |b| {
        b.iter_batched(
            || {
                Request::get("http://svc9:8080/api/v42/orders")
                    .body(body::empty())
                    .expect("request")
            },
            |req| {
                rt.block_on(async {
                    router
                        .ready()
                        .await
                        .expect("ready")
                        .call(req)
                        .await
                        .expect("routed")
                })
            },
            BatchSize::SmallInput,
        )
    });
}

criterion_group!(benches, selection, weighted, compilation, dispatch);
criterion_main!(benches);
