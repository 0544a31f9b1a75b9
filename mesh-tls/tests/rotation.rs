//! Certificate rotation: under load, on the built-in issuer's schedule, from a watched
//! directory (Kubernetes Secret layout), and trust-bundle rotation with overlap.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashSet;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use mesh_core::Identity;
use mesh_tls::{
    BuiltInIssuer, CertStore, CertificateAuthority, ClientTls, IssuedSvid, PeerAuthMode,
    SecureNaming, Serial, StoreEvent,
};
use support::*;
use tokio::sync::{broadcast, mpsc};

const WAIT: Duration = Duration::from_secs(10);

async fn next_rotation(events: &mut broadcast::Receiver<StoreEvent>) -> Serial {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Ok(StoreEvent::Rotated { serial })) => return serial,
            Ok(Ok(_)) => continue,
            other => panic!("no rotation: {other:?}"),
        }
    }
}

async fn next_rejection(events: &mut broadcast::Receiver<StoreEvent>) -> String {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Ok(StoreEvent::Rejected { reason })) => return reason,
            Ok(Ok(_)) => continue,
            other => panic!("no rejection: {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn svid_rotates_three_times_under_load_without_a_failed_request() {
    let ca = Arc::new(CertificateAuthority::new(TD).unwrap());
    let issuer =
        BuiltInIssuer::new(ca.clone(), "prod", "payment").with_ttl(Duration::from_secs(600));
    let server_store = CertStore::from_issuer(&issuer).unwrap();
    let mut events = server_store.subscribe();
    let _source = server_store.spawn_issuer(issuer);
    let server = start_server(server_store.clone(), PeerAuthMode::Strict).await;
    let addr = server.addr;
    let client = ClientTls::new(store(&ca, "prod", "orders"));
    let expected = SecureNaming::only(Identity::from_istio(TD, "prod", "payment").unwrap());

    let first_serial = server_store.serial();
    let stop = Arc::new(AtomicBool::new(false));
    let failed = Arc::new(AtomicU64::new(0));
    let (ok_tx, mut ok_rx) = mpsc::unbounded_channel::<()>();

    // Two long-lived HTTP/2 connections, each hammered by its own task.
    let mut old_conns = Vec::new();
    for _ in 0..2 {
        let mut conn = connect(&client, addr, &expected).await.unwrap();
        assert_eq!(conn.server.serial, first_serial);
        let (stop, failed, ok_tx) = (stop.clone(), failed.clone(), ok_tx.clone());
        old_conns.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                match conn.get().await {
                    Ok(body) if body.contains("sa/orders;security=mutual_tls") => {
                        let _ = ok_tx.send(());
                    }
                    _ => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            conn
        }));
    }
    // And a task that keeps opening new connections.
    let churn = {
        let (stop, failed, ok_tx, client, expected) = (
            stop.clone(),
            failed.clone(),
            ok_tx.clone(),
            client.clone(),
            expected.clone(),
        );
        tokio::spawn(async move {
            let mut seen = HashSet::new();
            while !stop.load(Ordering::Relaxed) {
                match connect(&client, addr, &expected).await {
                    Ok(mut conn) => {
                        seen.insert(conn.server.serial.clone());
                        match conn.get().await {
                            Ok(_) => {
                                let _ = ok_tx.send(());
                            }
                            Err(_) => {
                                failed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                    Err(_) => {
                        failed.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
            seen
        })
    };

    let mut serials = vec![first_serial.clone()];
    for _ in 0..3 {
        // Let traffic flow, then rotate in the middle of it.
        for _ in 0..20 {
            ok_rx.recv().await.unwrap();
        }
        server_store.rotate_now();
        let serial = next_rotation(&mut events).await;
        assert!(!serials.contains(&serial), "rotation reused a serial");
        serials.push(serial.clone());
        // A new connection sees the new certificate.
        let mut fresh = connect(&client, addr, &expected).await.unwrap();
        assert_eq!(fresh.server.serial, serial);
        assert!(fresh.get().await.is_ok());
    }
    for _ in 0..20 {
        ok_rx.recv().await.unwrap();
    }
    stop.store(true, Ordering::Relaxed);

    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "requests failed during rotation"
    );
    // Old connections stayed up on the first certificate and still answer.
    for handle in old_conns {
        let mut conn = handle.await.unwrap();
        assert_eq!(conn.server.serial, first_serial);
        assert!(conn.get().await.is_ok());
    }
    let seen = churn.await.unwrap();
    assert!(seen.len() >= 2, "new connections saw only {seen:?}");
    assert!(seen.iter().all(|s| serials.contains(s)));
}

#[tokio::test(start_paused = true)]
async fn issuer_rotates_at_half_life_within_one_percent_jitter() {
    let ca = Arc::new(CertificateAuthority::new(TD).unwrap());
    let ttl = Duration::from_secs(24 * 3600);
    let issuer = BuiltInIssuer::new(ca, "prod", "payment").with_seed(42);
    assert_eq!(issuer.ttl(), ttl, "Istio's default lifetime");
    let store = CertStore::from_issuer(&issuer).unwrap();
    let mut events = store.subscribe();
    let _source = store.spawn_issuer(issuer);
    let mut serial = store.serial();

    for round in 0..3 {
        // Just before the earliest allowed moment (49 % of the lifetime): nothing.
        tokio::time::advance(ttl.mul_f64(0.49) - Duration::from_secs(1)).await;
        settle().await;
        assert!(
            matches!(
                events.try_recv(),
                Err(broadcast::error::TryRecvError::Empty)
            ),
            "rotated too early in round {round}"
        );
        // By the latest allowed moment (51 %): rotated, new serial.
        tokio::time::advance(ttl.mul_f64(0.02) + Duration::from_secs(2)).await;
        settle().await;
        let StoreEvent::Rotated { serial: new } = events.try_recv().expect("rotated by 51 %")
        else {
            panic!("unexpected event")
        };
        assert_ne!(new, serial);
        assert_eq!(store.serial(), new);
        serial = new;
        // The next period counts from this rotation; drain to that point.
        settle().await;
    }
}

/// Lets spawned tasks run on the paused single-threaded runtime without moving time.
async fn settle() {
    for _ in 0..50 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn rotate_now_replaces_key_and_certificate_immediately() {
    let ca = Arc::new(CertificateAuthority::new(TD).unwrap());
    let issuer = BuiltInIssuer::new(ca, "prod", "payment");
    let store = CertStore::from_issuer(&issuer).unwrap();
    let before = store.current();
    let mut events = store.subscribe();
    let _source = store.spawn_issuer(issuer);
    store.rotate_now();
    settle().await;
    assert!(matches!(events.try_recv(), Ok(StoreEvent::Rotated { .. })));
    let after = store.current();
    assert_ne!(after.leaf.serial, before.leaf.serial);
    assert_ne!(
        after.certified_key.key.public_key().unwrap().as_ref(),
        before.certified_key.key.public_key().unwrap().as_ref(),
        "a compromised key must not survive rotation"
    );
    assert_eq!(after.leaf.identity, before.leaf.identity);
}

/// Lays out `dir` like a Kubernetes Secret volume: `..<ts>/` holds the files,
/// `..data -> ..<ts>`, and each file name is a symlink into `..data/`.
fn kube_secret_init(dir: &Path, svid: &IssuedSvid, ts: &str) {
    svid.write_dir(&dir.join(ts)).unwrap();
    std::os::unix::fs::symlink(ts, dir.join("..data")).unwrap();
    for name in ["cert-chain.pem", "key.pem", "root-cert.pem"] {
        std::os::unix::fs::symlink(format!("..data/{name}"), dir.join(name)).unwrap();
    }
}

/// kubelet's AtomicWriter update: new timestamped directory, `..data_tmp` symlink,
/// rename over `..data`, remove the old directory.
fn kube_secret_update(dir: &Path, svid: &IssuedSvid, old_ts: &str, ts: &str) {
    svid.write_dir(&dir.join(ts)).unwrap();
    std::os::unix::fs::symlink(ts, dir.join("..data_tmp")).unwrap();
    std::fs::rename(dir.join("..data_tmp"), dir.join("..data")).unwrap();
    std::fs::remove_dir_all(dir.join(old_ts)).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watched_directory_follows_kubernetes_atomic_symlink_swaps() {
    let ca = CertificateAuthority::new(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let first = ca.issue("prod", "payment").unwrap();
    kube_secret_init(dir.path(), &first, "..2026_01");
    let store = CertStore::load_dir(dir.path()).unwrap();
    assert_eq!(store.serial(), *first.serial());
    let mut events = store.subscribe();
    let _watch = store.watch_dir(dir.path()).unwrap();

    // Twice: watching the files instead of the directory loses the second update.
    let mut old = "..2026_01".to_owned();
    for round in 2..=3 {
        let next = ca.issue("prod", "payment").unwrap();
        let ts = format!("..2026_0{round}");
        kube_secret_update(dir.path(), &next, &old, &ts);
        let mut serial = next_rotation(&mut events).await;
        // The debounce may also catch an intermediate state; wait for the final one.
        while serial != *next.serial() {
            serial = next_rotation(&mut events).await;
        }
        assert_eq!(store.serial(), *next.serial());
        old = ts;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_pair_in_watched_directory_is_refused_and_old_certificate_served() {
    let ca = CertificateAuthority::new(TD).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let good = ca.issue("prod", "payment").unwrap();
    good.write_dir(dir.path()).unwrap();
    let store = CertStore::load_dir(dir.path()).unwrap();
    let mut events = store.subscribe();
    let _watch = store.watch_dir(dir.path()).unwrap();
    let server = start_server(store.clone(), PeerAuthMode::Strict).await;

    // Someone writes another workload's key next to our certificate.
    let other = ca.issue("prod", "other").unwrap();
    let tmp = dir.path().join(".key.tmp");
    std::fs::write(&tmp, other.key_pem()).unwrap();
    std::fs::rename(&tmp, dir.path().join("key.pem")).unwrap();
    let reason = next_rejection(&mut events).await;
    assert!(reason.contains("does not match"), "{reason}");
    assert_eq!(store.serial(), *good.serial());

    // New handshakes still get the old, good certificate.
    let client = ClientTls::new(support::store(&ca, "prod", "orders"));
    let mut conn = connect(&client, server.addr, &SecureNaming::AnyTrusted)
        .await
        .unwrap();
    assert_eq!(conn.server.serial, *good.serial());
    assert!(conn.get().await.is_ok());

    // A good pair afterwards is picked up.
    let fixed = ca.issue("prod", "payment").unwrap();
    fixed.write_dir(dir.path()).unwrap();
    let mut serial = next_rotation(&mut events).await;
    while serial != *fixed.serial() {
        serial = next_rotation(&mut events).await;
    }
}

#[tokio::test]
async fn trust_bundle_rotation_trusts_old_and_new_roots_during_overlap() {
    let old_ca = CertificateAuthority::new(TD).unwrap();
    let new_ca = CertificateAuthority::new(TD).unwrap();
    let both = vec![old_ca.root_der().clone(), new_ca.root_der().clone()];
    let server_store = support::store(&old_ca, "prod", "payment");
    let server = start_server(server_store.clone(), PeerAuthMode::Strict).await;
    // Clients of either CA trust both roots (they got the overlap bundle already).
    let client_of = |ca: &CertificateAuthority| {
        let mut files = ca.issue("prod", "orders").unwrap().files();
        files.roots = both.clone();
        ClientTls::new(CertStore::new(files).unwrap())
    };
    let (old_client, new_client) = (client_of(&old_ca), client_of(&new_ca));
    let works = |client: ClientTls| async move {
        match connect(&client, server.addr, &SecureNaming::AnyTrusted).await {
            Ok(mut conn) => conn.get().await.is_ok(),
            Err(_) => false,
        }
    };

    assert!(works(old_client.clone()).await);
    assert!(!works(new_client.clone()).await, "new CA not trusted yet");

    // Overlap: the server's root-cert.pem now holds both roots and its SVID comes from
    // the new CA.
    let mut files = new_ca.issue("prod", "payment").unwrap().files();
    files.roots = both.clone();
    server_store.install(files).unwrap();
    assert_eq!(server_store.trust_bundle().roots().len(), 2);
    assert!(works(old_client.clone()).await);
    assert!(works(new_client.clone()).await);

    // The old root is retired.
    server_store
        .set_trust_roots(vec![new_ca.root_der().clone()])
        .unwrap();
    assert!(!works(old_client).await);
    assert!(works(new_client).await);
}
