//! An admission webhook configuration like the chart's (same rules, match condition and
//! failure policy), selecting only given namespaces and calling an operator process at
//! 127.0.0.1: on the test control plane no pods run, so the chart's Service cannot be used
//! (tests/k8s_node.rs runs the chart's webhook in pods).
//!
//! ```ignore
//! #[path = "support/webhook.rs"]
//! mod webhook;
//! ```
#![allow(dead_code)] // every test target uses a different subset

use k8s_openapi::api::admissionregistration::v1::MutatingWebhookConfiguration;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use serde_json::json;

use crate::cluster::{self, Cluster};
use crate::process::free_port;
use crate::random::random_hex;
use crate::wait::eventually;

/// The webhook's name in the chart's configuration: kubectl's refusals name it.
pub const WEBHOOK: &str = "seal.clawsecrets.clawbernetes.io";

/// A webhook configuration for `namespaces`, calling an operator at 127.0.0.1:`port`.
pub struct Webhook {
    configuration: String,
    port: u16,
    client: Client,
    /// The address the operator listens on: 127.0.0.1, or every address
    /// ([`Webhook::on_every_address`]).
    bind: &'static str,
}

impl Webhook {
    pub async fn register(client: &Client, namespaces: &[&str]) -> Webhook {
        let port = free_port();
        let configuration = format!("claw-secrets-test-{}", random_hex(4));
        // deploy/webhook/local-operator.yaml, with its own name, port and namespaces.
        let file = crate::control_plane::repo_root().join("deploy/webhook/local-operator.yaml");
        let text = std::fs::read_to_string(&file).expect("deploy/webhook/local-operator.yaml");
        let mut mwc: MutatingWebhookConfiguration =
            serde_saphyr::from_str(&text).expect("a webhook configuration");
        mwc.metadata.name = Some(configuration.clone());
        let hook = &mut mwc.webhooks.as_mut().expect("webhooks")[0];
        hook.client_config.url = Some(format!("https://127.0.0.1:{port}/seal"));
        hook.namespace_selector = Some(
            serde_json::from_value(json!({ "matchExpressions": [{
                "key": "kubernetes.io/metadata.name", "operator": "In", "values": namespaces,
            }]}))
            .expect("a label selector"),
        );
        Api::<MutatingWebhookConfiguration>::all(client.clone())
            .create(&PostParams::default(), &mwc)
            .await
            .expect("create the webhook configuration");
        Webhook {
            configuration,
            port,
            client: client.clone(),
            bind: "127.0.0.1",
        }
    }

    /// The operator listens on every address of this host, so that the API server's service
    /// proxy can reach it too (it refuses loopback).
    pub fn on_every_address(mut self) -> Self {
        self.bind = "0.0.0.0";
        self
    }

    /// The operator's flags for serving this webhook with a certificate it manages.
    pub fn operator_args(&self) -> Vec<String> {
        [
            "--webhook-addr",
            &format!("{}:{}", self.bind, self.port),
            "--webhook-host",
            "127.0.0.1",
            "--webhook-configuration",
            &self.configuration,
            "--webhook-cert-secret",
            &format!("{}-tls", self.configuration),
        ]
        .map(str::to_owned)
        .to_vec()
    }

    /// Starts an operator serving this webhook, and waits until the API server seals through
    /// it (the operator wrote its CA into the caBundle, and answers).
    pub async fn operator(&self, c: &Cluster) -> cluster::Operator {
        self.operator_on_lease(c, &format!("admission-{}", random_hex(4)))
            .await
    }

    /// [`Webhook::operator`] electing its leader with the Lease `lease` (shared with other
    /// replicas).
    pub async fn operator_on_lease(&self, c: &Cluster, lease: &str) -> cluster::Operator {
        self.operator_with(c, lease, &[]).await
    }

    /// [`Webhook::operator_on_lease`] with further operator flags (`--reencrypt-per-second`,
    /// say).
    pub async fn operator_with(
        &self,
        c: &Cluster,
        lease: &str,
        extra: &[String],
    ) -> cluster::Operator {
        let mut args = self.operator_args();
        args.extend_from_slice(extra);
        let op = cluster::Operator::start_with(
            &c.env.kubeconfig,
            &c.master_key,
            lease,
            Some(c.ns()),
            &args,
        )
        .await;
        let api = c.secrets();
        eventually("the API server to seal through the webhook", || async {
            let probe = cluster::secret_with_data("webhook-probe", &[("k", "v")]);
            let created = api
                .create(
                    &PostParams {
                        dry_run: true,
                        ..PostParams::default()
                    },
                    &probe,
                )
                .await
                .map_err(|e| e.to_string())?;
            match (&created.spec.data, &created.spec.sealed) {
                (None, Some(s)) if s.version == 1 => Ok(()),
                _ => Err("not sealed at admission".to_owned()),
            }
        })
        .await;
        op
    }

