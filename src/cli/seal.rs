//! `claw-secrets seal`: a ClawSecret manifest safe to commit. Reads plaintext data (a ClawSecret
//! manifest, or `--from-literal`/`--from-file`) and writes a ClawSecret whose `spec.encryptedData`
//! is the data encrypted to the cluster's public sealing key, bound to the object's namespace
//! and name (docs/crypto.md, "Manifests safe to commit"). `--fetch-key` reads that public key
//! from the cluster. Runs on the user's machine; needs no secret of the cluster's.

use clap::Args;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::collections::BTreeMap;
use std::fmt;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;
use zeroize::Zeroizing;

use crate::crypto::{SealScope, SealingPublicKey, seal_offline};
use crate::domain::{DataKey, Namespace, SecretData, SecretValue, dns};

/// Where the operator publishes the public sealing key (in its own namespace), and the key
/// holding its text form (`claw-secrets-sealing-key-v1:...`).
use crate::k8s::sealing_key::{
    CONFIGMAP as SEALING_KEY_CONFIGMAP, CONFIGMAP_KEY as SEALING_KEY_CONFIGMAP_KEY,
};

/// The apiVersion written: the types' (the CRDs' storage version).
fn api_version() -> String {
    use kube::Resource;
    crate::k8s::crd::ClawSecret::api_version(&()).into_owned()
}

/// Whether a manifest's apiVersion is one the CRDs serve.
fn served(api_version: &str) -> bool {
    use crate::k8s::crd::{DEPRECATED_VERSIONS, GROUP};
    api_version == self::api_version()
        || DEPRECATED_VERSIONS
            .iter()
            .any(|v| api_version == format!("{GROUP}/{v}"))
}
const KIND: &str = "ClawSecret";
const DEFAULT_OPERATOR_NAMESPACE: &str = "claw-secrets";
/// A plaintext manifest larger than this is refused before it is parsed: a ClawSecret's data is
/// at most 1 MiB, and the API server takes objects of about 1.5 MiB.
const MAX_MANIFEST_BYTES: usize = 4 * 1024 * 1024;
/// kubectl's client-side apply keeps the whole applied object in this annotation.
const LAST_APPLIED: &str = "kubectl.kubernetes.io/last-applied-configuration";
/// A data value this long that also appears elsewhere in the output refuses the seal (it would
/// be left in clear). Shorter ones are not checked: they appear by chance ("true", a user name
/// that is also a label), and a password or token is longer.
const MIN_LEAK_CHECK_LEN: usize = 16;

#[derive(Debug, Args)]
pub struct SealArgs {
    /// The plaintext ClawSecret manifest (YAML or JSON) to seal; `-` reads stdin.
    ///
    /// It must be one ClawSecret (apiVersion clawbernetes.io/v1beta1) with metadata.name,
    /// metadata.namespace (or --namespace) and spec.data. The output is the same manifest with
    /// spec.data replaced by spec.encryptedData; labels, annotations, spec.name,
    /// spec.allowedWorkloads and spec.nodeSelector are kept.
    #[arg(short = 'f', long = "filename", value_name = "MANIFEST")]
    file: Option<PathBuf>,

    /// A data entry KEY=VALUE (repeatable); instead of -f, with --name and --namespace. The
    /// value is in your shell's history and process list: prefer --from-file for real secrets.
    #[arg(long, value_name = "KEY=VALUE", conflicts_with = "file")]
    from_literal: Vec<String>,

    /// A data entry from a file's contents, [KEY=]PATH (repeatable; KEY defaults to the file's
    /// name); instead of -f, with --name and --namespace. The file must be UTF-8 text.
    #[arg(long, value_name = "[KEY=]PATH", conflicts_with = "file")]
    from_file: Vec<String>,

    /// The ClawSecret's namespace; the ciphertext only opens there. Required without -f; with
    /// -f, the manifest's metadata.namespace, if set, must be the same.
    #[arg(long)]
    namespace: Option<String>,

    /// The ClawSecret's object name (metadata.name); the ciphertext only opens under it.
    /// Required without -f; with -f, the manifest's metadata.name, if set, must be the same.
    #[arg(long)]
    name: Option<String>,

