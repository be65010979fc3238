//! `claw-secrets seal`, the real binary, no cluster: plaintext manifests (and --from-literal /
//! --from-file) become ClawSecrets whose spec.encryptedData opens with the keyring, for their
//! own namespace and name only, and whose output holds no plaintext in any form. `--fetch-key`
//! and `seal` without `--key` read the public key from a stand-in API server on loopback.

#[path = "support/canary.rs"]
mod canary;
#[path = "support/files.rs"]
mod files;
#[path = "support/random.rs"]
mod random;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use canary::Canaries;
use claw_secrets::crypto::{
    CryptoError, Keyring, SealScope, SealingPrivateKey, SealingPublicKey, open_offline,
};
use claw_secrets::domain::SecretData;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_claw-secrets");

/// A keyring and a temp dir holding its public sealing key (`sealing-key.txt`).
struct Setup {
    dir: tempfile::TempDir,
    ring: Keyring,
    key_file: PathBuf,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let ring = Keyring::generate().unwrap();
    let public = SealingPrivateKey::derive(ring.active()).public_key();
    let key_file = dir.path().join("sealing-key.txt");
    std::fs::write(&key_file, format!("{}\n", public.to_text())).unwrap();
    Setup {
        dir,
        ring,
        key_file,
    }
}

impl Setup {
    fn file(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.dir.path().join(name);
        std::fs::write(&path, contents).unwrap();
        path
    }

    /// `claw-secrets seal --key <key file> ARGS`.
    fn seal(&self, args: &[&str]) -> Output {
        let mut all = vec!["seal", "--key", self.key_file.to_str().unwrap()];
        all.extend_from_slice(args);
        run(&all, None, &[])
    }
}

fn run(args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &Path)]) -> Output {
    let mut cmd = Command::new(BIN);
    cmd.args(args)
        .env_remove("KUBECONFIG")
        .env_remove("CLAW_SECRETS_LOG")
        .env_remove("RUST_LOG")
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().expect("run the binary");
    if let Some(input) = stdin {
        child.stdin.take().unwrap().write_all(input).unwrap();
    }
    child.wait_with_output().unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8(out.stdout.clone()).unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "exit {:?}: {}",
        out.status.code(),
        stderr(out)
    );
}

/// Fails with a non-zero exit, nothing on stdout, and stderr containing `phrase`.
#[track_caller]
fn assert_refused(out: &Output, phrase: &str) -> String {
    let err = stderr(out);
    assert!(!out.status.success(), "succeeded: {}", stdout(out));
    assert!(out.stdout.is_empty(), "stdout: {}", stdout(out));
    assert!(err.contains(phrase), "{phrase:?} not in: {err}");
    err
}

fn yaml(text: &str) -> Value {
    serde_saphyr::from_str(text).unwrap_or_else(|e| panic!("not YAML ({e}):\n{text}"))
}

fn data(json: &str) -> SecretData {
    serde_json::from_str(json).unwrap()
}

fn encrypted(doc: &Value) -> &str {
    doc["spec"]["encryptedData"]
        .as_str()
        .unwrap_or_else(|| panic!("no spec.encryptedData: {doc}"))
}

fn scope<'a>(namespace: &'a str, name: &'a str) -> SealScope<'a> {
    SealScope { namespace, name }
}

fn manifest(password: &str) -> String {
    format!(
        "# a comment\n\
apiVersion: clawbernetes.io/v1beta1
kind: ClawSecret
metadata:
  name: db-credentials
  namespace: team-a
  labels:
    app: api
  annotations:
    team: payments
spec:
  name: db.password
  data:
    password: \"{password}\"
    user: admin
  allowedWorkloads:
    - api-server
  nodeSelector:
    gpu: \"true\"
"
    )
}

