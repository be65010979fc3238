//! `claw-secrets invoke <node-id> <command> '<json params>'`: directly to an agent or a dev
//! server, or to a Node's agent through the API server (docs/architecture.md, "Invoking through
//! the API server").

use clap::Args;
use serde_json::Value;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use super::duration::parse_duration;
use super::kubeconfig::kubeconfig_bearer_token;
use super::{ClientConfig, client_config_path};
use crate::invoke::{
    ClientError, ClientTimeouts, ClientTls, ErrorBody, InvokeClient, InvokeError, LOCAL_NODE_ALIAS,
};
use crate::k8s::component::Component;
use crate::k8s::proxy::{
    AgentLocator, DEFAULT_AGENT_NAMESPACE, DEFAULT_AGENT_SELECTOR, find_agent, post_invoke,
    valid_node_name,
};

const CLUSTER: &str = "Through the API server (a kubeconfig)";

#[derive(Debug, Args)]
pub struct InvokeArgs {
    /// The node to call: `local` or the id `claw-secrets dev` printed, or a Node name.
    ///
    /// Where the call goes, first match wins: (1) --addr: that agent or dev server, directly;
    /// (2) --kubeconfig or --context: the Node's agent through the API server; (3)
    /// $CLAW_SECRETS_ADDR: directly; (4) `local` or the id `claw-secrets dev` printed: the dev
    /// server; (5) a kubeconfig in $KUBECONFIG or ~/.kube/config: the Node's agent through the
    /// API server; (6) the dev server. Through the API server, NODE_ID is a Node name: its
    /// agent pod (--agent-namespace, --agent-selector, scheduled on that Node) is called
    /// through the pod proxy with your kubeconfig's credentials, so you need `list` on pods and
    /// `create` on pods/proxy in the agent namespace (ClusterRole claw-secrets-invoker), and
    /// the agent checks your bearer token (--token, else your kubeconfig's) with TokenReview
    /// and your own RBAC on clawsecrets / clawconfigs.
    node_id: String,
    /// One of secret.create, secret.get, secret.delete, secret.list, secret.rotate,
    /// config.create, config.get, config.update, config.delete, config.list.
    command: String,
    /// The command's parameters as JSON; `-` reads them from stdin (keeps values out of shell history).
    #[arg(default_value = "{}")]
    params: String,
    /// Server address, called directly (default: $CLAW_SECRETS_ADDR, then what `claw-secrets
    /// dev` wrote).
    #[arg(long)]
    addr: Option<String>,
    /// Bearer token (default: $CLAW_SECRETS_TOKEN, then --token-file, then dev's admin token;
    /// through the API server: your kubeconfig's token).
    #[arg(long)]
    token: Option<String>,
    /// A file holding the bearer token.
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// The CA bundle that an `https://` server's certificate must chain to (default: the
    /// system's CA certificates). For agents: `kubectl -n claw-secrets get configmap
    /// claw-secrets-agent-ca -o jsonpath='{.data.ca\.crt}' > agent-ca.crt`.
    #[arg(long, env = "CLAW_SECRETS_CA_FILE", value_name = "PATH")]
    ca_file: Option<PathBuf>,
    /// The name an `https://` server's certificate must carry (default: the address's host,
    /// or the node id when the address is an IP: an agent's certificate names its node).
    #[arg(long, value_name = "NAME")]
    tls_server_name: Option<String>,
    /// Makes retrying this write safe: the server applies it once.
    #[arg(long)]
    idempotency_key: Option<String>,
    /// How long to wait for a connection to the server (or the API server): 500ms, 5s, 1m.
    #[arg(long, env = "CLAW_SECRETS_CONNECT_TIMEOUT", value_name = "DURATION",
        default_value = "5s", value_parser = parse_duration)]
    connect_timeout: Duration,
    /// How long to wait for the answer, in all. Past it: UNAVAILABLE, exit 1, and a write may
    /// or may not have been applied (retry it with the same --idempotency-key to be sure).
    #[arg(long, env = "CLAW_SECRETS_TIMEOUT", value_name = "DURATION", default_value = "30s",
        value_parser = parse_duration)]
    timeout: Duration,
    /// Call the Node's agent through the API server of this kubeconfig (default: $KUBECONFIG,
    /// then ~/.kube/config, when the node id is not the dev server's).
    #[arg(long, conflicts_with = "addr", help_heading = CLUSTER)]
    kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, conflicts_with = "addr", help_heading = CLUSTER)]
    context: Option<String>,
    /// The namespace the agents run in.
    #[arg(long, env = "CLAW_SECRETS_AGENT_NAMESPACE", default_value = DEFAULT_AGENT_NAMESPACE,
        help_heading = CLUSTER)]
    agent_namespace: String,
    /// The label selector of agent pods.
    #[arg(long, default_value = DEFAULT_AGENT_SELECTOR, help_heading = CLUSTER)]
    agent_selector: String,
    /// The agents' node.invoke port (default: the agent container's port named `invoke`,
    /// else 7443).
    #[arg(long, help_heading = CLUSTER)]
    agent_port: Option<u16>,
}