    /// The cluster's public sealing key, a file holding its text form
    /// (claw-secrets-sealing-key-v1:...), as `claw-secrets seal --fetch-key` saves it. Without
    /// it, the key is read from the cluster, like --fetch-key does.
    #[arg(long, value_name = "FILE")]
    key: Option<PathBuf>,

    /// Read the public sealing key from the cluster and print it (or save it with -o), instead
    /// of sealing: ConfigMap claw-secrets-sealing-key (key sealing-key) in
    /// --operator-namespace, with your kubeconfig ($KUBECONFIG, else ~/.kube/config).
    #[arg(
        long,
        conflicts_with_all = ["file", "from_literal", "from_file", "key", "namespace", "name"]
    )]
    fetch_key: bool,

    /// The operator's namespace, where it publishes the sealing key.
    #[arg(long, value_name = "NS", default_value = DEFAULT_OPERATOR_NAMESPACE)]
    operator_namespace: String,

    /// The kubeconfig context to read the sealing key with (default: the current context).
    #[arg(long)]
    context: Option<String>,

    /// Write the output to this file (mode 0644: it holds no plaintext) instead of stdout.
    #[arg(short = 'o', long = "output", value_name = "FILE")]
    output: Option<PathBuf>,
}

/// A failure, and whether it was a usage error (exit 2) or not (exit 1).
#[derive(Debug)]
struct Failure {
    usage: bool,
    message: String,
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        usage: true,
        message: message.into(),
    }
}

fn failed(message: impl Into<String>) -> Failure {
    Failure {
        usage: false,
        message: message.into(),
    }
}

pub fn run(args: SealArgs) -> ExitCode {
    match run_inner(&args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("error: {}", f.message);
            ExitCode::from(if f.usage { 2 } else { 1 })
        }
    }
}

fn run_inner(args: &SealArgs) -> Result<(), Failure> {
    if args.fetch_key {
        let key = fetch_key(args)?;
        return emit(args.output.as_deref(), &format!("{}\n", key.to_text()));
    }
    let literal_mode = !args.from_literal.is_empty() || !args.from_file.is_empty();
    if args.file.is_none() && !literal_mode {
        return Err(usage(
            "nothing to seal: give a plaintext ClawSecret manifest with -f FILE (or -f - for \
             stdin), or data with --from-literal/--from-file and --name and --namespace; \
             --fetch-key prints the cluster's sealing key",
        ));
    }
    // Everything about the input is checked before the key is fetched: a bad manifest fails
    // without a round trip to the cluster.
    let sealable = match &args.file {
        Some(path) => from_manifest(path, args)?,
        None => from_flags(args)?,
    };
    let key = match &args.key {
        Some(path) => read_key_file(path)?,
        None => fetch_key(args)?,
    };
    let scope = SealScope {
        namespace: sealable.namespace.as_str(),
        name: &sealable.name,
    };
    let text = seal_offline(&key, &scope, &sealable.data)
        .map_err(|e| failed(format!("cannot seal: {e}")))?;
    let yaml = sealable.render(text)?;
    emit(args.output.as_deref(), &yaml)
}

/// What is sealed, and the manifest it goes into.
struct Sealable {
    namespace: Namespace,
    name: String,
    data: SecretData,
    /// The manifest's top-level fields in order, `spec` among them (without `data`).
    top: Map<String, Value>,
    /// Where `data` was among spec's fields: `encryptedData` takes its place.
    data_position: usize,
}