#[test]
fn a_sealed_manifest_keeps_its_fields_holds_no_plaintext_and_opens_only_where_it_was_sealed() {
    let s = setup();
    let secret = canary::canary("seal-canary");
    let input = s.file("db.yaml", &manifest(&secret));
    let out = s.seal(&["-f", input.to_str().unwrap()]);
    assert_ok(&out);
    let canaries = Canaries::of([secret.clone()]);
    assert!(canaries.forms() >= 7, "raw, hex and base64 at 3 alignments");
    canaries.assert_absent("stdout", &out.stdout);
    canaries.assert_absent("stderr", &out.stderr);

    let text = stdout(&out);
    let doc = yaml(&text);
    assert_eq!(doc["apiVersion"], "clawbernetes.io/v1beta1");
    assert_eq!(doc["kind"], "ClawSecret");
    assert_eq!(doc["metadata"]["name"], "db-credentials");
    assert_eq!(doc["metadata"]["namespace"], "team-a");
    assert_eq!(doc["metadata"]["labels"]["app"], "api");
    assert_eq!(doc["metadata"]["annotations"]["team"], "payments");
    assert_eq!(doc["spec"]["name"], "db.password");
    assert_eq!(doc["spec"]["allowedWorkloads"][0], "api-server");
    assert_eq!(doc["spec"]["nodeSelector"]["gpu"], "true");
    assert!(doc["spec"].get("data").is_none(), "{text}");
    let keys: Vec<&String> = doc["spec"].as_object().unwrap().keys().collect();
    assert_eq!(
        keys,
        ["name", "encryptedData", "allowedWorkloads", "nodeSelector"],
        "encryptedData takes data's place"
    );

    let sealed = encrypted(&doc);
    let opened = open_offline(&s.ring, &scope("team-a", "db-credentials"), sealed).unwrap();
    assert_eq!(
        opened,
        data(&format!(r#"{{"password":"{secret}","user":"admin"}}"#))
    );
    for (ns, name) in [
        ("team-b", "db-credentials"),
        ("team-a", "db-credentials-2"),
        ("default", "db-credentials"),
    ] {
        assert!(
            matches!(
                open_offline(&s.ring, &scope(ns, name), sealed),
                Err(CryptoError::AuthenticationFailed)
            ),
            "{ns}/{name} opened"
        );
    }
    // Another cluster (another keyring) cannot open it either.
    assert!(
        open_offline(
            &Keyring::generate().unwrap(),
            &scope("team-a", "db-credentials"),
            sealed
        )
        .is_err()
    );

    // Sealing again gives another ciphertext of the same data.
    let again = s.seal(&["-f", input.to_str().unwrap()]);
    assert_ok(&again);
    let again = yaml(&stdout(&again));
    assert_ne!(encrypted(&again), sealed);
    assert_eq!(
        open_offline(
            &s.ring,
            &scope("team-a", "db-credentials"),
            encrypted(&again)
        )
        .unwrap(),
        opened
    );
}

#[test]
fn json_from_stdin_with_the_namespace_from_the_flag_and_output_to_a_0644_file() {
    let s = setup();
    let secret = canary::canary("seal-canary");
    let json = format!(
        r#"{{"apiVersion":"clawbernetes.io/v1beta1","kind":"ClawSecret",
            "metadata":{{"name":"api-token"}},"spec":{{"data":{{"token":"{secret}"}}}}}}"#
    );
    let out_file = s.dir.path().join("api-token.sealed.yaml");
    let key = s.key_file.to_str().unwrap();
    let out = run(
        &[
            "seal",
            "--key",
            key,
            "-f",
            "-",
            "--namespace",
            "team-a",
            "-o",
            out_file.to_str().unwrap(),
        ],
        Some(json.as_bytes()),
        &[],
    );
    assert_ok(&out);
    assert!(out.stdout.is_empty(), "{}", stdout(&out));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&out_file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644, "{mode:o}");
    let written = std::fs::read(&out_file).unwrap();
    Canaries::of([secret.clone()]).assert_absent("the output file", &written);
    let doc = yaml(std::str::from_utf8(&written).unwrap());
    assert_eq!(
        doc["metadata"]["namespace"], "team-a",
        "the namespace is written in"
    );
    let opened = open_offline(&s.ring, &scope("team-a", "api-token"), encrypted(&doc)).unwrap();
    assert_eq!(opened.get("token").unwrap().expose(), secret);
    // No temp file is left beside it.
    let names: Vec<_> = std::fs::read_dir(s.dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}