fn usage(msg: impl std::fmt::Display) -> ExitCode {
    eprintln!("usage error: {msg}");
    ExitCode::from(2)
}

fn read_token_file(path: &Path) -> Result<String, String> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_owned())
        .map_err(|e| format!("cannot read token file {}: {e}", path.display()))
}

/// Where a call goes.
#[derive(Debug, PartialEq, Eq)]
enum Route {
    /// Straight to an agent or dev server.
    Direct(String),
    /// To the Node's agent through the API server, with this kubeconfig (`None`: $KUBECONFIG,
    /// else ~/.kube/config).
    Cluster(Option<PathBuf>),
}

/// The kubeconfig the environment points at, if any: $KUBECONFIG, else ~/.kube/config if it
/// exists.
fn ambient_kubeconfig() -> bool {
    if std::env::var_os("KUBECONFIG").is_some_and(|v| !v.is_empty()) {
        return true;
    }
    std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".kube/config"))
        .is_some_and(|p| p.is_file())
}

/// What [`route`] reads from the environment.
struct Ambient {
    /// `$CLAW_SECRETS_ADDR`, if set and not empty.
    addr: Option<String>,
    /// Whether `$KUBECONFIG` is set or `~/.kube/config` exists.
    kubeconfig: bool,
}

impl Ambient {
    fn read() -> Self {
        Ambient {
            addr: std::env::var("CLAW_SECRETS_ADDR")
                .ok()
                .filter(|a| !a.is_empty()),
            kubeconfig: ambient_kubeconfig(),
        }
    }
}

/// The rule written in `--help` of NODE_ID and in docs/architecture.md.
fn route(args: &InvokeArgs, dev: Option<&ClientConfig>, env: &Ambient) -> Result<Route, String> {
    if let Some(addr) = &args.addr {
        return Ok(Route::Direct(addr.clone()));
    }
    let is_dev_node =
        args.node_id == LOCAL_NODE_ALIAS || dev.is_some_and(|c| c.node_id == args.node_id);
    if args.kubeconfig.is_some() || args.context.is_some() {
        if args.node_id == LOCAL_NODE_ALIAS {
            return Err(format!(
                "`{LOCAL_NODE_ALIAS}` names the dev server on this machine; through the API \
                 server, name a Node (`kubectl get nodes`)"
            ));
        }
        return Ok(Route::Cluster(args.kubeconfig.clone()));
    }
    if let Some(addr) = &env.addr {
        return Ok(Route::Direct(addr.clone()));
    }
    if !is_dev_node && env.kubeconfig {
        return Ok(Route::Cluster(None));
    }
    match dev {
        Some(c) => Ok(Route::Direct(c.addr.clone())),
        None => Err(
            "no server address: pass --addr, set CLAW_SECRETS_ADDR, point KUBECONFIG at \
             a cluster (and name a Node), or start `claw-secrets dev`"
                .to_owned(),
        ),
    }
}

/// The token given explicitly: --token, $CLAW_SECRETS_TOKEN, --token-file.
fn explicit_token(args: &InvokeArgs) -> Option<Result<String, String>> {
    match (
        &args.token,
        std::env::var("CLAW_SECRETS_TOKEN").ok(),
        &args.token_file,
    ) {
        (Some(t), _, _) => Some(Ok(t.clone())),
        (None, Some(t), _) => Some(Ok(t)),
        (None, None, Some(f)) => Some(read_token_file(f)),
        (None, None, None) => None,
    }
}

