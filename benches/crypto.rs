//! Seal and open of a 1 KiB secret (DESIGN.md "Targets": <= 2 us each).
//!
//!     cargo bench --bench crypto
//!
//! A `harness = false` bench without criterion: warm-up, then several batches of many
//! operations; each batch is timed as a whole (mean ns/op without timer overhead) and every
//! operation is also timed on its own (median and tail, which include ~20-40 ns of
//! `Instant::now` overhead). The spread across batches shows how steady the figure is.
//!
//! Without `--bench` (as `cargo test --all-targets` runs it) it only does a few round trips
//! and exits: a smoke test that the bench still builds and runs, asserting nothing about time.
//!
//! Environment: BENCH_BATCHES (default 30), BENCH_BATCH_OPS (default 2000).

use std::hint::black_box;
use std::time::{Duration, Instant};

use claw_secrets::crypto::{Envelope, Keyring, SecretIdentity, open, seal};
use claw_secrets::domain::{Kind, Name, Namespace, SecretData, Version};

#[path = "support/env.rs"]
mod env;
use env::env_usize;

/// One key whose value is `value_len` bytes (printable ASCII, as a password or PEM would be).
fn secret_data(value_len: usize) -> SecretData {
    let value: String = (0..value_len)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    serde_json::from_value(serde_json::json!({ "value": value })).expect("valid secret data")
}

struct Fixture {
    keyring: Keyring,
    namespace: Namespace,
    name: Name,
    data: SecretData,
}

impl Fixture {
    fn new(value_len: usize) -> Self {
        Fixture {
            keyring: Keyring::generate().expect("keyring"),
            namespace: Namespace::default_namespace(),
            name: Name::parse("db.password").expect("name"),
            data: secret_data(value_len),
        }
    }

    fn identity(&self) -> SecretIdentity<'_> {
        SecretIdentity {
            kind: Kind::Secret,
            namespace: &self.namespace,
            name: &self.name,
            version: Version::new(3).expect("version"),
        }
    }

    fn seal(&self) -> Envelope {
        seal(&self.keyring, &self.identity(), &self.data).expect("seal")
    }

    fn open(&self, envelope: &Envelope) -> SecretData {
        open(&self.keyring, &self.identity(), envelope).expect("open")
    }
}

struct Stats {
    batch_means_ns: Vec<f64>,
    samples_ns: Vec<u64>,
}

fn measure(batches: usize, ops: usize, mut op: impl FnMut()) -> Stats {
    // Warm-up: caches, branch predictors, CPU frequency, the allocator's free lists.
    let warm_until = Instant::now() + Duration::from_millis(300);
    while Instant::now() < warm_until {
        op();
    }
    let mut batch_means_ns = Vec::with_capacity(batches);
    let mut samples_ns = Vec::with_capacity(batches * ops);
    for _ in 0..batches {
        // Whole-batch timing: no per-op timer overhead.
        let start = Instant::now();
        for _ in 0..ops {
            op();
        }
        batch_means_ns.push(start.elapsed().as_nanos() as f64 / ops as f64);
        // Per-op timing, for the median and the tail.
        for _ in 0..ops {
            let t = Instant::now();
            op();
            samples_ns.push(t.elapsed().as_nanos() as u64);
        }
    }
    samples_ns.sort_unstable();
    Stats {
        batch_means_ns,
        samples_ns,
    }
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i]
}

fn report(label: &str, s: &Stats) {
    let mut means = s.batch_means_ns.clone();
    means.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let mean = means.iter().sum::<f64>() / means.len() as f64;
    let median_of_means = means[means.len() / 2];
    let sd = (means.iter().map(|m| (m - mean).powi(2)).sum::<f64>() / means.len() as f64).sqrt();
    println!(
        "{label:<22} mean {mean:>7.0} ns/op (batch means: median {median_of_means:.0}, min {:.0}, max {:.0}, sd {sd:.0}) | per-op median {} ns, p99 {} ns, max {} ns",
        means[0],
        means[means.len() - 1],
        percentile(&s.samples_ns, 0.5),
        percentile(&s.samples_ns, 0.99),
        s.samples_ns[s.samples_ns.len() - 1],
    );
}

fn smoke() {
    for len in [0, 1024] {
        let f = Fixture::new(len);
        for _ in 0..3 {
            let env = f.seal();
            assert_eq!(f.open(&env), f.data);
        }
    }
    println!("crypto bench: smoke run ok (run `cargo bench --bench crypto` to measure)");
}

fn main() {
    if !std::env::args().any(|a| a == "--bench") {
        smoke();
        return;
    }
    let batches = env_usize("BENCH_BATCHES", 30).max(1);
    let ops = env_usize("BENCH_BATCH_OPS", 2000).max(1);
    println!(
        "crypto bench: {batches} batches x {ops} ops after 300 ms warm-up, one thread; \
         secret = one key \"value\" with an N-byte value"
    );

    // 1 KiB is the target; 16 B shows the fixed cost (randomness, HKDF, allocations), 64 KiB
    // the per-byte cost. The 64 KiB rows use a twentieth of the ops per batch.
    for (label, len, ops) in [
        ("1 KiB", 1024usize, ops),
        ("16 B", 16, ops),
        ("64 KiB", 64 * 1024, (ops / 20).max(1)),
    ] {
        let f = Fixture::new(len);
        let s = measure(batches, ops, || {
            black_box(f.seal());
        });
        report(&format!("seal {label}"), &s);
        let env = f.seal();
        let s = measure(batches, ops, || {
            black_box(f.open(black_box(&env)));
        });
        report(&format!("open {label}"), &s);
    }
    println!("target (DESIGN.md): seal and open of a 1 KiB secret <= 2 us (2000 ns) each");
}