impl Sealable {
    /// The output manifest: the input's fields in their order, `spec.data` replaced by
    /// `spec.encryptedData`. Refused if any long-enough data value appears in it anywhere.
    fn render(mut self, encrypted: String) -> Result<String, Failure> {
        if let Some(Value::Object(spec)) = self.top.get_mut("spec") {
            let mut fields: Vec<(String, Value)> = std::mem::take(spec).into_iter().collect();
            let at = self.data_position.min(fields.len());
            fields.insert(at, ("encryptedData".to_owned(), Value::String(encrypted)));
            *spec = fields.into_iter().collect();
        }
        // encryptedData as one plain line (not a folded `>-` block), easy to read and diff.
        let options = serde_saphyr::ser_options! { prefer_block_scalars: false };
        let yaml = serde_saphyr::to_string_with_options(&Value::Object(self.top), options)
            .map_err(|e| failed(format!("cannot write the manifest as YAML: {e}")))?;
        for (key, value) in self.data.iter() {
            let value = value.expose();
            if value.len() >= MIN_LEAK_CHECK_LEN && yaml.contains(value) {
                return Err(failed(format!(
                    "the value of data key {:?} also appears elsewhere in the manifest (a label, \
                     an annotation, another field), where it would stay in clear: remove it \
                     from there and seal again",
                    key.as_str()
                )));
            }
        }
        Ok(yaml)
    }
}

/// `--from-literal` / `--from-file`, `--name`, `--namespace`: a fresh manifest.
fn from_flags(args: &SealArgs) -> Result<Sealable, Failure> {
    let name = args.name.as_deref().ok_or_else(|| {
        usage(
            "--name is required with --from-literal/--from-file (the object's name is bound \
             into the ciphertext)",
        )
    })?;
    let namespace = args.namespace.as_deref().ok_or_else(|| {
        usage(
            "--namespace is required with --from-literal/--from-file (the namespace is bound \
             into the ciphertext)",
        )
    })?;
    let name = object_name(name).map_err(usage)?;
    let namespace = Namespace::parse(namespace).map_err(|e| usage(e.to_string()))?;

    let mut entries: BTreeMap<DataKey, SecretValue> = BTreeMap::new();
    let mut add = |key: &str, value: SecretValue| -> Result<(), Failure> {
        let key = DataKey::parse(key).map_err(|e| usage(e.to_string()))?;
        if entries.contains_key(&key) {
            return Err(usage(format!("data key {:?} is given twice", key.as_str())));
        }
        entries.insert(key, value);
        Ok(())
    };
    for literal in &args.from_literal {
        let (key, value) = literal.split_once('=').ok_or_else(|| {
            usage("--from-literal takes KEY=VALUE (no '=' found; the value is not shown)")
        })?;
        add(key, SecretValue::new(value.to_owned()))?;
    }
    for spec in &args.from_file {
        let (key, path) = match spec.split_once('=') {
            Some((key, path)) => (key.to_owned(), PathBuf::from(path)),
            None => {
                let path = PathBuf::from(spec);
                let key = path
                    .file_name()
                    .and_then(|n| n.to_str())
                    .ok_or_else(|| {
                        usage(format!(
                            "--from-file {spec}: no file name to use as the key; give KEY=PATH"
                        ))
                    })?
                    .to_owned();
                (key, path)
            }
        };
        let bytes = read_limited(&path, MAX_MANIFEST_BYTES)?;
        add(&key, utf8_value(bytes, &path)?)?;
    }
    let data = SecretData::parse(entries).map_err(|e| usage(e.to_string()))?;
    let mut metadata = Map::new();
    metadata.insert("name".into(), Value::String(name.clone()));
    metadata.insert(
        "namespace".into(),
        Value::String(namespace.as_str().to_owned()),
    );
    let mut top = Map::new();
    top.insert("apiVersion".into(), Value::String(api_version()));
    top.insert("kind".into(), Value::String(KIND.into()));
    top.insert("metadata".into(), Value::Object(metadata));
    top.insert("spec".into(), Value::Object(Map::new()));
    Ok(Sealable {
        namespace,
        name,
        data,
        top,
        data_position: 0,
    })
}

/// A file's contents as a secret value, without a copy: the buffer moves into the string, and
/// on failure it is wiped.
fn utf8_value(mut bytes: Zeroizing<Vec<u8>>, path: &Path) -> Result<SecretValue, Failure> {
    match String::from_utf8(std::mem::take(&mut *bytes)) {
        Ok(s) => Ok(SecretValue::new(s)),
        Err(e) => {
            drop(Zeroizing::new(e.into_bytes()));
            Err(usage(format!(
                "{} is not UTF-8 text: data values are strings (encode binary data, e.g. base64, \
                 first)",
                path.display()
            )))
        }
    }
}

