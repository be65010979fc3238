//! `claw-secrets dev`: the whole node.invoke API on one machine.

use clap::Args;
use std::fs;
use std::net::SocketAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use super::{ClientConfig, client_config_path};
use crate::audit;
use crate::backends::local::tokens::{TokenEntry, TokenStore, add_token};
use crate::backends::local::{StoreRepository, TOKENS_REFRESH, TokenAuthorizer, TokensPrincipal};
use crate::crypto::{Keyring, SharedKeyring};
use crate::invoke::gateway::GatewayNode;
use crate::invoke::{CommandCore, Dispatcher};
use crate::store::{Store, create_private_dir, ensure_private_file, write_private_file_atomic};

#[derive(Debug, Args)]
pub struct DevArgs {
    /// Where the encrypted store, master key, tokens and audit log live (the default is
    /// $XDG_DATA_HOME/claw-secrets/dev when XDG_DATA_HOME is set).
    #[arg(long, env = "CLAW_SECRETS_DATA_DIR", default_value_os_t = super::default_data_dir())]
    data_dir: PathBuf,
    /// Address to listen on. Keep it on loopback unless you serve HTTPS (--tls-cert): dev mode
    /// speaks plain HTTP by default.
    #[arg(long, default_value = "127.0.0.1:7070")]
    listen: SocketAddr,
    /// This node's id, saved in the data dir (default: the saved one; on first start
    /// dev-<hostname>). `local` always reaches this node too.
    #[arg(long)]
    node_id: Option<String>,
    /// Set the store manifest aside and rebuild it from the entries on disk, each of which must
    /// still pass its own MAC. Only after the manifest was lost or damaged and you have decided
    /// to trust the entries as they are: rollback protection starts afresh.
    #[arg(long)]
    rebuild_store_manifest: bool,
    /// Begin a new audit chain when the audit log does not match what this data dir recorded
    /// of it (missing, cut short, edited or rewritten). The old file is kept aside as
    /// audit.log.reset-<time>, and the new chain's first record names the old head. Only once
    /// you know why the log changed.
    #[arg(long)]
    accept_audit_reset: bool,
    #[command(flatten)]
    tls: super::serve_tls::ServeTlsArgs,
    #[command(flatten)]
    http: super::http_limits::HttpLimitArgs,
    #[command(flatten)]
    gateway: super::gateway::GatewayArgs,
}