    /// Makes the operator reachable by agents as in a cluster: the Service the chart puts in front
    /// of the operator's webhook, `claw-secrets-webhook` port
    /// 443, in `ns`, as the cluster would keep it for an operator pod on `node` at this host's
    /// proxyable address, serving on this webhook's port (listen `on_every_address`). No kubelet or controller runs here, so the Pod's
    /// status and the Endpoints are written by hand; the API server's service proxy goes to an
    /// endpoint only if it names a Pod holding that address.
    pub async fn reachable_by_agents(&self, c: &Cluster, ns: &str, node: &str) {
        let port = self.port;
        use k8s_openapi::api::core::v1::{Endpoints, Pod, Service};
        let ip = crate::host::proxyable_ip().to_string();
        let apply = PatchParams::apply("claw-secrets-tests").force();
        let pods: Api<Pod> = Api::namespaced(c.client(), ns);
        // A Pod of its own per test (a Pod's spec cannot change), force-deleted if left over.
        let pod_name = format!("claw-secrets-operator-test-{}", c.suffix());
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": { "name": pod_name, "namespace": ns },
            "spec": {
                "nodeName": node,
                "containers": [{ "name": "operator", "image": "claw-secrets:test",
                                 "ports": [{ "name": "webhook", "containerPort": port }] }],
            },
        }))
        .unwrap();
        pods.patch(&pod_name, &apply, &Patch::Apply(&pod))
            .await
            .expect("the operator's Pod");
        pods.patch_status(
            &pod_name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "status": {
                "phase": "Running", "podIP": ip, "podIPs": [{ "ip": ip }],
                "conditions": [{ "type": "Ready", "status": "True" }],
            }})),
        )
        .await
        .expect("the operator Pod's status");
        let service: Service = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "claw-secrets-webhook", "namespace": ns },
            "spec": { "ports": [{ "name": "webhook", "port": 443, "targetPort": port, "protocol": "TCP" }] },
        }))
        .unwrap();
        Api::<Service>::namespaced(c.client(), ns)
            .patch("claw-secrets-webhook", &apply, &Patch::Apply(&service))
            .await
            .expect("the operator's Service");
        #[allow(deprecated)]
        let endpoints: Endpoints = serde_json::from_value(serde_json::json!({
            "metadata": { "name": "claw-secrets-webhook", "namespace": ns },
            "subsets": [{
                "addresses": [{ "ip": ip, "nodeName": node, "targetRef": {
                    "kind": "Pod", "name": pod_name, "namespace": ns } }],
                "ports": [{ "name": "webhook", "port": port, "protocol": "TCP" }],
            }],
        }))
        .unwrap();
        #[allow(deprecated)]
        Api::<Endpoints>::namespaced(c.client(), ns)
            .patch("claw-secrets-webhook", &apply, &Patch::Apply(&endpoints))
            .await
            .expect("its Endpoints");
    }

    /// The port the operator serves the webhook (and deliveries) on, at 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The CA the operator wrote into this configuration's caBundle (PEM): what verifies its
    /// serving certificate.
    pub async fn ca_pem(&self) -> String {
        let mwc = Api::<MutatingWebhookConfiguration>::all(self.client.clone())
            .get(&self.configuration)
            .await
            .expect("the webhook configuration");
        let bundle = mwc.webhooks.expect("webhooks")[0]
            .client_config
            .ca_bundle
            .clone()
            .expect("a caBundle");
        String::from_utf8(bundle.0).expect("the caBundle is PEM")
    }

    pub async fn remove(self) {
        let _ = Api::<MutatingWebhookConfiguration>::all(self.client)
            .delete(&self.configuration, &DeleteParams::default())
            .await;
    }
}

/// `GET https://127.0.0.1:<port>/v1/deliveries?<query>` trusting only `ca_pem`, with `token`
/// in the header the API server's service proxy passes on. Returns the status and body.
pub async fn get_deliveries(
    port: u16,
    ca_pem: &str,
    token: Option<&str>,
    query: &str,
) -> (u16, Vec<u8>) {
    use http_body_util::BodyExt;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
    use tokio_rustls::rustls::{ClientConfig, RootCertStore};
    let mut roots = RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(ca_pem.as_bytes()) {
        roots.add(ca.unwrap()).unwrap();
    }
    let tls = ClientConfig::builder_with_provider(std::sync::Arc::new(
        tokio_rustls::rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    let stream = tokio_rustls::TlsConnector::from(std::sync::Arc::new(tls))
        .connect(ServerName::try_from("127.0.0.1").unwrap(), tcp)
        .await
        .expect("the operator's certificate verifies against its CA");
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    let mut request =
        hyper::Request::get(format!("/v1/deliveries?{query}")).header("host", "127.0.0.1");
    if let Some(t) = token {
        request = request.header("x-claw-secrets-authorization", format!("Bearer {t}"));
    }
    let response = sender
        .send_request(
            request
                .body(http_body_util::Empty::<hyper::body::Bytes>::new())
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .unwrap()
        .to_bytes()
        .to_vec();
    (status, body)
}
