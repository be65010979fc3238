//! `node.invoke` through the API server: find a Node's agent pod and call it through the pod
//! proxy (`/api/v1/namespaces/NS/pods/https:POD:PORT/proxy/v1/invoke`), with the caller's own
//! kubeconfig credentials, so Kubernetes authenticates the caller and RBAC decides whether they
//! may reach the agent at all (`list` on `pods` to find it, `create` on `pods/proxy` to call it).
//!
//! The API server removes the caller's `Authorization` header before it forwards a request, so
//! the caller's bearer token also travels in [`FORWARDED_AUTHORIZATION`]; the agent checks it
//! with TokenReview exactly like `Authorization`, and authorizes the call on that identity.
//! The API server reaches the agent over HTTPS, but does not verify the agent's certificate
//! (Kubernetes' pod proxy never does): that hop is encrypted, and the caller trusts the API
//! server to reach the pod it named. A client that must verify the agent itself calls it
//! directly (`--addr https://…` with the agents' CA bundle). See docs/architecture.md,
//! "Invoking through the API server".

use http_body_util::BodyExt;
use hyper::body::Bytes;
use hyper::http::{Request, StatusCode, header};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use serde_json::Value;

use crate::domain::ErrorCode;
use crate::invoke::{FORWARDED_AUTHORIZATION, InvokeError};

/// Where agents run unless `--agent-namespace` says otherwise.
pub const DEFAULT_AGENT_NAMESPACE: &str = "claw-secrets";
/// The labels of agent pods unless `--agent-selector` says otherwise.
pub const DEFAULT_AGENT_SELECTOR: &str =
    "app.kubernetes.io/name=claw-secrets,app.kubernetes.io/component=agent";
/// The name of the agent container's node.invoke port; its number is used when no port is given.
pub const AGENT_PORT_NAME: &str = "invoke";
/// The agent's port when neither `--agent-port` nor a port named [`AGENT_PORT_NAME`] says.
pub const DEFAULT_AGENT_PORT: u16 = 7443;

/// How to find agents: their namespace, a label selector, and optionally their port.
#[derive(Debug, Clone)]
pub struct AgentLocator {
    pub namespace: String,
    pub selector: String,
    pub port: Option<u16>,
}

impl Default for AgentLocator {
    fn default() -> Self {
        AgentLocator {
            namespace: DEFAULT_AGENT_NAMESPACE.to_owned(),
            selector: DEFAULT_AGENT_SELECTOR.to_owned(),
            port: None,
        }
    }
}

/// The agent pod serving one Node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentPod {
    pub node: String,
    pub namespace: String,
    pub name: String,
    pub port: u16,
}

impl AgentPod {
    /// The API server path that proxies to this pod's `POST /v1/invoke`, over HTTPS (the
    /// `https:` scheme): agents answer nothing else, and the caller's token and the secret
    /// cross the node network encrypted.
    fn invoke_path(&self) -> String {
        format!(
            "/api/v1/namespaces/{}/pods/https:{}:{}/proxy/v1/invoke",
            self.namespace, self.name, self.port
        )
    }
}

/// Whether `s` can be a Node name (a DNS-1123 subdomain), so it is safe in a field selector.
pub fn valid_node_name(s: &str) -> bool {
    crate::domain::dns::is_subdomain(s)
}

fn api_failure(e: kube::Error, doing: &str, needs: &str) -> InvokeError {
    match e {
        kube::Error::Api(status) => {
            let code = match status.code {
                401 => ErrorCode::Unauthenticated,
                403 => ErrorCode::PermissionDenied,
                _ => ErrorCode::Unavailable,
            };
            let hint = match status.code {
                401 => "; the API server did not accept your kubeconfig's credentials".to_owned(),
                403 => format!("; {needs}"),
                _ => String::new(),
            };
            InvokeError::new(
                code,
                format!(
                    "{doing}: the API server answered {}: {}{hint}",
                    status.code, status.message
                ),
            )
        }
        other => InvokeError::new(
            ErrorCode::Unavailable,
            format!("{doing}: the API server could not be reached: {other}"),
        ),
    }
}

