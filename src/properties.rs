//! Property tests of the parsers that read outside input (requests, the sealed envelope, the
//! audit log, keyrings, the MAC trailer): arbitrary bytes never panic, answers for bad input
//! never quote it, and what is written reads back as it was. (The store's own files are
//! covered beside their parsers, in `store`.)
//!
//! Each property runs proptest's default 256 cases, a few seconds in all; set PROPTEST_CASES
//! (e.g. `PROPTEST_CASES=100000 cargo test --lib properties`) to run them longer.

use proptest::prelude::*;
use serde_json::Value;
use serde_json::value::RawValue;
use std::collections::BTreeMap;

use crate::audit::chain::{Tail, seal_line, walk};
use crate::crypto::{self, Envelope, Keyring, SecretIdentity};
use crate::domain::{ErrorCode, Kind, Name, Namespace, SecretData, Version};
use crate::invoke::{Command, InvokeRequest};

const COMMANDS: [&str; 11] = [
    "secret.create",
    "secret.get",
    "secret.list",
    "secret.rotate",
    "secret.delete",
    "config.create",
    "config.get",
    "config.list",
    "config.update",
    "config.delete",
    "secret.unknown",
];

/// A value every data value in a generated request starts with: an error message holding it
/// would be quoting a value back.
const CANARY: &str = "CANARY-";