#[test]
fn from_literal_and_from_file_build_a_fresh_manifest() {
    let s = setup();
    let secret = canary::canary("seal-canary");
    let file_secret = canary::canary("seal-file-canary");
    let pw = s.file("password.txt", &format!("{file_secret}\n"));
    let cert = s.file("tls.crt", "-----BEGIN CERTIFICATE-----\nMIIB\n");
    let out = s.seal(&[
        "--namespace",
        "team-a",
        "--name",
        "db",
        "--from-literal",
        &format!("api-key={secret}"),
        "--from-literal",
        "empty=",
        "--from-file",
        &format!("password={}", pw.display()),
        "--from-file",
        cert.to_str().unwrap(),
    ]);
    assert_ok(&out);
    let canaries = Canaries::of([secret.clone(), file_secret.clone()]);
    canaries.assert_absent("stdout", &out.stdout);
    canaries.assert_absent("stderr", &out.stderr);
    let doc = yaml(&stdout(&out));
    assert_eq!(doc["apiVersion"], "clawbernetes.io/v1beta1");
    assert_eq!(doc["kind"], "ClawSecret");
    assert_eq!(doc["metadata"]["name"], "db");
    assert_eq!(doc["metadata"]["namespace"], "team-a");
    assert_eq!(doc["spec"].as_object().unwrap().len(), 1, "{doc}");
    let opened = open_offline(&s.ring, &scope("team-a", "db"), encrypted(&doc)).unwrap();
    assert_eq!(opened.get("api-key").unwrap().expose(), secret);
    assert_eq!(opened.get("empty").unwrap().expose(), "");
    assert_eq!(
        opened.get("password").unwrap().expose(),
        format!("{file_secret}\n"),
        "a file's contents exactly"
    );
    assert_eq!(
        opened.get("tls.crt").unwrap().expose(),
        "-----BEGIN CERTIFICATE-----\nMIIB\n",
        "the key defaults to the file's name"
    );
    assert!(open_offline(&s.ring, &scope("team-b", "db"), encrypted(&doc)).is_err());

    // --name and --namespace are required here.
    let out = s.seal(&["--name", "db", "--from-literal", "k=v"]);
    assert_eq!(out.status.code(), Some(2));
    assert_refused(&out, "--namespace is required");
    let out = s.seal(&["--namespace", "team-a", "--from-literal", "k=v"]);
    assert_refused(&out, "--name is required");
    // The same key twice, and a literal without '=', are refused without echoing the value.
    let out = s.seal(&[
        "--namespace",
        "team-a",
        "--name",
        "db",
        "--from-literal",
        "k=1",
        "--from-literal",
        "k=2",
    ]);
    assert_refused(&out, "data key \"k\" is given twice");
    let out = s.seal(&[
        "--namespace",
        "team-a",
        "--name",
        "db",
        "--from-literal",
        &secret,
    ]);
    let err = assert_refused(&out, "KEY=VALUE");
    assert!(!err.contains(&secret), "{err}");
}

#[test]
fn invalid_data_is_refused_with_the_rule_and_never_quoted() {
    let s = setup();
    let secret = canary::canary("seal-canary");
    let rule = "data keys are 1-253 characters of letters, digits, '-', '_' and '.'";

    let bad_key = manifest(&secret).replace("user: admin", "\"bad key\": admin");
    let input = s.file("bad-key.yaml", &bad_key);
    let out = s.seal(&["-f", input.to_str().unwrap()]);
    let err = assert_refused(&out, rule);
    assert!(err.contains("\"bad key\""), "{err}");
    Canaries::of([secret.clone()]).assert_absent("stderr", &out.stderr);

    let out = s.seal(&[
        "--namespace",
        "team-a",
        "--name",
        "db",
        "--from-literal",
        &format!("bad/key={secret}"),
    ]);
    let err = assert_refused(&out, rule);
    assert!(!err.contains(&secret), "{err}");

    // A value that is not a string, and data over 1 MiB.
    let numeric = manifest(&secret).replace("user: admin", "pin: 918273645");
    let out = s.seal(&["-f", s.file("pin.yaml", &numeric).to_str().unwrap()]);
    let err = assert_refused(&out, "\"pin\" must be a string, not a number");
    assert!(!err.contains("918273645"), "{err}");
    let big = manifest(&"x".repeat(1024 * 1024));
    let out = s.seal(&["-f", s.file("big.yaml", &big).to_str().unwrap()]);
    assert_refused(&out, "the limit is 1048576 bytes (1 MiB)");

    // A YAML syntax error shows no snippet of the source.
    let broken = manifest(&secret).replace("user: admin", "user: [admin");
    let out = s.seal(&["-f", s.file("broken.yaml", &broken).to_str().unwrap()]);
    assert_refused(&out, "not a valid YAML ClawSecret");
    Canaries::of([secret]).assert_absent("stderr", &out.stderr);
}