/// Finds the agent pod on `node`: a pod of `locator` (namespace, labels) scheduled there with
/// `spec.nodeName`, running and with an IP; the newest ready one if there are several (a
/// rolling update).
pub async fn find_agent(
    client: &kube::Client,
    node: &str,
    locator: &AgentLocator,
) -> Result<AgentPod, InvokeError> {
    if !valid_node_name(node) {
        return Err(InvokeError::invalid(format!(
            "{node:?} is not a Node name (lowercase letters, digits, '-' and '.')"
        )));
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), &locator.namespace);
    let params = ListParams::default()
        .labels(&locator.selector)
        .fields(&format!("spec.nodeName={node}"));
    let list = pods.list(&params).await.map_err(|e| {
        api_failure(
            e,
            &format!("finding the claw-secrets agent on node {node:?}"),
            &format!(
                "finding agents takes `list` on `pods` in namespace {:?} (ClusterRole \
                 claw-secrets-invoker, bound there; docs/rbac.md)",
                locator.namespace
            ),
        )
    })?;
    if list.items.is_empty() {
        return Err(InvokeError::new(
            ErrorCode::NotFound,
            format!(
                "no claw-secrets agent on node {node:?}: no pod in namespace {:?} with labels {:?} \
                 runs there (is {node:?} a Node name, see `kubectl get nodes`? \
                 --agent-namespace and --agent-selector say where agents run)",
                locator.namespace, locator.selector
            ),
        ));
    }
    let ready = |p: &Pod| {
        p.status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
    };
    let usable = |p: &&Pod| {
        p.metadata.deletion_timestamp.is_none()
            && p.status.as_ref().is_some_and(|s| {
                s.phase.as_deref() == Some("Running") && s.pod_ip.as_deref().is_some()
            })
    };
    let best = list.items.iter().filter(usable).max_by(|a, b| {
        (
            ready(a),
            a.metadata.creation_timestamp.as_ref().map(|t| t.0),
        )
            .cmp(&(
                ready(b),
                b.metadata.creation_timestamp.as_ref().map(|t| t.0),
            ))
    });
    let Some(pod) = best else {
        let states: Vec<String> = list
            .items
            .iter()
            .map(|p| {
                format!(
                    "{} ({})",
                    p.metadata.name.as_deref().unwrap_or("?"),
                    if p.metadata.deletion_timestamp.is_some() {
                        "terminating"
                    } else {
                        p.status
                            .as_ref()
                            .and_then(|s| s.phase.as_deref())
                            .unwrap_or("no status")
                    }
                )
            })
            .collect();
        return Err(InvokeError::new(
            ErrorCode::Unavailable,
            format!(
                "the claw-secrets agent on node {node:?} is not running: {}; retry shortly",
                states.join(", ")
            ),
        ));
    };
    let named_port = pod
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| c.ports.iter().flatten())
        .find(|p| p.name.as_deref() == Some(AGENT_PORT_NAME))
        .and_then(|p| u16::try_from(p.container_port).ok());
    Ok(AgentPod {
        node: node.to_owned(),
        namespace: locator.namespace.clone(),
        name: pod.metadata.name.clone().unwrap_or_default(),
        port: locator.port.or(named_port).unwrap_or(DEFAULT_AGENT_PORT),
    })
}

/// Posts an invoke request body to `agent` through the API server's pod proxy, forwarding
/// `token` in [`FORWARDED_AUTHORIZATION`]. Returns the agent's response envelope (which may
/// itself say `ok: false`), or an error when the API server did not let the call through.
pub async fn post_invoke(
    client: &kube::Client,
    agent: &AgentPod,
    token: &str,
    body: Vec<u8>,
) -> Result<Value, InvokeError> {
    let request = Request::post(agent.invoke_path())
        .header(header::CONTENT_TYPE, "application/json")
        .header(FORWARDED_AUTHORIZATION, format!("Bearer {token}"))
        .body(kube::client::Body::from(body))
        .map_err(|e| InvokeError::invalid(format!("the token cannot be sent in a header: {e}")))?;
    let through = format!(
        "agent pod {}/{} on node {:?}, port {}",
        agent.namespace, agent.name, agent.node, agent.port
    );
    let response = client.send(request).await.map_err(|e| {
        InvokeError::new(
            ErrorCode::Unavailable,
            format!("calling the {through} through the API server failed: {e}"),
        )
    })?;
    let status = response.status();
    let bytes: Bytes = response
        .into_body()
        .collect()
        .await
        .map_err(|e| {
            InvokeError::new(
                ErrorCode::Unavailable,
                format!("reading the answer of the {through} failed: {e}"),
            )
        })?
        .to_bytes();
    interpret(status, &bytes, agent, &through)
}