/// Any JSON, with the params' own keys likely; with `canary`, every string leaf starts with
/// [`CANARY`].
fn json(canary: bool) -> impl Strategy<Value = Value> {
    let key = prop_oneof![
        Just("name".to_owned()),
        Just("data".to_owned()),
        Just("newData".to_owned()),
        Just("allowed_workloads".to_owned()),
        Just("prefix".to_owned()),
        Just("namespace".to_owned()),
        Just("immutable".to_owned()),
        Just("expectedVersion".to_owned()),
        "[a-zA-Z_.-]{1,8}",
    ];
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        ".{0,12}".prop_map(move |s| if canary {
            Value::String(format!("{CANARY}{s}"))
        } else {
            Value::String(s)
        }),
        "[a-z0-9.-]{1,12}".prop_map(move |s| if canary {
            Value::String(format!("{CANARY}{s}"))
        } else {
            Value::String(s)
        }),
    ];
    leaf.prop_recursive(4, 48, 6, move |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(key.clone(), inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Params: any JSON (names, namespaces and flags may be quoted back in an error: they are not
/// secret); and, most of the time, `data` and `newData` holding canaries (which must not be).
fn params() -> impl Strategy<Value = Value> {
    (
        json(false),
        prop::option::of(json(true)),
        prop::option::of(json(true)),
    )
        .prop_map(|(mut params, data, new_data)| {
            if let Value::Object(map) = &mut params {
                if let Some(d) = data {
                    map.insert("data".to_owned(), d);
                }
                if let Some(d) = new_data {
                    map.insert("newData".to_owned(), d);
                }
            }
            params
        })
}

fn name() -> impl Strategy<Value = String> {
    "[a-z0-9][a-z0-9._-]{0,40}"
}

/// Valid secret data: keys of the key alphabet, any string values.
fn secret_data() -> impl Strategy<Value = BTreeMap<String, String>> {
    prop::collection::btree_map("[A-Za-z0-9._-]{1,16}", ".{0,64}", 1..6)
}

fn keyring() -> Keyring {
    Keyring::generate().unwrap()
}

proptest! {
    /// Arbitrary bytes as a request body: parsed or refused, never a panic.
    #[test]
    fn any_bytes_are_a_request_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = serde_json::from_slice::<InvokeRequest>(&bytes);
    }

    /// Every command's params parser, on any JSON: a command, or INVALID_ARGUMENT (an unknown
    /// command: NOT_FOUND... whichever the protocol says) that names a rule and quotes no value.
    #[test]
    fn any_params_parse_or_are_refused_without_quoting_a_value(
        command in prop::sample::select(COMMANDS.as_slice()),
        params in params(),
    ) {
        let raw = RawValue::from_string(params.to_string()).unwrap();
        if let Err(e) = Command::parse(command, Some(&raw)) {
            prop_assert!(!e.message.is_empty());
            prop_assert!(!e.message.contains(CANARY), "{}", e.message);
            if command != "secret.unknown" {
                prop_assert_eq!(e.code, ErrorCode::InvalidArgument, "{}", e.message);
            }
        }
    }

    /// A well-formed secret.create parses into exactly what was sent.
    #[test]
    fn secret_create_params_round_trip(name in name(), data in secret_data()) {
        let params = serde_json::json!({"name": name, "data": data});
        let raw = RawValue::from_string(params.to_string()).unwrap();
        match Command::parse("secret.create", Some(&raw)) {
            Ok(Command::SecretCreate(p)) => {
                prop_assert_eq!(p.name.as_str(), name.as_str());
                let parsed: BTreeMap<String, String> = p
                    .data
                    .iter()
                    .map(|(k, v)| (k.as_str().to_owned(), v.expose().to_owned()))
                    .collect();
                prop_assert_eq!(parsed, data);
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }

    /// Arbitrary bytes as a sealed envelope: parsed or refused, never a panic; what parses
    /// writes back to the same bytes.
    #[test]
    fn any_bytes_are_an_envelope_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(envelope) = Envelope::from_bytes(&bytes) {
            prop_assert_eq!(envelope.to_bytes(), bytes);
        }
    }

    /// Sealed data opens to itself for its identity, and for no other; any byte of the
    /// envelope changed and it does not open at all.
    #[test]
    fn sealed_data_opens_only_as_sealed(
        name in name(),
        data in secret_data(),
        flip_at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let ring = keyring();
        let namespace = Namespace::default_namespace();
        let name = Name::parse(&name).unwrap();
        let identity = SecretIdentity { kind: Kind::Secret, namespace: &namespace, name: &name, version: Version::new(1).unwrap() };
        let data: SecretData = serde_json::from_value(serde_json::json!(data)).unwrap();
        let envelope = crypto::seal(&ring, &identity, &data).unwrap();
        let bytes = envelope.to_bytes();
        let reparsed = Envelope::from_bytes(&bytes).unwrap();
        prop_assert!(crypto::open(&ring, &identity, &reparsed).unwrap() == data);

        let next = SecretIdentity { version: Version::new(2).unwrap(), ..identity };
        prop_assert!(crypto::open(&ring, &next, &reparsed).is_err());

        let mut tampered = bytes.clone();
        tampered[flip_at.index(bytes.len())] ^= flip;
        if let Ok(e) = Envelope::from_bytes(&tampered) {
            prop_assert!(crypto::open(&ring, &identity, &e).is_err());
        }
    }

    /// Arbitrary bytes as an audit log: the verifier names a line or accepts, never panics.
    #[test]
    fn any_bytes_are_an_audit_log_or_a_named_failure(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let _ = walk(&bytes[..], Tail::Refuse, |_, _| {});
        let _ = walk(&bytes[..], Tail::Ignore, |_, _| {});
    }

    /// A chain of records verifies with every record counted; any byte of it changed and it
    /// does not.
    #[test]
    fn an_audit_chain_verifies_until_a_byte_of_it_changes(
        reasons in prop::collection::vec(".{0,40}", 1..12),
        byte_at in any::<prop::sample::Index>(),
        flip in 1u8..=255,
    ) {
        let mut log = Vec::new();
        let mut prev = crate::audit::chain::GENESIS.to_owned();
        for (i, reason) in reasons.iter().enumerate() {
            let body = serde_json::to_vec(&serde_json::json!({
                "seq": i as u64 + 1, "reason": reason, "prev": prev,
            })).unwrap();
            let (line, hash) = seal_line(&body);
            log.extend_from_slice(&line);
            log.push(b'\n');
            prev = hash;
        }
        let report = walk(&log[..], Tail::Refuse, |_, _| {}).unwrap();
        prop_assert_eq!(report.records, reasons.len() as u64);
        prop_assert_eq!(report.head, prev);

        let mut tampered = log.clone();
        tampered[byte_at.index(log.len())] ^= flip;
        let verdict = walk(&tampered[..], Tail::Refuse, |_, _| ());
        prop_assert!(verdict.is_err());
    }

    /// Arbitrary bytes as a keyring file: a keyring or an error, never a panic.
    #[test]
    fn any_bytes_are_a_keyring_or_an_error(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
        let _ = Keyring::from_json(&bytes);
    }

    /// A keyring written reads back as the same keyring.
    #[test]
    fn a_keyring_round_trips(rotations in 0usize..4) {
        let mut ring = keyring();
        for _ in 0..rotations {
            ring.rotate_to(crate::crypto::MasterKey::generate().unwrap());
        }
        let back = Keyring::from_json(&ring.to_json()).unwrap();
        prop_assert!(back.same_as(&ring));
    }

    /// The MAC trailer: arbitrary bytes split or not, never panic; what is appended splits
    /// back into the same body and tag.
    #[test]
    fn the_trailer_splits_what_it_appended(
        junk in prop::collection::vec(any::<u8>(), 0..256),
        body in prop::collection::btree_map("[a-z]{1,8}", ".{0,16}", 1..5),
        tag in any::<[u8; 32]>(),
    ) {
        let _ = crate::trailer::split(&junk, "mac");
        let body = serde_json::to_vec(&body).unwrap();
        let line = crate::trailer::append(&body, "mac", &tag);
        let (b, t) = crate::trailer::split(&line, "mac").unwrap();
        prop_assert_eq!(&b[..], &body[..]);
        prop_assert_eq!(t, tag);
    }
}

/// A log without a newline costs one record's worth of memory, not the file's.
#[test]
fn an_audit_line_longer_than_a_record_is_refused_unread() {
    use std::io::Read as _;
    let endless = std::io::repeat(b'x').take(1 << 30);
    let failure = walk(endless, Tail::Ignore, |_, _| {}).unwrap_err();
    assert!(failure.reason.contains("longer than 64 KiB"), "{failure}");
}