/// A Kubernetes object name (DNS-1123 subdomain), as metadata.name must be.
fn object_name(name: &str) -> Result<String, String> {
    if !dns::is_subdomain(name) {
        return Err(format!(
            "the object name {name:?} is invalid: it must be {}",
            dns::SUBDOMAIN_RULE
        ));
    }
    Ok(name.to_owned())
}

/// `-f MANIFEST`: the plaintext manifest, checked, with its data parsed by the domain rules.
fn from_manifest(path: &Path, args: &SealArgs) -> Result<Sealable, Failure> {
    let bytes = if path == Path::new("-") {
        read_all(std::io::stdin().lock(), MAX_MANIFEST_BYTES, 0)
            .map_err(|e| failed(format!("cannot read the manifest from stdin: {e}")))?
    } else {
        read_limited(path, MAX_MANIFEST_BYTES)?
    };
    let source = if path == Path::new("-") {
        "stdin".to_owned()
    } else {
        path.display().to_string()
    };
    let manifest = parse_manifest(&bytes).map_err(|e| failed(format!("{source}: {e}")))?;
    drop(bytes);
    manifest_to_sealable(manifest, args).map_err(|e| Failure {
        message: format!("{source}: {}", e.message),
        ..e
    })
}

fn manifest_to_sealable(manifest: Manifest, args: &SealArgs) -> Result<Sealable, Failure> {
    let Manifest {
        mut top,
        data,
        data_position,
    } = manifest;
    let field = |top: &Map<String, Value>, name: &str| {
        top.get(name).and_then(Value::as_str).map(str::to_owned)
    };
    let shown = |v: Option<String>| v.map_or_else(|| "missing".to_owned(), |v| format!("{v:?}"));
    match field(&top, "apiVersion") {
        Some(v) if served(&v) => {}
        other => {
            return Err(failed(format!(
                "apiVersion is {}; a ClawSecret's is {:?}",
                shown(other),
                api_version()
            )));
        }
    }
    match field(&top, "kind") {
        Some(v) if v == KIND => {}
        other => {
            return Err(failed(format!(
                "kind is {}; only a ClawSecret can be sealed (a ClawConfig holds no secrets)",
                shown(other)
            )));
        }
    }
    let metadata = match top
        .entry("metadata")
        .or_insert_with(|| Value::Object(Map::new()))
    {
        Value::Object(m) => m,
        _ => return Err(failed("metadata is not an object")),
    };
    let name = match (metadata.get("name"), args.name.as_deref()) {
        (Some(Value::String(n)), Some(flag)) if n != flag => {
            return Err(usage(format!(
                "metadata.name is {n:?} but --name is {flag:?}: the name is bound into the \
                 ciphertext, so they must agree"
            )));
        }
        (Some(Value::String(n)), _) => n.clone(),
        (Some(_), _) => return Err(failed("metadata.name is not a string")),
        (None, Some(flag)) => flag.to_owned(),
        (None, None) => {
            return Err(failed(
                "metadata.name is missing (or pass --name): the object's name is bound into \
                 the ciphertext",
            ));
        }
    };
    let name = object_name(&name).map_err(failed)?;
    let namespace = match (metadata.get("namespace"), args.namespace.as_deref()) {
        (Some(Value::String(n)), Some(flag)) if n != flag => {
            return Err(usage(format!(
                "metadata.namespace is {n:?} but --namespace is {flag:?}: the namespace is \
                 bound into the ciphertext, so they must agree"
            )));
        }
        (Some(Value::String(n)), _) => n.clone(),
        (Some(_), _) => return Err(failed("metadata.namespace is not a string")),
        (None, Some(flag)) => flag.to_owned(),
        (None, None) => {
            return Err(failed(
                "metadata.namespace is missing: the namespace is bound into the ciphertext (a \
                 sealed manifest opens in one namespace only), so set metadata.namespace or \
                 pass --namespace",
            ));
        }
    };
    let namespace = Namespace::parse(&namespace).map_err(|e| failed(e.to_string()))?;
    // The output names both, so `kubectl apply` puts it where it opens.
    metadata.insert("name".into(), Value::String(name.clone()));
    metadata.insert(
        "namespace".into(),
        Value::String(namespace.as_str().to_owned()),
    );
    if metadata
        .get("annotations")
        .and_then(Value::as_object)
        .is_some_and(|a| a.contains_key(LAST_APPLIED))
    {
        return Err(failed(format!(
            "metadata.annotations has {LAST_APPLIED}, which may hold the plaintext data: remove \
             it (seal the manifest you wrote, not one read back from the cluster)"
        )));
    }
    let spec = match top.get("spec") {
        Some(Value::Object(spec)) => spec,
        Some(_) => return Err(failed("spec is not an object")),
        None => return Err(failed("spec is missing: there is no spec.data to seal")),
    };
    if spec.contains_key("sealed") {
        return Err(failed(
            "spec.sealed is set: this ClawSecret was already sealed by the operator (read back \
             from the cluster?); seal the plaintext manifest, with spec.data and no spec.sealed",
        ));
    }
    if spec.contains_key("encryptedData") {
        return Err(failed(
            "spec.encryptedData is set: this manifest is sealed already; to change its data, \
             seal a plaintext manifest again",
        ));
    }
    let data = data.ok_or_else(|| failed("spec.data is missing: there is no data to seal"))?;
    Ok(Sealable {
        namespace,
        name,
        data,
        top,
        data_position,
    })
}

