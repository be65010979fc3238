//! Issue 18, transport: `claw-secrets dev --tls-cert/--tls-key` serves node.invoke over HTTPS
//! only, `claw-secrets invoke` verifies the server (its CA, and the node's name), and a renewed
//! certificate is served without a dropped request. The agent runs the same server.

#[path = "support/random.rs"]
mod random;

#[path = "support/wait.rs"]
mod wait;

#[path = "support/files.rs"]
mod files;

#[path = "support/protocol.rs"]
mod protocol;

#[path = "support/dev_server.rs"]
mod dev_server;

use claw_secrets::invoke::{ClientTimeouts, ClientTls, InvokeClient};
use dev_server::DevEnv;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use serde_json::json;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// A CA of the test's own.
struct TestCa {
    pem: String,
    issuer: Issuer<'static, KeyPair>,
}

impl TestCa {
    fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    /// A serving certificate for `names`, written as `<stem>.crt` and `<stem>.key` in `dir`;
    /// returns the certificate's DER.
    fn issue(&self, names: &[&str], dir: &Path, stem: &str) -> Vec<u8> {
        let key = KeyPair::generate().unwrap();
        let mut params =
            CertificateParams::new(names.iter().map(|n| (*n).to_owned()).collect::<Vec<_>>())
                .unwrap();
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        // Key first, then the certificate, each replaced in one rename: what cert-manager's
        // atomic writer amounts to for a reader.
        write_atomic(
            &dir.join(format!("{stem}.key")),
            key.serialize_pem().as_bytes(),
        );
        write_atomic(&dir.join(format!("{stem}.crt")), cert.pem().as_bytes());
        cert.der().to_vec()
    }

