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
const OPTIONAL_USAGE: &str = "key encipherment";

/// The smallest RSA key signed (bits).
const RSA_MIN_BITS: usize = 2048;

/// A request the operator may sign: the node the certificate names, and the requester's public
/// key (a DER SubjectPublicKeyInfo) it certifies. Everything else in the certificate is the
/// operator's own choice, not copied from the request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedRequest {
    pub node: String,
    pub public_key_der: Vec<u8>,
}

/// Why a request is denied: a short CamelCase reason (the Denied condition's `reason`) and a
/// message naming the rule broken and what to do. Neither quotes key material.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub reason: &'static str,
    pub message: String,
}

fn deny(reason: &'static str, message: impl Into<String>) -> Denial {
    Denial {
        reason,
        message: message.into(),
    }
}

/// What the API server recorded about a CertificateSigningRequest and its requester (never
/// what the requester claims about itself: `spec.username` and `spec.extra` are set by the API
/// server from the credentials the CSR was created with).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `spec.username`.
    pub username: &'a str,
    /// `spec.extra`.
    pub extra: Option<&'a std::collections::BTreeMap<String, Vec<String>>>,
    /// `spec.usages`.
    pub usages: &'a [String],
    /// `spec.request`: a PEM "CERTIFICATE REQUEST" (PKCS#10).
    pub pem: &'a [u8],
}