/// The manifest as read. Every field is kept as a generic value except `spec.data`, which is
/// parsed straight into [`SecretData`] (zeroizing values, the domain's key and size rules, and
/// error messages that never quote a value).
struct Manifest {
    /// Top-level fields in order; `spec` without its `data`.
    top: Map<String, Value>,
    data: Option<SecretData>,
    data_position: usize,
}

/// Parses YAML (or JSON, which YAML contains; a document starting with `{` is read as JSON).
///
/// Memory: the file's bytes are in a zeroizing buffer, and the data values end up in zeroizing
/// `SecretValue`s, but the parser in between necessarily makes its own short-lived, unwiped
/// copies of the scalars it reads (the YAML parser's events, serde's strings). They are freed
/// when this returns; this is a short-lived CLI process, and core dumps are off.
fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let text = std::str::from_utf8(bytes).map_err(|_| "the manifest is not UTF-8".to_owned())?;
    if text.trim_start().starts_with('{') {
        let mut de = serde_json::Deserializer::from_str(text);
        let manifest = (&mut de)
            .deserialize_map(ManifestVisitor)
            .and_then(|m| de.end().map(|()| m))
            // serde_json's messages quote only what this visitor writes, plus a position.
            .map_err(|e| format!("not a valid JSON ClawSecret: {e}"))?;
        return Ok(manifest);
    }
    // No snippet of the source in errors: it could show a secret value.
    let options = serde_saphyr::options! { with_snippet: false };
    serde_saphyr::from_str_with_options::<ManifestSeed>(text, options)
        .map(|seed| seed.0)
        .map_err(|e| format!("not a valid YAML ClawSecret: {e}"))
}

/// `Deserialize` for [`Manifest`] through [`ManifestVisitor`].
struct ManifestSeed(Manifest);

impl<'de> de::Deserialize<'de> for ManifestSeed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_map(ManifestVisitor).map(ManifestSeed)
    }
}

struct ManifestVisitor;

impl<'de> Visitor<'de> for ManifestVisitor {
    type Value = Manifest;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a ClawSecret manifest (an object with apiVersion, kind, metadata, spec)")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Manifest, A::Error> {
        let mut top = Map::new();
        let mut data = None;
        let mut data_position = 0;
        while let Some(key) = map.next_key::<String>()? {
            if top.contains_key(&key) {
                return Err(de::Error::custom(format!(
                    "the field {key:?} appears twice"
                )));
            }
            if key == "spec" {
                let spec = map.next_value::<SpecSeed>()?;
                data = spec.data;
                data_position = spec.data_position;
                top.insert(key, Value::Object(spec.rest));
            } else {
                top.insert(key, map.next_value::<Value>()?);
            }
        }
        Ok(Manifest {
            top,
            data,
            data_position,
        })
    }
}