/// The agent's envelope, or what the API server's own answer (a `Status`) means.
fn interpret(
    status: StatusCode,
    bytes: &[u8],
    agent: &AgentPod,
    through: &str,
) -> Result<Value, InvokeError> {
    let body: Option<Value> = serde_json::from_slice(bytes).ok();
    if let Some(v) = &body
        && v.get("ok").is_some_and(Value::is_boolean)
    {
        return Ok(body.unwrap_or_default());
    }
    let message = body
        .as_ref()
        .filter(|v| v.get("kind").and_then(Value::as_str) == Some("Status"))
        .and_then(|v| v.get("message").and_then(Value::as_str))
        .map(str::to_owned);
    let Some(message) = message else {
        return Err(InvokeError::new(
            ErrorCode::Unavailable,
            format!(
                "the {through} answered HTTP {} through the API server with a body that is \
                 neither an invoke response nor a Kubernetes Status",
                status.as_u16()
            ),
        ));
    };
    Err(match status.as_u16() {
        401 => InvokeError::new(
            ErrorCode::Unauthenticated,
            format!("the API server did not accept your kubeconfig's credentials: {message}"),
        ),
        403 => InvokeError::new(
            ErrorCode::PermissionDenied,
            format!(
                "the API server refused to proxy to the {through}: {message}; calling agents \
                 through the API server takes `create` on `pods/proxy` in namespace {:?} \
                 (ClusterRole claw-secrets-invoker, bound there; docs/rbac.md)",
                agent.namespace
            ),
        ),
        code => InvokeError::new(
            ErrorCode::Unavailable,
            format!("the API server could not reach the {through} (HTTP {code}): {message}"),
        ),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn agent() -> AgentPod {
        AgentPod {
            node: "node-a".into(),
            namespace: "claw-secrets".into(),
            name: "claw-secrets-agent-x1".into(),
            port: 7443,
        }
    }

    #[test]
    fn node_names_are_dns_subdomains() {
        for ok in ["node-a", "ip-10-0-0-1.ec2.internal", "a", "0"] {
            assert!(valid_node_name(ok), "{ok}");
        }
        let long = "a".repeat(254);
        for bad in [
            "",
            "Node-A",
            "-a",
            "a-",
            "a..b",
            "a,b",
            "a=b",
            "node a",
            long.as_str(),
        ] {
            assert!(!valid_node_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn the_proxy_path_names_pod_and_port() {
        assert_eq!(
            agent().invoke_path(),
            "/api/v1/namespaces/claw-secrets/pods/https:claw-secrets-agent-x1:7443/proxy/v1/invoke"
        );
    }

    #[test]
    fn answers_are_told_apart() {
        let a = agent();
        // The agent's own envelope passes through, whatever its HTTP status.
        let denied = br#"{"id":"r","ok":false,"error":{"code":"PERMISSION_DENIED","message":"m"}}"#;
        let v = interpret(StatusCode::FORBIDDEN, denied, &a, "t").unwrap();
        assert_eq!(v["error"]["code"], "PERMISSION_DENIED");
        // The API server's Status is translated.
        let status = |code: u16, msg: &str| {
            serde_json::to_vec(&serde_json::json!({
                "kind": "Status", "apiVersion": "v1", "status": "Failure",
                "message": msg, "code": code
            }))
            .unwrap()
        };
        let e = interpret(
            StatusCode::FORBIDDEN,
            &status(403, "cannot create resource \"pods/proxy\""),
            &a,
            "t",
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::PermissionDenied);
        assert!(e.message.contains("claw-secrets-invoker"), "{}", e.message);
        let e = interpret(
            StatusCode::SERVICE_UNAVAILABLE,
            &status(503, "error trying to reach service"),
            &a,
            "t",
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
        let e = interpret(
            StatusCode::UNAUTHORIZED,
            &status(401, "Unauthorized"),
            &a,
            "t",
        )
        .unwrap_err();
        assert_eq!(e.code, ErrorCode::Unauthenticated);
        let e = interpret(StatusCode::BAD_GATEWAY, b"<html>", &a, "t").unwrap_err();
        assert_eq!(e.code, ErrorCode::Unavailable);
    }
}