#[test]
fn manifests_that_are_sealed_already_or_incomplete_are_refused() {
    let s = setup();
    let base = manifest("s3cret-value");
    let cases: Vec<(String, &str)> = vec![
        (
            base.replace(
                "  allowedWorkloads:",
                "  sealed:\n    version: 1\n    keyId: k-1\n    envelope: QUJD\n    sealTime: x\n  allowedWorkloads:",
            ),
            "spec.sealed is set",
        ),
        (
            base.replace("  allowedWorkloads:", "  encryptedData: QUJD\n  allowedWorkloads:"),
            "spec.encryptedData is set",
        ),
        (
            base.replace("  data:\n    password: \"s3cret-value\"\n    user: admin\n", ""),
            "spec.data is missing",
        ),
        (
            base.replace("  data:\n    password: \"s3cret-value\"\n    user: admin\n", "  data: {}\n"),
            "data is empty",
        ),
        (
            base.replace("  namespace: team-a\n", ""),
            "metadata.namespace is missing",
        ),
        (
            base.replace("  name: db-credentials\n", ""),
            "metadata.name is missing",
        ),
        (
            base.replace("kind: ClawSecret", "kind: ClawConfig"),
            "only a ClawSecret can be sealed",
        ),
        (
            base.replace("clawbernetes.io/v1beta1", "v1"),
            "clawbernetes.io/v1beta1",
        ),
        (
            base.replace("name: db-credentials", "name: DB_Credentials"),
            "DNS-1123 subdomain",
        ),
        (
            base.replace("namespace: team-a", "namespace: Team_A"),
            "DNS-1123 label",
        ),
        (
            base.replace(
                "    team: payments",
                "    kubectl.kubernetes.io/last-applied-configuration: '{}'",
            ),
            "may hold the plaintext",
        ),
    ];
    for (i, (text, phrase)) in cases.iter().enumerate() {
        let input = s.file(&format!("case-{i}.yaml"), text);
        let out = s.seal(&["-f", input.to_str().unwrap()]);
        let err = assert_refused(&out, phrase);
        assert!(!err.contains("s3cret-value"), "{err}");
    }
    // A data value repeated in clear elsewhere (an annotation) is refused, naming the key.
    let leaky = manifest("s3cret-value-long-enough")
        .replace("    team: payments", "    copy: s3cret-value-long-enough");
    let out = s.seal(&["-f", s.file("leaky.yaml", &leaky).to_str().unwrap()]);
    let err = assert_refused(&out, "\"password\" also appears elsewhere");
    assert!(!err.contains("s3cret-value"), "{err}");

    // Flags that disagree with the manifest.
    let input = s.file("ok.yaml", &base);
    let out = s.seal(&["-f", input.to_str().unwrap(), "--namespace", "team-b"]);
    assert_eq!(out.status.code(), Some(2));
    assert_refused(&out, "--namespace is \"team-b\"");
    let out = s.seal(&["-f", input.to_str().unwrap(), "--name", "other"]);
    assert_refused(&out, "--name is \"other\"");
    // ... and that agree are fine.
    let out = s.seal(&["-f", input.to_str().unwrap(), "--namespace", "team-a"]);
    assert_ok(&out);
}

#[test]
fn a_bad_key_file_or_no_input_is_refused() {
    let s = setup();
    let input = s.file("ok.yaml", &manifest("s3cret-value"));
    let bad = s.file("bad-key.txt", "not a key\n");
    let out = run(
        &[
            "seal",
            "--key",
            bad.to_str().unwrap(),
            "-f",
            input.to_str().unwrap(),
        ],
        None,
        &[],
    );
    assert_refused(&out, "sealing key is invalid");
    let out = s.seal(&[]);
    assert_eq!(out.status.code(), Some(2));
    assert_refused(&out, "nothing to seal");
    // Without --key and without a kubeconfig: the error says to pass --key.
    let home = tempfile::tempdir().unwrap();
    let missing = home.path().join("no-kubeconfig");
    let out = run(
        &["seal", "-f", input.to_str().unwrap()],
        None,
        &[("HOME", home.path()), ("KUBECONFIG", &missing)],
    );
    assert_refused(&out, "--key FILE");
}

