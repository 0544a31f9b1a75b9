//! Resources serialize back to Istio YAML (for configuration dumps) that loads into the
//! same resources: the serde names are the same in both directions.

use std::path::Path;

use mesh_core::config::{LoadOptions, load_paths, load_str};

#[test]
fn every_fixture_resource_survives_serialize_then_load() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let options = LoadOptions::default();
    let mut checked = 0;
    for dir in ["istio-samples", "article", "all-fields"] {
        let report = load_paths(&[fixtures.join(dir)], &options);
        assert!(!report.has_errors(), "{dir}");
        for original in &report.resources {
            let yaml = serde_saphyr::to_string(original).expect("serializes");
            let again = load_str("dump.yaml", &yaml, &options);
            let errors: Vec<String> = again.errors().map(ToString::to_string).collect();
            assert!(
                errors.is_empty(),
                "{}:\n{yaml}\n{errors:#?}",
                original.display_name()
            );
            let mut reloaded = again.resources[0].clone();
            *reloaded.origin_mut() = original.origin().clone();
            assert_eq!(&reloaded, original, "{}:\n{yaml}", original.display_name());
            checked += 1;
        }
    }
    assert_eq!(checked, 34 + 8 + 21);
}

#[test]
fn a_dump_leaves_out_unset_fields() {
    let yaml = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: reviews, namespace: prod}
spec:
  hosts: [reviews]
  http:
  - match:
    - headers: {end-user: {exact: jason}, x-debug: {}}
    route:
    - destination: {host: reviews, subset: v2}
    timeout: 1m30s
";
    let report = load_str("vs.yaml", yaml, &LoadOptions::default());
    let dump = serde_saphyr::to_string(&report.resources[0]).unwrap();
    assert_eq!(
        dump,
        "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata:
  name: reviews
  namespace: prod
spec:
  hosts:
  - reviews
  http:
  - match:
    - headers:
        end-user:
          exact: jason
        x-debug: {}
    route:
    - destination:
        host: reviews
        subset: v2
    timeout: 1m30s
"
    );
}

#[test]
fn a_whole_configuration_dumps_to_yaml_that_loads_into_the_same_snapshot() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let options = LoadOptions::default();
    let (config, _) =
        mesh_core::config::MeshConfig::load(&[fixtures.join("all-fields")], &options).unwrap();
    let dump = config.to_yaml().unwrap();
    let (again, _) =
        mesh_core::config::MeshConfig::from_yaml_str("dump.yaml", &dump, &options).unwrap();
    assert_eq!(
        again.virtual_services()[0].spec,
        config.virtual_services()[0].spec
    );
    assert_eq!(
        again.destination_rules()[0].spec,
        config.destination_rules()[0].spec
    );
    assert_eq!(again.service_entries().len(), 3);
    assert_eq!(again.authorization_policies().len(), 3);
    assert_eq!(again.to_yaml().unwrap(), dump, "dumping is stable");
}