/// Whether the operator may approve and sign `request`, made (per the API server) by
/// `request.username`; `agent_user` is the agents' ServiceAccount as a username
/// (`system:serviceaccount:NAMESPACE:NAME`). All of these must hold:
///
/// - the requester is the agents' ServiceAccount, with a token bound to a pod or Node, so the
///   API server recorded exactly one node name N in `spec.extra`;
/// - the usages are digital signature and server auth (key encipherment allowed too);
/// - the PKCS#10 request parses and its signature verifies (the requester holds the key);
/// - its subject is exactly CN=[`common_name`]\(N\), and its only subject alternative name is
///   the DNS name N (no IP, email or URI; no CA basic constraint);
/// - its key is ECDSA P-256, Ed25519 or RSA of at least 2048 bits.
///
/// So one node's agent can get a certificate for its own node only: the node comes from the
/// token the API server verified, and the request must name that node and nothing else.
pub fn check_request(agent_user: &str, request: Request<'_>) -> Result<ParsedRequest, Denial> {
    use x509_parser::certification_request::X509CertificationRequest;
    use x509_parser::extensions::{GeneralName, ParsedExtension};
    use x509_parser::oid_registry::{
        OID_EC_P256, OID_KEY_TYPE_EC_PUBLIC_KEY, OID_PKCS1_RSAENCRYPTION, OID_SIG_ED25519,
        OID_X509_COMMON_NAME,
    };
    use x509_parser::prelude::FromDer;
    use x509_parser::public_key::PublicKey;

    if request.username != agent_user {
        return Err(deny(
            "NotAgentServiceAccount",
            format!(
                "the request was made by {}, not by the agents' ServiceAccount {agent_user}: only node agents get certificates from signer {SIGNER_NAME} (the operator's --agent-service-account names it)",
                request.username
            ),
        ));
    }
    let nodes: &[String] = request
        .extra
        .and_then(|e| e.get(crate::k8s::delivery::NODE_NAME_EXTRA))
        .map_or(&[], Vec::as_slice);
    let node = match nodes {
        [node] if !node.is_empty() => node.clone(),
        [] => {
            return Err(deny(
                "NotNodeBound",
                format!(
                    "the requester's token is not bound to a node (spec.extra has no {}): the agent must create its CSR with its pod's projected ServiceAccount token",
                    crate::k8s::delivery::NODE_NAME_EXTRA
                ),
            ));
        }
        _ => {
            return Err(deny(
                "NotNodeBound",
                format!(
                    "the requester's token names {} nodes in spec.extra ({}), not exactly one",
                    nodes.len(),
                    crate::k8s::delivery::NODE_NAME_EXTRA
                ),
            ));
        }
    };

    let usages_ok = USAGES.iter().all(|u| request.usages.iter().any(|r| r == u))
        && request
            .usages
            .iter()
            .all(|r| USAGES.contains(&r.as_str()) || r == OPTIONAL_USAGE);
    if !usages_ok {
        return Err(deny(
            "Usages",
            format!(
                "the request asks for usages [{}]; an agent's serving certificate has exactly \"digital signature\" and \"server auth\" (\"key encipherment\" allowed too)",
                request.usages.join(", ")
            ),
        ));
    }

    let bad_request = |what: String| {
        deny(
            "InvalidRequest",
            format!("spec.request is not a valid PKCS#10 certificate request: {what}"),
        )
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(request.pem)
        .map_err(|_| bad_request("it is not PEM".to_owned()))?;
    if pem.label != "CERTIFICATE REQUEST" {
        return Err(bad_request(format!(
            "its PEM block is a {:?}, not a \"CERTIFICATE REQUEST\"",
            pem.label
        )));
    }
    let (rest, csr) = X509CertificationRequest::from_der(&pem.contents)
        .map_err(|_| bad_request("its DER does not parse".to_owned()))?;
    if !rest.is_empty() {
        return Err(bad_request("trailing bytes after it".to_owned()));
    }
    csr.verify_signature().map_err(|_| {
        bad_request("its signature does not verify with the public key it carries".to_owned())
    })?;

    let info = &csr.certification_request_info;
    let wanted_cn = common_name(&node);
    let attributes: Vec<_> = info.subject.iter_attributes().collect();
    let subject_ok = matches!(attributes.as_slice(),
        [cn] if *cn.attr_type() == OID_X509_COMMON_NAME && cn.as_str().ok() == Some(wanted_cn.as_str()));
    if !subject_ok {
        // Only the common names are quoted (what this rule compares), no other attribute.
        let cns: Vec<String> = info
            .subject
            .iter_common_name()
            .filter_map(|cn| cn.as_str().ok())
            .map(str::to_owned)
            .collect();
        let other_node = match (cns.as_slice(), attributes.len()) {
            ([cn], 1) => cn.strip_prefix(&common_name("")).filter(|o| !o.is_empty()),
            _ => None,
        };
        return Err(match other_node {
            Some(other) => deny(
                "WrongNode",
                format!(
                    "the request names node {other} (subject CN={}) but the requester's token is bound to node {node}: an agent gets a certificate for its own node only",
                    common_name(other)
                ),
            ),
            None => deny(
                "Subject",
                format!(
                    "the request's subject has {} attributes, common names [{}]; it must be exactly CN={wanted_cn}, the node the requester's token is bound to",
                    attributes.len(),
                    cns.join(", ")
                ),
            ),
        });
    }

    let mut dns_names = Vec::new();
    let mut other_names = 0usize;
    for ext in csr.requested_extensions().into_iter().flatten() {
        match ext {
            ParsedExtension::SubjectAlternativeName(san) => {
                for name in &san.general_names {
                    match name {
                        GeneralName::DNSName(dns) => dns_names.push((*dns).to_owned()),
                        _ => other_names += 1,
                    }
                }
            }
            ParsedExtension::BasicConstraints(bc) if bc.ca => {
                return Err(deny(
                    "CaRequested",
                    "the request asks for a CA certificate (basic constraints CA:true); an agent's serving certificate is a leaf",
                ));
            }
            // Key usages and the like: the certificate's own are the operator's choice.
            _ => {}
        }
    }
    if other_names > 0 {
        return Err(deny(
            "SubjectAltNames",
            format!(
                "the request names {other_names} subject alternative names that are not DNS names (IP addresses, emails, URIs); an agent's certificate names only its node, DNS name {node}"
            ),
        ));
    }
    match dns_names.as_slice() {
        [only] if *only == node => {}
        [only] => {
            return Err(deny(
                "WrongNode",
                format!(
                    "the request names node {only} but the requester's token is bound to node {node}: an agent gets a certificate for its own node only"
                ),
            ));
        }
        _ => {
            return Err(deny(
                "SubjectAltNames",
                format!(
                    "the request names the DNS names [{}]; an agent's certificate names exactly one, its node's: {node}",
                    dns_names.join(", ")
                ),
            ));
        }
    }

    let spki = &info.subject_pki;
    let algorithm = &spki.algorithm.algorithm;
    let key_ok = if *algorithm == OID_KEY_TYPE_EC_PUBLIC_KEY {
        spki.algorithm
            .parameters
            .as_ref()
            .and_then(|p| p.as_oid().ok())
            .is_some_and(|curve| curve == OID_EC_P256)
    } else if *algorithm == OID_SIG_ED25519 {
        true
    } else if *algorithm == OID_PKCS1_RSAENCRYPTION {
        matches!(spki.parsed(), Ok(PublicKey::RSA(rsa)) if rsa.key_size() >= RSA_MIN_BITS)
    } else {
        false
    };
    if !key_ok {
        return Err(deny(
            "KeyType",
            format!(
                "the request's key (algorithm {algorithm}) is not ECDSA P-256, Ed25519 or RSA of at least {RSA_MIN_BITS} bits"
            ),
        ));
    }
    Ok(ParsedRequest {
        node,
        public_key_der: spki.raw.to_vec(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rcgen::{
        CertificateParams, DistinguishedName, DnType, KeyPair, PKCS_ECDSA_P256_SHA256,
        PKCS_ECDSA_P384_SHA384, PKCS_ED25519, SanType,
    };
    use std::collections::BTreeMap;

    const AGENT: &str = "system:serviceaccount:claw-secrets:claw-secrets-agent";

    /// A PKCS#10 request as the agent makes one, with `cn` and `sans`, and its key.
    fn csr_with(
        key: &KeyPair,
        cn: &str,
        sans: Vec<SanType>,
        edit: impl FnOnce(&mut CertificateParams),
    ) -> String {
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, cn);
        params.distinguished_name = dn;
        params.subject_alt_names = sans;
        edit(&mut params);
        params.serialize_request(key).unwrap().pem().unwrap()
    }

    fn dns(name: &str) -> SanType {
        SanType::DnsName(name.to_owned().try_into().unwrap())
    }

    fn agent_csr(node: &str) -> String {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        csr_with(&key, &common_name(node), vec![dns(node)], |_| {})
    }

    fn extra(nodes: &[&str]) -> BTreeMap<String, Vec<String>> {
        BTreeMap::from([(
            crate::k8s::delivery::NODE_NAME_EXTRA.to_owned(),
            nodes.iter().map(|n| (*n).to_owned()).collect(),
        )])
    }

    fn usages(u: &[&str]) -> Vec<String> {
        u.iter().map(|s| (*s).to_owned()).collect()
    }

    fn check(
        username: &str,
        nodes: &[&str],
        usage: &[&str],
        pem: &str,
    ) -> Result<ParsedRequest, Denial> {
        let extra = extra(nodes);
        let usages = usages(usage);
        check_request(
            AGENT,
            Request {
                username,
                extra: Some(&extra),
                usages: &usages,
                pem: pem.as_bytes(),
            },
        )
    }

    #[test]
    fn an_agents_request_for_its_own_node_is_accepted() {
        let ok = check(AGENT, &["node-a"], &USAGES, &agent_csr("node-a")).unwrap();
        assert_eq!(ok.node, "node-a");
        // The key certified is the request's.
        let key = KeyPair::generate_for(&PKCS_ED25519).unwrap();
        let pem = csr_with(&key, &common_name("node-a"), vec![dns("node-a")], |_| {});
        let ok = check(
            AGENT,
            &["node-a"],
            &["digital signature", "key encipherment", "server auth"],
            &pem,
        )
        .unwrap();
        assert_eq!(
            ok.public_key_der,
            rcgen::PublicKeyData::subject_public_key_info(&key)
        );
    }

    #[test]
    fn a_request_naming_another_node_is_denied() {
        let denial = check(AGENT, &["node-a"], &USAGES, &agent_csr("node-b")).unwrap_err();
        assert_eq!(denial.reason, "WrongNode");
        assert!(
            denial
                .message
                .contains("names node node-b (subject CN=system:claw-secrets-agent:node-b) but the requester's token is bound to node node-a"),
            "{denial:?}"
        );
        // The right CN but another node's DNS name.
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let pem = csr_with(&key, &common_name("node-a"), vec![dns("node-b")], |_| {});
        let denial = check(AGENT, &["node-a"], &USAGES, &pem).unwrap_err();
        assert_eq!(denial.reason, "WrongNode");
        assert!(
            denial
                .message
                .contains("names node node-b but the requester's token is bound to node node-a"),
            "{denial:?}"
        );
    }

    #[test]
    fn only_the_agents_node_bound_tokens_are_signed_for() {
        let pem = agent_csr("node-a");
        let denial = check(
            "system:serviceaccount:claw-secrets:other",
            &["node-a"],
            &USAGES,
            &pem,
        )
        .unwrap_err();
        assert_eq!(denial.reason, "NotAgentServiceAccount");
        let denial = check("kubernetes-admin", &["node-a"], &USAGES, &pem).unwrap_err();
        assert!(denial.message.contains("kubernetes-admin"), "{denial:?}");
        assert_eq!(
            check(AGENT, &[], &USAGES, &pem).unwrap_err().reason,
            "NotNodeBound"
        );
        assert_eq!(
            check(AGENT, &["node-a", "node-b"], &USAGES, &pem)
                .unwrap_err()
                .reason,
            "NotNodeBound"
        );
        let denial = check_request(
            AGENT,
            Request {
                username: AGENT,
                extra: None,
                usages: &usages(&USAGES),
                pem: pem.as_bytes(),
            },
        )
        .unwrap_err();
        assert_eq!(denial.reason, "NotNodeBound");
    }

    #[test]
    fn names_other_than_the_nodes_dns_name_are_denied() {
        let key = KeyPair::generate_for(&PKCS_ECDSA_P256_SHA256).unwrap();
        let ip = SanType::IpAddress("10.0.0.1".parse().unwrap());
        let pem = csr_with(
            &key,
            &common_name("node-a"),
            vec![dns("node-a"), ip],
            |_| {},
        );
        let denial = check(AGENT, &["node-a"], &USAGES, &pem).unwrap_err();
        assert_eq!(denial.reason, "SubjectAltNames");
        let pem = csr_with(
            &key,
            &common_name("node-a"),
            vec![
                dns("node-a"),
                SanType::Rfc822Name("a@b.c".try_into().unwrap()),
            ],
            |_| {},
        );
        assert_eq!(
            check(AGENT, &["node-a"], &USAGES, &pem).unwrap_err().reason,
            "SubjectAltNames"
        );
        let pem = csr_with(
            &key,
            &common_name("node-a"),
            vec![dns("node-a"), dns("node-a.example")],
            |_| {},
        );
        assert_eq!(
            check(AGENT, &["node-a"], &USAGES, &pem).unwrap_err().reason,
            "SubjectAltNames"
        );
        let pem = csr_with(&key, &common_name("node-a"), vec![], |_| {});
        assert_eq!(
            check(AGENT, &["node-a"], &USAGES, &pem).unwrap_err().reason,
            "SubjectAltNames"
        );
        // A subject with more than the CN (an organization, which client certificates map to
        // groups) is refused too.
        let pem = csr_with(&key, &common_name("node-a"), vec![dns("node-a")], |p| {
            p.distinguished_name
                .push(DnType::OrganizationName, "system:masters");
        });
        assert_eq!(
            check(AGENT, &["node-a"], &USAGES, &pem).unwrap_err().reason,
            "Subject"
        );
        let pem = csr_with(&key, "node-a", vec![dns("node-a")], |_| {});
        assert_eq!(
            check(AGENT, &["node-a"], &USAGES, &pem).unwrap_err().reason,
            "Subject"
        );
        let pem = csr_with(&key, &common_name("node-a"), vec![dns("node-a")], |p| {
            p.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        });
        assert_eq!(
            check(AGENT, &["node-a"], &USAGES, &pem).unwrap_err().reason,
            "CaRequested"
        );
    }

    #[test]
    fn usages_and_key_types_are_checked() {
        let pem = agent_csr("node-a");
        for bad in [
            &["digital signature"][..],
            &["digital signature", "server auth", "client auth"],
            &["server auth", "client auth"],
            &[],
        ] {
            assert_eq!(
                check(AGENT, &["node-a"], bad, &pem).unwrap_err().reason,
                "Usages",
                "{bad:?}"
            );
        }
        let p384 = KeyPair::generate_for(&PKCS_ECDSA_P384_SHA384).unwrap();
        let pem = csr_with(&p384, &common_name("node-a"), vec![dns("node-a")], |_| {});
        let denial = check(AGENT, &["node-a"], &USAGES, &pem).unwrap_err();
        assert_eq!(denial.reason, "KeyType");
    }

    #[test]
    fn a_request_whose_signature_does_not_verify_is_denied() {
        let pem = agent_csr("node-a");
        let der = x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents;
        // Flip a bit in the signature (the last bytes of the DER).
        let mut bad = der.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        let bad_pem = pem_of("CERTIFICATE REQUEST", &bad);
        let denial = check(AGENT, &["node-a"], &USAGES, &bad_pem).unwrap_err();
        assert_eq!(denial.reason, "InvalidRequest");
        assert!(denial.message.contains("signature"), "{denial:?}");
        assert_eq!(
            check(AGENT, &["node-a"], &USAGES, "not pem")
                .unwrap_err()
                .reason,
            "InvalidRequest"
        );
        assert_eq!(
            check(AGENT, &["node-a"], &USAGES, &pem_of("CERTIFICATE", &der))
                .unwrap_err()
                .reason,
            "InvalidRequest"
        );
    }

    fn pem_of(label: &str, der: &[u8]) -> String {
        use base64::Engine;
        let b64 = base64::engine::general_purpose::STANDARD.encode(der);
        let lines: Vec<&str> = b64
            .as_bytes()
            .chunks(64)
            .map(|c| std::str::from_utf8(c).unwrap())
            .collect();
        format!(
            "-----BEGIN {label}-----\n{}\n-----END {label}-----\n",
            lines.join("\n")
        )
    }
}