pub fn run(args: DevArgs) -> ExitCode {
    let Some(runtime) = super::runtime(true) else {
        return ExitCode::FAILURE;
    };
    match runtime.block_on(serve(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Holds an exclusive lock on the data dir for the server's lifetime, so two servers never
/// write one store. The kernel releases it when the process dies, even by kill -9.
pub(super) struct DataDirLock(#[allow(dead_code)] fs::File);

fn lock_data_dir(dir: &Path) -> Result<DataDirLock, String> {
    try_lock_data_dir(dir)?.ok_or_else(|| {
        format!(
            "another claw-secrets server is using {}; stop it or pass another --data-dir",
            dir.display()
        )
    })
}

/// The data dir's lock, or `None` while a server holds it (`keys --data-dir` then asks that
/// server).
pub(super) fn try_lock_data_dir(dir: &Path) -> Result<Option<DataDirLock>, String> {
    let path = dir.join("lock");
    let file = fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(Some(DataDirLock(file))),
        Err(fs::TryLockError::WouldBlock) => Ok(None),
        Err(fs::TryLockError::Error(e)) => Err(format!("cannot lock {}: {e}", path.display())),
    }
}

/// The data dir's keyring; a new one only for a data dir without a store.
pub(super) fn load_or_create_keyring(data_dir: &Path) -> Result<(Keyring, bool), String> {
    let path = &data_dir.join("master.key");
    ensure_private_file(path).map_err(|e| e.to_string())?;
    match fs::read(path) {
        Ok(bytes) => {
            let bytes = zeroize::Zeroizing::new(bytes);
            Keyring::from_json(&bytes)
                .map(|k| (k, false))
                .map_err(|e| format!("{}: {e}", path.display()))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && Store::exists_in(data_dir) => {
            Err(format!(
                "master key {} is missing, but {} holds a store written with one{}: restore master.key from your backup (without it the store cannot be read, and a new key would seal writes the old one cannot read). To start afresh instead, move the data dir aside",
                path.display(),
                data_dir.display(),
                match Store::key_ids_in(data_dir).as_slice() {
                    [] => String::new(),
                    ids => format!(
                        " ({})",
                        ids.iter()
                            .map(|k| k.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                }
            ))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let ring = Keyring::generate().map_err(|e| e.to_string())?;
            write_private_file_atomic(path, &ring.to_json()).map_err(|e| e.to_string())?;
            Ok((ring, true))
        }
        Err(e) => Err(format!("cannot read master key {}: {e}", path.display())),
    }
}

/// A node id from the hostname, made a valid DNS label.
fn default_node_id() -> String {
    let host = fs::read_to_string("/proc/sys/kernel/hostname").unwrap_or_default();
    let label: String = host
        .trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(50)
        .collect();
    let label = label.trim_matches('-');
    if label.is_empty() {
        "dev".to_owned()
    } else {
        format!("dev-{label}")
    }
}

fn node_id(data_dir: &Path, requested: Option<String>) -> Result<String, String> {
    let path = data_dir.join("node-id");
    let id = match requested {
        Some(id) => id,
        None => match fs::read_to_string(&path) {
            Ok(s) => s.trim().to_owned(),
            Err(_) => default_node_id(),
        },
    };
    if !crate::domain::dns::is_label(&id) {
        return Err(format!(
            "node id {id:?} must be {}",
            crate::domain::dns::LABEL_RULE
        ));
    }
    write_private_file_atomic(&path, format!("{id}\n").as_bytes()).map_err(|e| e.to_string())?;
    Ok(id)
}

async fn serve(args: DevArgs) -> Result<(), String> {
    let data_dir = args.data_dir;
    create_private_dir(&data_dir).map_err(|e| e.to_string())?;
    let _lock = lock_data_dir(&data_dir)?;
    let data_dir = data_dir.canonicalize().unwrap_or(data_dir);

    let key_path = data_dir.join("master.key");
    let (keyring, new_key) = load_or_create_keyring(&data_dir)?;
    let tokens_path = data_dir.join("tokens.json");
    let admin_token_path = data_dir.join("admin.token");
    for path in [&tokens_path, &admin_token_path] {
        ensure_private_file(path).map_err(|e| e.to_string())?;
    }
    let tokens = TokenStore::open(&tokens_path).map_err(|e| e.to_string())?;
    if !tokens.has_admin() || !admin_token_path.exists() {
        let token = add_token(
            &tokens_path,
            TokenEntry {
                sha256: String::new(),
                subject: "admin".to_owned(),
                namespace: None,
                workload: None,
                admin: true,
            },
        )
        .map_err(|e| e.to_string())?;
        write_private_file_atomic(
            &admin_token_path,
            format!("{}\n", token.as_str()).as_bytes(),
        )
        .map_err(|e| e.to_string())?;
    }
    let tokens = TokenStore::open(&tokens_path).map_err(|e| e.to_string())?;
    let node_id = node_id(&data_dir, args.node_id)?;

    let keys = SharedKeyring::new(keyring);
    let (store, report) = Store::open(
        &data_dir,
        keys.clone(),
        crate::store::OpenOptions {
            rebuild_manifest: args.rebuild_store_manifest,
        },
    )
    .map_err(|e| e.to_string())?;
    let store = Arc::new(store);
    let audit_path = data_dir.join("audit.log");
    let (audit, _) = audit::open_anchored(&audit_path, &node_id, &store, args.accept_audit_reset)
        .map_err(|e| e.to_string())?;
    tokio::spawn(audit::keep_anchored(audit.clone(), store.clone()));
    // `claw-secrets keys --data-dir` reaches this server here (master-key rotation, pruning).
    let _control = super::dev_control::serve(
        &data_dir,
        super::dev_keys::DataDirKeys::new(
            data_dir.clone(),
            node_id.clone(),
            keys.clone(),
            store.clone(),
            audit.clone(),
        ),
    );

    let shutdown = super::shutdown_signal();
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("cannot listen on {}: {e}", args.listen))?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    let tls = args
        .tls
        .files()
        .map(super::serve_tls::serve_files)
        .transpose()?;
    if tls.is_none() && !addr.ip().is_loopback() {
        tracing::warn!(%addr, "listening beyond loopback: dev mode speaks plain HTTP without --tls-cert, so bearer tokens and secrets cross the network unencrypted");
    }
    let scheme = if tls.is_some() { "https" } else { "http" };

    let client_config = ClientConfig {
        addr: format!("{scheme}://{addr}"),
        node_id: node_id.clone(),
        token_file: admin_token_path.clone(),
        data_dir: data_dir.clone(),
    };
    let config_path = client_config_path();
    if let Some(parent) = config_path.parent() {
        create_private_dir(parent).map_err(|e| e.to_string())?;
    }
    write_private_file_atomic(
        &config_path,
        &serde_json::to_vec_pretty(&client_config).expect("json"),
    )
    .map_err(|e| e.to_string())?;

    let tokens = Arc::new(tokens);
    tokio::spawn(tokens.clone().refresh_every(TOKENS_REFRESH));
    let gateway = args
        .gateway
        .setup(&data_dir, format!("claw-secrets dev {node_id}"))?;
    let principal = match &gateway {
        Some(g) => {
            let principal = TokensPrincipal::new(tokens.clone(), g.principal.clone());
            // A principal that cannot act is a configuration mistake: say so now, not per call.
            tokens
                .lookup_subject(&g.principal)
                .and_then(|found| found)
                .map_err(|why| format!("--gateway-principal: {why}"))?;
            Some(principal)
        }
        None => None,
    };
    let audit_handle = audit.clone();
    let core = CommandCore::new(
        TokenAuthorizer::new(tokens),
        StoreRepository::new(store.clone()),
        audit,
        node_id.clone(),
        keys,
    );
    let mut dispatcher = Dispatcher::new(core);
    if let Some(g) = &gateway {
        dispatcher = dispatcher.with_readiness_note(g.readiness_note());
    }
    let dispatcher = Arc::new(dispatcher);
    let stop_gateway = tokio_util::sync::CancellationToken::new();
    let gateway_node = match (gateway, principal) {
        (Some(g), Some(principal)) => {
            let line = format!(
                "  gateway:     {} as node {} (calls act as {:?})",
                g.status.url(),
                g.identity.node_id(),
                g.principal
            );
            let node =
                GatewayNode::new(dispatcher.clone(), principal, g).map_err(|e| e.to_string())?;
            Some((line, tokio::spawn(node.run(stop_gateway.clone()))))
        }
        _ => None,
    };

    println!("claw-secrets dev: node {node_id} listening on {scheme}://{addr}");
    println!("  data dir:    {}", data_dir.display());
    println!(
        "  master key:  {}{}",
        key_path.display(),
        if new_key { " (created)" } else { "" }
    );
    println!("  admin token: {}", admin_token_path.display());
    println!("  audit log:   {}", audit_path.display());
    if let Some((line, _)) = &gateway_node {
        println!("{line}");
    }
    println!(
        "  stored:      {} secrets, {} configs",
        report.secrets, report.configs
    );
    if !report.refused.is_empty() {
        println!(
            "  refused:     {} entries failed the integrity check and are not served (see the log; quarantine/ keeps their files)",
            report.refused.len()
        );
    }
    println!(
        "Try it (the CLI finds this server through {}):",
        config_path.display()
    );
    println!(
        "  claw-secrets invoke {node_id} secret.create '{{\"name\":\"db.password\",\"data\":{{\"password\":\"s3cret\"}}}}'"
    );
    println!("  claw-secrets invoke {node_id} secret.get '{{\"name\":\"db.password\"}}'");
    println!("Ctrl-C stops the server.");

    crate::invoke::serve(listener, dispatcher, args.http.limits(), tls, shutdown)
        .await
        .map_err(|e| format!("server failed: {e}"))?;
    // The gateway's calls in flight are answered (and audited) before the log is flushed.
    stop_gateway.cancel();
    if let Some((_, node)) = gateway_node {
        let _ = node.await;
    }
    // Outcome records of the last writes are queued, not yet synced: write them before exiting,
    // and anchor the last one, so nothing of the log can go missing unnoticed while stopped.
    audit_handle
        .flush()
        .await
        .map_err(|e| format!("the audit log could not be flushed: {e}"))?;
    audit::anchor_head(&audit_handle, &store).map_err(|e| e.to_string())?;
    tracing::info!("stopped cleanly");
    Ok(())
}