/// `spec`: `data` into [`SecretData`], every other field as it is.
struct SpecSeed {
    rest: Map<String, Value>,
    data: Option<SecretData>,
    data_position: usize,
}

impl<'de> de::Deserialize<'de> for SpecSeed {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct SpecVisitor;
        impl<'de> Visitor<'de> for SpecVisitor {
            type Value = SpecSeed;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("spec as an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<SpecSeed, A::Error> {
                let mut rest = Map::new();
                let mut data = None;
                let mut data_position = 0;
                while let Some(key) = map.next_key::<String>()? {
                    if rest.contains_key(&key) || (key == "data" && data.is_some()) {
                        return Err(de::Error::custom(format!(
                            "spec has the field {key:?} twice"
                        )));
                    }
                    if key == "data" {
                        data_position = rest.len();
                        // The domain's messages name the rule (a bad key, over 1 MiB, empty)
                        // and never quote a value.
                        data = Some(map.next_value::<SecretData>()?);
                    } else {
                        rest.insert(key, map.next_value::<Value>()?);
                    }
                }
                Ok(SpecSeed {
                    rest,
                    data,
                    data_position,
                })
            }
        }
        d.deserialize_map(SpecVisitor)
    }
}

/// Reads a file of at most `limit` bytes into a zeroizing buffer sized from its length up
/// front, so the read does not reallocate (a reallocation leaves an unwiped copy behind).
fn read_limited(path: &Path, limit: usize) -> Result<Zeroizing<Vec<u8>>, Failure> {
    let file = std::fs::File::open(path)
        .map_err(|e| failed(format!("cannot read {}: {e}", path.display())))?;
    let hint = file
        .metadata()
        .map(|m| usize::try_from(m.len()).unwrap_or(usize::MAX))
        .unwrap_or(0);
    if hint > limit {
        return Err(failed(format!(
            "{} is over {} MiB; a ClawSecret's data is at most 1 MiB",
            path.display(),
            limit / (1024 * 1024)
        )));
    }
    read_all(file, limit, hint).map_err(|e| failed(format!("cannot read {}: {e}", path.display())))
}

/// Reads everything into a zeroizing buffer of at most `limit` bytes. When the buffer is full
/// it is copied into one twice the size and the old one is wiped (never a `Vec` reallocation,
/// which would leave the old bytes in freed memory).
fn read_all(
    mut reader: impl Read,
    limit: usize,
    size_hint: usize,
) -> std::io::Result<Zeroizing<Vec<u8>>> {
    // A known size (a file's) is read into a buffer that never grows; stdin starts at 8 KiB.
    let initial = if size_hint > 0 { size_hint } else { 8192 };
    let mut buf = Zeroizing::new(Vec::with_capacity(initial.min(limit) + 1));
    let mut chunk = Zeroizing::new([0u8; 8192]);
    loop {
        let n = match reader.read(chunk.as_mut()) {
            Ok(0) => return Ok(buf),
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.len() + n > limit {
            return Err(std::io::Error::other(format!(
                "it is over {} MiB; a ClawSecret's data is at most 1 MiB",
                limit / (1024 * 1024)
            )));
        }
        if buf.capacity() - buf.len() < n {
            let mut bigger =
                Zeroizing::new(Vec::with_capacity((buf.capacity() * 2).max(buf.len() + n)));
            bigger.extend_from_slice(&buf);
            buf = bigger;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn read_key_file(path: &Path) -> Result<SealingPublicKey, Failure> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        failed(format!(
            "cannot read the sealing key {}: {e}",
            path.display()
        ))
    })?;
    SealingPublicKey::parse(&text).map_err(|e| {
        failed(format!(
            "{}: {e} (get the key with `claw-secrets seal --fetch-key -o {}`)",
            path.display(),
            path.display()
        ))
    })
}

/// Reads the public sealing key from the ConfigMap the operator publishes, with the default
/// kubeconfig.
fn fetch_key(args: &SealArgs) -> Result<SealingPublicKey, Failure> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| failed(format!("could not start the async runtime: {e}")))?;
    let text = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(30), fetch_key_text(args))
            .await
            .map_err(|_| {
                failed(
                    "reading the sealing key from the cluster took over 30 s; check your \
                     kubeconfig and the API server, or pass --key FILE",
                )
            })?
    })?;
    let where_ = format!(
        "ConfigMap {}/{SEALING_KEY_CONFIGMAP} (key {SEALING_KEY_CONFIGMAP_KEY})",
        args.operator_namespace
    );
    SealingPublicKey::parse(&text).map_err(|e| failed(format!("{where_}: {e}")))
}