/// A stand-in for the API server: answers GETs of the sealing-key ConfigMap in `namespace`
/// with `key`, and 404 for anything else. Serves at most `max` connections.
fn fake_api_server(namespace: &'static str, key: String, max: usize) -> String {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(max) {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut request_line = String::new();
            if reader.read_line(&mut request_line).is_err() {
                continue;
            }
            loop {
                let mut line = String::new();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) if line == "\r\n" => break,
                    Ok(_) => {}
                }
            }
            let wanted =
                format!("GET /api/v1/namespaces/{namespace}/configmaps/claw-secrets-sealing-key ");
            let (status, body) = if request_line.starts_with(&wanted) {
                (
                    "200 OK",
                    serde_json::json!({
                        "apiVersion": "v1", "kind": "ConfigMap",
                        "metadata": {"name": "claw-secrets-sealing-key", "namespace": namespace},
                        "data": {"sealing-key": key},
                    }),
                )
            } else {
                (
                    "404 Not Found",
                    serde_json::json!({
                        "apiVersion": "v1", "kind": "Status", "status": "Failure",
                        "message": "configmaps \"claw-secrets-sealing-key\" not found",
                        "reason": "NotFound", "code": 404,
                    }),
                )
            };
            let body = body.to_string();
            let _ = write!(
                stream,
                "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
    });
    format!("http://{addr}")
}

fn kubeconfig(dir: &Path, server: &str) -> PathBuf {
    let path = dir.join("kubeconfig");
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1
kind: Config
clusters:
- name: fake
  cluster:
    server: {server}
contexts:
- name: fake
  context:
    cluster: fake
    user: fake
current-context: fake
users:
- name: fake
  user:
    token: not-a-real-token
"
        ),
    )
    .unwrap();
    path
}

#[test]
fn the_key_is_fetched_from_the_cluster_saved_and_used() {
    let s = setup();
    let public = SealingPrivateKey::derive(s.ring.active()).public_key();
    let server = fake_api_server("claw-secrets", format!("{}\n", public.to_text()), 8);
    let kc = kubeconfig(s.dir.path(), &server);
    let env = [("KUBECONFIG", kc.as_path()), ("HOME", s.dir.path())];

    let out = run(&["seal", "--fetch-key"], None, &env);
    assert_ok(&out);
    assert_eq!(stdout(&out), format!("{}\n", public.to_text()));

    let saved = s.dir.path().join("fetched-key.txt");
    let out = run(
        &["seal", "--fetch-key", "-o", saved.to_str().unwrap()],
        None,
        &env,
    );
    assert_ok(&out);
    let text = std::fs::read_to_string(&saved).unwrap();
    assert_eq!(SealingPublicKey::parse(&text).unwrap(), public);

    // `seal` without --key fetches it the same way.
    let secret = canary::canary("seal-canary");
    let input = s.file("db.yaml", &manifest(&secret));
    let out = run(&["seal", "-f", input.to_str().unwrap()], None, &env);
    assert_ok(&out);
    Canaries::of([secret.clone()]).assert_absent("stdout", &out.stdout);
    let doc = yaml(&stdout(&out));
    let opened =
        open_offline(&s.ring, &scope("team-a", "db-credentials"), encrypted(&doc)).unwrap();
    assert_eq!(opened.get("password").unwrap().expose(), secret);

    // Another operator namespace: not found, and the error says what to check.
    let out = run(
        &["seal", "--fetch-key", "--operator-namespace", "elsewhere"],
        None,
        &env,
    );
    assert_refused(
        &out,
        "ConfigMap elsewhere/claw-secrets-sealing-key not found",
    );
}

#[test]
fn a_fetched_key_that_does_not_parse_is_refused() {
    let s = setup();
    let server = fake_api_server("claw-secrets", "garbage".to_owned(), 2);
    let kc = kubeconfig(s.dir.path(), &server);
    let out = run(
        &["seal", "--fetch-key"],
        None,
        &[("KUBECONFIG", kc.as_path()), ("HOME", s.dir.path())],
    );
    assert_refused(
        &out,
        "ConfigMap claw-secrets/claw-secrets-sealing-key (key sealing-key): sealing key is invalid",
    );
}