pub fn run(args: InvokeArgs) -> ExitCode {
    let raw = if args.params == "-" {
        let mut s = String::new();
        if let Err(e) = std::io::stdin().read_to_string(&mut s) {
            return usage(format!("cannot read params from stdin: {e}"));
        }
        s
    } else {
        args.params.clone()
    };
    let params: Value = match serde_json::from_str(&raw) {
        Ok(v) => v,
        Err(e) => {
            return usage(format!(
                "params are not valid JSON (line {}, column {}); quote them in single quotes: '{{\"name\":\"x\"}}'",
                e.line(),
                e.column()
            ));
        }
    };

    let dev_config: Option<ClientConfig> = std::fs::read(client_config_path())
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok());
    let route = match route(&args, dev_config.as_ref(), &Ambient::read()) {
        Ok(r) => r,
        Err(e) => return usage(e),
    };
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("INTERNAL: could not start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let timeouts = ClientTimeouts {
        connect: args.connect_timeout,
        request: args.timeout,
    };
    tracing::debug!(node = %args.node_id, command = %args.command, route = ?route, "invoking");
    let result = match route {
        Route::Direct(addr) => {
            let token = explicit_token(&args).unwrap_or_else(|| match &dev_config {
                Some(c) => read_token_file(&c.token_file),
                None => Err("no token: pass --token or --token-file, set CLAW_SECRETS_TOKEN, or start `claw-secrets dev`".to_owned()),
            });
            let token = match token {
                Ok(t) => t,
                Err(e) => return usage(e),
            };
            let tls = ClientTls {
                ca_file: args.ca_file.clone(),
                server_name: args.tls_server_name.clone(),
            };
            let client = match InvokeClient::new(&addr, &args.node_id, &token, timeouts, &tls) {
                Ok(c) => c,
                Err(e) => return usage(e),
            };
            runtime.block_on(client.invoke(
                &args.node_id,
                &args.command,
                params,
                args.idempotency_key.as_deref(),
            ))
        }
        Route::Cluster(kubeconfig) => {
            if !valid_node_name(&args.node_id) {
                return usage(format!(
                    "{:?} is not a Node name (lowercase letters, digits, '-' and '.'); through \
                     the API server the node id is a Node name (`kubectl get nodes`)",
                    args.node_id
                ));
            }
            let call = through_api_server(&args, kubeconfig.as_deref(), params);
            runtime.block_on(async {
                tokio::time::timeout(args.timeout, call)
                    .await
                    .unwrap_or_else(|_| {
                        Err(ClientError::Timeout {
                            addr: "the API server (on the way to the agent)".to_owned(),
                            after: args.timeout,
                        })
                    })
            })
        }
    };
    match result {
        Ok(payload) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&payload).expect("json prints")
            );
            ExitCode::SUCCESS
        }
        Err(ClientError::Remote(err)) => {
            eprintln!("{}: {}", err.code, err.message);
            ExitCode::FAILURE
        }
        Err(ClientError::Usage(msg)) => usage(msg),
        Err(e) => {
            eprintln!("UNAVAILABLE: {e}");
            ExitCode::FAILURE
        }
    }
}

fn remote(e: InvokeError) -> ClientError {
    ClientError::Remote(ErrorBody {
        code: e.code,
        message: e.message,
    })
}