async fn fetch_key_text(args: &SealArgs) -> Result<String, Failure> {
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::config::KubeConfigOptions;

    let namespace = &args.operator_namespace;
    Namespace::parse(namespace).map_err(|e| usage(format!("--operator-namespace: {e}")))?;
    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let mut config = kube::Config::from_kubeconfig(&options).await.map_err(|e| {
        failed(format!(
            "cannot load the kubeconfig ($KUBECONFIG, else ~/.kube/config) to read the sealing \
             key: {e}; pass the key with --key FILE instead"
        ))
    })?;
    config.connect_timeout = Some(Duration::from_secs(10));
    crate::k8s::component::Component::Cli.identify(&mut config);
    let client = kube::Client::try_from(config)
        .map_err(|e| failed(format!("cannot build a Kubernetes client: {e}")))?;
    let api: kube::Api<ConfigMap> = kube::Api::namespaced(client, namespace);
    let where_ = format!("ConfigMap {namespace}/{SEALING_KEY_CONFIGMAP}");
    let cm = api.get(SEALING_KEY_CONFIGMAP).await.map_err(|e| match &e {
        kube::Error::Api(s) if s.code == 404 => failed(format!(
            "{where_} not found: is the claw-secrets operator (a version with offline sealing) \
             running in namespace {namespace}? Else pass --operator-namespace"
        )),
        kube::Error::Api(s) if s.code == 403 => failed(format!(
            "not allowed to read {where_}: {}; ask for `get` on that ConfigMap (it holds only a \
             public key)",
            s.message
        )),
        _ => failed(format!("cannot read {where_}: {e}")),
    })?;
    cm.data
        .and_then(|mut d| d.remove(SEALING_KEY_CONFIGMAP_KEY))
        .ok_or_else(|| failed(format!("{where_} has no key {SEALING_KEY_CONFIGMAP_KEY:?}")))
}