    fn write(&self, path: &Path) -> PathBuf {
        std::fs::write(path, &self.pem).unwrap();
        path.to_owned()
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, bytes).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

/// The DER of the certificate a fresh TLS handshake with 127.0.0.1:`port` is shown.
async fn presented(port: u16, ca_pem: &str, name: &str) -> Result<Vec<u8>, String> {
    let config = claw_secrets::tls::client_config(ca_pem.as_bytes(), "the test CA").unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .map_err(|e| e.to_string())?;
    let tls = tokio_rustls::TlsConnector::from(config)
        .connect(claw_secrets::tls::server_name(name).unwrap(), tcp)
        .await
        .map_err(|e| e.to_string())?;
    let (_, session) = tls.get_ref();
    Ok(session
        .peer_certificates()
        .and_then(|c| c.first())
        .ok_or("no certificate")?
        .to_vec())
}

#[test]
fn with_a_certificate_dev_serves_https_only_and_the_cli_verifies_it() {
    let env = DevEnv::new();
    let certs = env.root.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = TestCa::new("claw-secrets test CA");
    ca.issue(&[&env.node_id], &certs, "tls");
    let ca_file = ca.write(&certs.join("ca.crt"));
    let other_ca_file = TestCa::new("another CA").write(&certs.join("other-ca.crt"));
    let server = env.start_args(
        &[
            "--tls-cert",
            certs.join("tls.crt").to_str().unwrap(),
            "--tls-key",
            certs.join("tls.key").to_str().unwrap(),
        ],
        &[],
    );
    let first_line = server.stdout_text();
    assert!(
        first_line.contains(&format!("listening on https://127.0.0.1:{}", server.port)),
        "{first_line}"
    );

    // The CLI finds the server through dev.json (an https:// address) and verifies it: the
    // certificate chains to --ca-file and names the node called.
    let ca_arg = ca_file.to_str().unwrap();
    let created = env.cli(&[
        "invoke",
        &env.node_id,
        "secret.create",
        r#"{"name":"db.password","data":{"password":"over-tls"}}"#,
        "--ca-file",
        ca_arg,
    ]);
    assert_eq!(created.code(), Some(0), "{created:?}");
    let got = env.cli_env(
        &[
            "invoke",
            &env.node_id,
            "secret.get",
            r#"{"name":"db.password"}"#,
        ],
        &[("CLAW_SECRETS_CA_FILE", ca_arg)],
    );
    assert_eq!(got.code(), Some(0), "{got:?}");
    assert!(got.stdout.contains("over-tls"), "{got:?}");

    // Another CA, or the system's (which never signed it): refused, and said why.
    for extra in [
        vec!["--ca-file", other_ca_file.to_str().unwrap()],
        Vec::new(),
    ] {
        let mut args = vec![
            "invoke",
            &env.node_id,
            "secret.get",
            r#"{"name":"db.password"}"#,
        ];
        args.extend(extra);
        let refused = env.cli(&args);
        assert_eq!(refused.code(), Some(1), "{refused:?}");
        assert!(
            refused.stderr.contains("could not verify") && !refused.stdout.contains("over-tls"),
            "{refused:?}"
        );
    }
    // The right CA, but the certificate does not name the node asked for.
    let renamed = env.cli(&[
        "invoke",
        "other-node",
        "secret.get",
        r#"{"name":"db.password"}"#,
        "--addr",
        &format!("https://127.0.0.1:{}", server.port),
        "--ca-file",
        ca_arg,
    ]);
    assert_eq!(renamed.code(), Some(1), "{renamed:?}");
    assert!(renamed.stderr.contains("could not verify"), "{renamed:?}");
    // ... unless told which name to check.
    let named = env.cli(&[
        "invoke",
        "local",
        "secret.get",
        r#"{"name":"db.password"}"#,
        "--addr",
        &format!("https://127.0.0.1:{}", server.port),
        "--ca-file",
        ca_arg,
        "--tls-server-name",
        &env.node_id,
    ]);
    assert_eq!(named.code(), Some(0), "{named:?}");

    // Plain HTTP on the same port gets no answer: nothing is served without TLS.
    let plain = dev_server::http_invoke(
        server.port,
        Some(&server.admin_token),
        br#"{"nodeId":"local","command":"secret.get","params":{"name":"db.password"}}"#,
    );
    match plain {
        Err(_) => {}
        Ok(resp) => panic!("plain HTTP was answered: {}", resp.text()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_renewed_certificate_is_served_without_a_dropped_request() {
    let env = DevEnv::new();
    let certs = env.root.join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let ca = TestCa::new("claw-secrets test CA");
    let first = ca.issue(&[&env.node_id], &certs, "tls");
    let ca_file = ca.write(&certs.join("ca.crt"));
    let server = env.start_args(
        &[
            "--tls-cert",
            certs.join("tls.crt").to_str().unwrap(),
            "--tls-key",
            certs.join("tls.key").to_str().unwrap(),
        ],
        &[],
    );
    let port = server.port;
    assert_eq!(presented(port, &ca.pem, &env.node_id).await.unwrap(), first);
    let addr = format!("https://127.0.0.1:{port}");
    let tls = ClientTls {
        ca_file: Some(ca_file),
        server_name: None,
    };
    InvokeClient::new(
        &addr,
        &env.node_id,
        &server.admin_token,
        ClientTimeouts::default(),
        &tls,
    )
    .unwrap()
    .invoke(
        &env.node_id,
        "secret.create",
        json!({ "name": "api.key", "data": { "key": "k1" } }),
        None,
    )
    .await
    .unwrap();

    // Readers: one keeps its connection alive across the renewal, one connects anew for
    // every request. Neither may see an error.
    let stop = Arc::new(AtomicBool::new(false));
    let (reads, errors) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut readers = Vec::new();
    for fresh in [false, true] {
        let (addr, node, token, tls) = (
            addr.clone(),
            env.node_id.clone(),
            server.admin_token.clone(),
            tls.clone(),
        );
        let (stop, reads, errors) = (stop.clone(), reads.clone(), errors.clone());
        readers.push(tokio::spawn(async move {
            let client = |_: ()| {
                InvokeClient::new(&addr, &node, &token, ClientTimeouts::default(), &tls).unwrap()
            };
            let mut kept = client(());
            let mut last_error = None;
            while !stop.load(Ordering::Relaxed) {
                if fresh {
                    kept = client(());
                }
                match kept
                    .invoke(&node, "secret.get", json!({ "name": "api.key" }), None)
                    .await
                {
                    Ok(payload) if payload["data"]["key"] == "k1" => {}
                    Ok(other) => last_error = Some(format!("unexpected answer {other}")),
                    Err(e) => last_error = Some(e.to_string()),
                }
                match &last_error {
                    Some(_) => errors.fetch_add(1, Ordering::Relaxed),
                    None => reads.fetch_add(1, Ordering::Relaxed),
                };
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            last_error
        }));
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let renewed = ca.issue(&[&env.node_id], &certs, "tls");
    assert_ne!(renewed, first);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if presented(port, &ca.pem, &env.node_id).await.unwrap() == renewed {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was not served within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stop.store(true, Ordering::Relaxed);
    for reader in readers {
        let last_error = reader.await.unwrap();
        assert_eq!(last_error, None);
    }
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    let reads = reads.load(Ordering::Relaxed);
    assert!(reads > 20, "only {reads} reads during the renewal");
    eprintln!("{reads} reads across the renewal, none failed");
}
