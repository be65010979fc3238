//! The agent's serving certificate, issued through the Kubernetes CertificateSigningRequest API
//! (docs/architecture.md, "TLS to the agent"): what the agent asks for and what the operator
//! signs, in one place.
//!
//! A client knows which node it asks (the `nodeId` of every request), so it verifies that the
//! agent's certificate names that node, whatever address it reached the agent at (the node's
//! IP and hostPort, the pod IP, a port-forward on loopback). The certificate names nothing
//! else: one DNS name, the node's, and no IP address. One node's agent therefore cannot answer
//! for another node, and an address moving between nodes changes nothing.

/// The signer the agents' CSRs name; only the claw-secrets operator approves and signs them.
pub const SIGNER_NAME: &str = "clawbernetes.io/agent-serving";

/// The Secret, in the operator's namespace, that holds the CA signing agent certificates
/// (`ca.crt`, `ca.key`).
pub const CA_SECRET: &str = "claw-secrets-agent-ca";

/// The ConfigMap, in the operator's namespace, that publishes the CA bundle clients verify
/// agents with (`ca.crt`): `kubectl -n claw-secrets get configmap claw-secrets-agent-ca`.
pub const CA_BUNDLE_CONFIGMAP: &str = "claw-secrets-agent-ca";

/// The key of the CA certificate in [`CA_SECRET`] and [`CA_BUNDLE_CONFIGMAP`].
pub const CA_BUNDLE_KEY: &str = "ca.crt";

/// The subject common name of the agent certificate for `node`.
pub fn common_name(node: &str) -> String {
    format!("system:claw-secrets-agent:{node}")
}

/// The usages an agent's CSR asks for: exactly these two, and "key encipherment" may come too
/// (RSA keys used to have it; it grants nothing an ECDSA or Ed25519 serving key could use).
pub const USAGES: [&str; 2] = ["digital signature", "server auth"];