/// Writes to `-o FILE` (mode 0644, replaced atomically) or stdout.
fn emit(output: Option<&Path>, text: &str) -> Result<(), Failure> {
    let Some(path) = output else {
        let mut out = std::io::stdout().lock();
        return out
            .write_all(text.as_bytes())
            .and_then(|()| out.flush())
            .map_err(|e| failed(format!("cannot write to stdout: {e}")));
    };
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let name = path
        .file_name()
        .ok_or_else(|| usage(format!("-o {}: not a file name", path.display())))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".tmp-{}", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        // The mode given to open is masked by the umask; this one is not.
        f.set_permissions(std::fs::Permissions::from_mode(0o644))?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        failed(format!("cannot write {}: {e}", path.display()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> SealArgs {
        SealArgs {
            file: None,
            from_literal: vec![],
            from_file: vec![],
            namespace: None,
            name: None,
            key: None,
            fetch_key: false,
            operator_namespace: DEFAULT_OPERATOR_NAMESPACE.into(),
            context: None,
            output: None,
        }
    }

    const YAML: &str = "apiVersion: clawbernetes.io/v1beta1
kind: ClawSecret
metadata:
  name: db
  namespace: team-a
  labels:
    app: api
spec:
  name: db.password
  data:
    password: hunter2-canary
    user: admin
  allowedWorkloads: [api-server]
";

    #[test]
    fn yaml_and_json_read_alike_and_data_keeps_its_place() {
        let m = parse_manifest(YAML.as_bytes()).unwrap();
        assert_eq!(m.data.as_ref().unwrap().len(), 2);
        assert_eq!(m.data_position, 1);
        let spec = m.top["spec"].as_object().unwrap();
        assert_eq!(
            spec.keys().collect::<Vec<_>>(),
            ["name", "allowedWorkloads"]
        );
        let json = r#"{"apiVersion":"clawbernetes.io/v1beta1","kind":"ClawSecret",
            "metadata":{"name":"db","namespace":"team-a"},"spec":{"data":{"password":"x"}}}"#;
        let m = parse_manifest(json.as_bytes()).unwrap();
        assert_eq!(m.data.unwrap().get("password").unwrap().expose(), "x");
        let s = manifest_to_sealable(parse_manifest(YAML.as_bytes()).unwrap(), &args()).unwrap();
        let yaml = s.render("QUJD".into()).unwrap();
        assert!(!yaml.contains("hunter2"), "{yaml}");
        let spec_at = yaml.find("name: db.password").unwrap();
        let enc_at = yaml.find("encryptedData: QUJD").unwrap();
        let aw_at = yaml.find("allowedWorkloads").unwrap();
        assert!(spec_at < enc_at && enc_at < aw_at, "{yaml}");
    }

    #[test]
    fn parse_errors_never_quote_a_value() {
        for bad in [
            "apiVersion: x\nspec:\n  data:\n    pin: 918273645\n",
            "apiVersion: x\nspec:\n  data:\n    \"bad key\": hunter2-canary\n",
            "apiVersion: x\nspec:\n  data:\n    k: hunter2-canary\n   bad: [indent\n",
            "apiVersion: x\nspec:\n  data:\n    k: \"hunter2-canary\n",
            "apiVersion: x\nspec:\n  data: hunter2-canary\n",
            "{\"spec\":{\"data\":{\"k\":\"hunter2-canary\",\"k\":\"hunter2-canary\"}}}",
            "{\"spec\":{\"data\":{\"k\":\"hunter2-canary\"}}} trailing",
            "{\"spec\":{\"data\":{\"k\":\"hunter2-canary\"}",
        ] {
            let err = parse_manifest(bad.as_bytes()).err().unwrap_or_default();
            assert!(!err.is_empty(), "{bad:?} parsed");
            assert!(
                !err.contains("hunter2") && !err.contains("918273645"),
                "{bad:?}: {err}"
            );
        }
        let err = parse_manifest(b"spec:\n  data:\n    \"bad key\": v\n")
            .err()
            .unwrap();
        assert!(err.contains("data key \"bad key\" is invalid"), "{err}");
    }

    #[test]
    fn a_value_repeated_in_clear_elsewhere_is_refused() {
        let leaky = YAML
            .replace("hunter2-canary", "hunter2-canary-long")
            .replace("app: api", "app: hunter2-canary-long");
        let s = manifest_to_sealable(parse_manifest(leaky.as_bytes()).unwrap(), &args()).unwrap();
        let err = s.render("QUJD".into()).err().unwrap().message;
        assert!(
            err.contains("\"password\"") && !err.contains("hunter2"),
            "{err}"
        );
    }

    proptest::proptest! {
        /// Any bytes as a manifest: parsed or refused, never a panic, and a refusal never
        /// quotes a data value (every value here starts with the canary).
        #[test]
        fn any_manifest_is_read_or_refused_without_quoting_a_value(
            bytes in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..256),
            value in "[ -~]{0,24}",
            junk in "[ -~\n]{0,24}",
        ) {
            let _ = parse_manifest(&bytes);
            let canary = format!("CANARY-{value}");
            let yaml = format!("spec:\n  data:\n    k: {canary:?}{junk}\n");
            if let Err(e) = parse_manifest(yaml.as_bytes()) {
                proptest::prop_assert!(!e.contains("CANARY-"), "{}", e);
            }
            let json = format!("{{\"spec\":{{\"data\":{{\"k\":{canary:?}{junk}");
            if let Err(e) = parse_manifest(json.as_bytes()) {
                proptest::prop_assert!(!e.contains("CANARY-"), "{}", e);
            }
        }
    }

    #[test]
    fn the_stdin_reader_grows_without_losing_bytes_and_keeps_its_limit() {
        let input: Vec<u8> = (0..100_000u32).map(|i| i as u8).collect();
        let read = read_all(&input[..], 1 << 20, 0).unwrap();
        assert_eq!(&read[..], &input[..]);
        assert!(read_all(&input[..], 50_000, 0).is_err());
    }
}