/// Loads the kubeconfig, finds the Node's agent pod and calls it through the pod proxy,
/// forwarding the caller's bearer token for the agent to check.
async fn through_api_server(
    args: &InvokeArgs,
    kubeconfig: Option<&Path>,
    params: Value,
) -> Result<Value, ClientError> {
    use kube::config::{KubeConfigOptions, Kubeconfig};

    let options = KubeConfigOptions {
        context: args.context.clone(),
        ..KubeConfigOptions::default()
    };
    let config = match kubeconfig {
        Some(path) => {
            let file = Kubeconfig::read_from(path).map_err(|e| {
                ClientError::Usage(format!("cannot read kubeconfig {}: {e}", path.display()))
            })?;
            kube::Config::from_custom_kubeconfig(file, &options).await
        }
        None => kube::Config::from_kubeconfig(&options).await,
    };
    let mut config = config.map_err(|e| {
        ClientError::Usage(format!(
            "cannot load the kubeconfig ({}): {e}",
            kubeconfig.map_or_else(
                || "$KUBECONFIG, else ~/.kube/config".to_owned(),
                |p| p.display().to_string()
            )
        ))
    })?;

    let token = match explicit_token(args) {
        Some(t) => t.map_err(ClientError::Usage)?,
        None => kubeconfig_bearer_token(&config.auth_info)
            .map_err(ClientError::Usage)?
            .ok_or_else(|| {
                ClientError::Usage(
                    "your kubeconfig authenticates with a client certificate, which the API \
                     server cannot forward to the agent; give the agent a bearer token to check \
                     as well: --token \"$(kubectl create token <serviceaccount> -n <namespace>)\", \
                     --token-file or CLAW_SECRETS_TOKEN"
                        .to_owned(),
                )
            })?,
    };

    // An agent's UNAVAILABLE is HTTP 503; kube's default retries would repeat the call (a write,
    // perhaps) for minutes. The caller decides whether to retry.
    config.default_retry = false;
    config.connect_timeout = Some(args.connect_timeout);
    Component::Cli.identify(&mut config);
    let client = kube::Client::try_from(config)
        .map_err(|e| ClientError::Usage(format!("cannot build a Kubernetes client: {e}")))?;
    let locator = AgentLocator {
        namespace: args.agent_namespace.clone(),
        selector: args.agent_selector.clone(),
        port: args.agent_port,
    };
    let agent = find_agent(&client, &args.node_id, &locator)
        .await
        .map_err(remote)?;
    tracing::debug!(pod = %format_args!("{}/{}", agent.namespace, agent.name), port = agent.port,
        "calling the Node's agent through the API server's pod proxy");

    let mut body = serde_json::json!({
        "nodeId": args.node_id,
        "command": args.command,
        "params": params,
    });
    if let Some(k) = &args.idempotency_key {
        body["idempotencyKey"] = Value::String(k.clone());
    }
    let resp = post_invoke(
        &client,
        &agent,
        &token,
        serde_json::to_vec(&body).expect("json"),
    )
    .await
    .map_err(remote)?;
    tracing::debug!(ok = ?resp.get("ok"), "the agent answered");
    if resp.get("ok") == Some(&Value::Bool(true)) {
        return Ok(resp.get("payload").cloned().unwrap_or(Value::Null));
    }
    resp.get("error")
        .cloned()
        .and_then(|e| serde_json::from_value::<ErrorBody>(e).ok())
        .map_or_else(
            || {
                Err(remote(InvokeError::new(
                    crate::domain::ErrorCode::Unavailable,
                    format!(
                        "the agent pod {}/{} answered without a payload or an error",
                        agent.namespace, agent.name
                    ),
                )))
            },
            |e| Err(ClientError::Remote(e)),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: InvokeArgs,
    }

    fn args(argv: &[&str]) -> InvokeArgs {
        let mut full = vec!["invoke"];
        full.extend_from_slice(argv);
        Cli::try_parse_from(full).expect("valid arguments").args
    }

    fn dev() -> ClientConfig {
        ClientConfig {
            addr: "http://127.0.0.1:7070".into(),
            node_id: "dev-box".into(),
            token_file: "/nonexistent".into(),
            data_dir: "/nonexistent".into(),
        }
    }

    const NOTHING: Ambient = Ambient {
        addr: None,
        kubeconfig: false,
    };
    const KUBE: Ambient = Ambient {
        addr: None,
        kubeconfig: true,
    };

    #[test]
    fn the_route_follows_the_documented_rule() {
        let direct = |a: &str| Ok(Route::Direct(a.to_owned()));
        let dev = Some(dev());
        let dev = dev.as_ref();
        let env_addr = Ambient {
            addr: Some("http://10.0.0.9:7443".into()),
            kubeconfig: true,
        };
        // (1) --addr wins over everything.
        let a = args(&["node-a", "secret.list", "--addr", "http://h:1"]);
        assert_eq!(route(&a, dev, &env_addr), direct("http://h:1"));
        // (2) --kubeconfig / --context beat $CLAW_SECRETS_ADDR.
        let a = args(&["node-a", "secret.list", "--kubeconfig", "/k"]);
        assert_eq!(
            route(&a, dev, &env_addr),
            Ok(Route::Cluster(Some("/k".into())))
        );
        let a = args(&["node-a", "secret.list", "--context", "prod"]);
        assert_eq!(route(&a, None, &NOTHING), Ok(Route::Cluster(None)));
        let a = args(&["local", "secret.list", "--context", "prod"]);
        assert!(route(&a, dev, &KUBE).unwrap_err().contains("name a Node"));
        // (3) $CLAW_SECRETS_ADDR.
        let a = args(&["node-a", "secret.list"]);
        assert_eq!(route(&a, dev, &env_addr), direct("http://10.0.0.9:7443"));
        // (4) `local` and the dev server's id stay on the dev server, kubeconfig or not.
        for node in ["local", "dev-box"] {
            let a = args(&[node, "secret.list"]);
            assert_eq!(route(&a, dev, &KUBE), direct("http://127.0.0.1:7070"));
        }
        // (5) any other node id with a kubeconfig around: through the API server.
        assert_eq!(route(&a, dev, &KUBE), Ok(Route::Cluster(None)));
        // (6) else the dev server (which answers NOT_FOUND for another node), or nothing.
        assert_eq!(route(&a, dev, &NOTHING), direct("http://127.0.0.1:7070"));
        assert!(
            route(&a, None, &NOTHING)
                .unwrap_err()
                .contains("KUBECONFIG")
        );
        // --addr and --kubeconfig contradict each other.
        let both = [
            "invoke",
            "n",
            "c",
            "{}",
            "--addr",
            "h:1",
            "--kubeconfig",
            "/k",
        ];
        assert!(Cli::try_parse_from(both).is_err());
    }
}
