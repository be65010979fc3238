//! The node store's start-up: `Store::open` of a store holding N secrets (DESIGN.md "Targets":
//! an agent with 10,000 secrets serves reads within 50 ms of start). No cluster: the store is
//! filled through the real `Store` API (as an agent on deliveries fills it: each entry mirrors
//! a Kubernetes object), then opened again and again, as a restarted agent opens it.
//!
//!     cargo bench --bench store
//!     BENCH_STORE_DIR=/tmp/store-10k cargo bench --bench store   # keep (and reuse) the store
//!
//! Each open is timed whole (the store is dropped between opens; the files stay in the page
//! cache, as they are on a restart of a running node). Prints median, min and max, twice:
//! without a store image (`store.image` removed before each open: every entry file read and
//! every manifest line checked) and with one (taken once, as the store's own writer takes it
//! when the store has been quiet; the store opened from it, as after a restart).
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it fills 20 secrets, opens the
//! store twice and checks what it holds: a smoke test, asserting nothing about time.
//!
//! Environment: BENCH_SECRETS (default 10000), BENCH_OPENS (default 30), BENCH_STORE_DIR (a
//! directory to fill once and reuse; default a temporary one), BENCH_IMAGE (`with` or
//! `without`: only that one; default both), BENCH_STORE_FROM_AGENT=1 (BENCH_STORE_DIR is a
//! copy of an agent's data directory, its `node.key` copied to `bench.keyring`, and
//! BENCH_SECRETS the number of secrets it holds: a store as a cluster filled it).

use std::path::Path;
use std::time::{Duration, Instant};

use claw_secrets::crypto::{Keyring, SecretIdentity, SharedKeyring, seal};
use claw_secrets::domain::{Kind, Name, Namespace, ObjectKey, SecretData, Version};
use claw_secrets::store::{Expect, OpenOptions, Origin, SecretRecord, Store};

#[path = "support/env.rs"]
mod env;
use env::env_usize;

fn name(i: usize) -> Name {
    Name::parse(&format!("burst-{i:05}")).expect("name")
}

fn record(keyring: &Keyring, namespace: &Namespace, i: usize) -> SecretRecord {
    let key = ObjectKey::new(namespace.clone(), name(i));
    let version = Version::new(1).expect("version");
    let data: SecretData =
        serde_json::from_value(serde_json::json!({ "token": format!("{:032x}", i * 7919) }))
            .expect("data");
    let identity = SecretIdentity {
        kind: Kind::Secret,
        namespace: &key.namespace,
        name: &key.name,
        version,
    };
    let now = jiff::Timestamp::now();
    SecretRecord {
        envelope: seal(keyring, &identity, &data).expect("seal"),
        key,
        version,
        created_at: now,
        updated_at: now,
        allowed_workloads: serde_json::from_value(serde_json::json!(["app"])).expect("workloads"),
        origin: Some(Origin::of(
            &format!("0b7d3c2e-5f1a-4c8e-9d2b-{i:012}"),
            Some(&(100_000 + i).to_string()),
        )),
        writes: Vec::new(),
        generation: 0,
    }
}

fn open(dir: &Path, keyring: &Keyring) -> Store {
    Store::open(
        dir,
        SharedKeyring::new(keyring.clone()),
        OpenOptions::default(),
    )
    .expect("the store opens")
    .0
}

fn fill(dir: &Path, n: usize) -> Keyring {
    let keyring = Keyring::generate().expect("keyring");
    std::fs::create_dir_all(dir).expect("store dir");
    let store = open(dir, &keyring);
    let namespace = Namespace::parse("bench").expect("namespace");
    let t = Instant::now();
    for i in 0..n {
        store
            .put_secret(record(&keyring, &namespace, i), Expect::Absent)
            .expect("put");
    }
    eprintln!(
        "filled {} with {n} secrets in {:.1} s",
        dir.display(),
        t.elapsed().as_secs_f64()
    );
    std::fs::write(dir.join("bench.keyring"), keyring.to_json().as_slice()).expect("keyring");
    keyring
}

fn main() {
    let bench = std::env::args().any(|a| a == "--bench");
    let n = if bench {
        env_usize("BENCH_SECRETS", 10_000)
    } else {
        20
    };
    let opens = if bench {
        env_usize("BENCH_OPENS", 30).max(1)
    } else {
        2
    };
    let temp = tempfile::tempdir().expect("tempdir");
    let dir = match std::env::var("BENCH_STORE_DIR") {
        Ok(d) if bench => std::path::PathBuf::from(d),
        _ => temp.path().to_owned(),
    };
    let keyring = match std::fs::read(dir.join("bench.keyring")) {
        Ok(json) => Keyring::from_json(&json).expect("the bench keyring"),
        Err(_) => fill(&dir, n),
    };
    // BENCH_IMAGE=with or =without measures only that (to profile one path).
    let only = std::env::var("BENCH_IMAGE").ok().filter(|_| bench);
    let image = dir.join("store.image");
    let _ = std::fs::remove_file(&image);
    let without = match only.as_deref() {
        Some("with") => Vec::new(),
        _ => measure(&dir, &keyring, n, opens, || {
            let _ = std::fs::remove_file(&image);
        }),
    };
    {
        let store = open(&dir, &keyring);
        // The files must have settled (a file changed within the last 200 ms is left out).
        std::thread::sleep(Duration::from_millis(250));
        let imaged = store.write_image().expect("image").expect("written");
        assert_eq!(imaged, n, "every entry is in the image");
    }
    let with = match only.as_deref() {
        Some("without") => Vec::new(),
        _ => measure(&dir, &keyring, n, opens, || {}),
    };
    if !bench {
        println!("store: {n} secrets put, opened {opens} times without and with an image");
        return;
    }
    for (what, samples) in [("without an image", without), ("with an image", with)] {
        if !samples.is_empty() {
            report(n, opens, what, samples);
        }
    }
}

/// Opens the store `opens` times (`before` runs before each, untimed).
fn measure(
    dir: &Path,
    keyring: &Keyring,
    n: usize,
    opens: usize,
    before: impl Fn(),
) -> Vec<Duration> {
    let mut samples: Vec<Duration> = Vec::new();
    for _ in 0..opens {
        before();
        let t = Instant::now();
        let store = open(dir, keyring);
        samples.push(t.elapsed());
        let counts = store.counts();
        if foreign_store() {
            assert_eq!(counts.secrets, n, "the store holds BENCH_SECRETS secrets");
            continue;
        }
        assert_eq!(
            (counts.secrets, counts.refused_secrets),
            (n, 0),
            "the store holds what was put"
        );
        let namespace = Namespace::parse("bench").expect("namespace");
        let got = store
            .secret(&ObjectKey::new(namespace, name(n / 2)))
            .expect("a secret reads back");
        assert_eq!(got.version.get(), 1);
        drop(store);
    }
    samples
}

/// BENCH_STORE_DIR is an agent's data directory (with its `node.key` copied to
/// `bench.keyring`): its entries are not the bench's own, so only their count is checked.
fn foreign_store() -> bool {
    std::env::var_os("BENCH_STORE_FROM_AGENT").is_some()
}

fn report(n: usize, opens: usize, what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    let ms = |d: &Duration| d.as_secs_f64() * 1000.0;
    println!(
        "Store::open of {n} secrets {what}, {opens} times: median {:.1} ms, min {:.1} ms, max {:.1} ms \
         ({:.2} us per entry at the median)",
        ms(&samples[samples.len() / 2]),
        ms(&samples[0]),
        ms(&samples[samples.len() - 1]),
        ms(&samples[samples.len() / 2]) * 1000.0 / n as f64,
    );
}
