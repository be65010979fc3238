//! The ten commands of the seed, each parsed from its JSON params into valid domain types.

use serde::Deserialize;
use serde_json::value::RawValue;

use super::InvokeError;
use crate::domain::{ConfigData, Name, NamePrefix, Namespace, SecretData, Version, WorkloadSet};

/// `secret.create`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretCreate {
    pub name: Name,
    #[serde(default)]
    pub namespace: Option<Namespace>,
    pub data: SecretData,
    #[serde(default)]
    pub allowed_workloads: WorkloadSet,
}

/// `secret.rotate`: new data replaces the old, and the version moves up by one. Without
/// `newData` the current data is sealed again, under the active master key, as the next
/// version (after a master-key rotation). With `expectedVersion` it is a check-and-set: it
/// applies only if the secret is at that version (as Vault KV v2's `cas`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct SecretRotate {
    pub name: Name,
    #[serde(default)]
    pub namespace: Option<Namespace>,
    #[serde(default)]
    pub new_data: Option<SecretData>,
    #[serde(default)]
    pub expected_version: Option<Version>,
}

/// `secret.get`, `secret.delete`, `config.get`, `config.delete`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NameParams {
    pub name: Name,
    #[serde(default)]
    pub namespace: Option<Namespace>,
}

/// `secret.list`, `config.list`
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default, deserialize_with = "prefix")]
    pub prefix: NamePrefix,
    #[serde(default)]
    pub namespace: Option<Namespace>,
}

fn prefix<'de, D: serde::Deserializer<'de>>(d: D) -> Result<NamePrefix, D::Error> {
    let s = String::deserialize(d)?;
    NamePrefix::parse(&s).map_err(serde::de::Error::custom)
}

/// `config.create`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigCreate {
    pub name: Name,
    #[serde(default)]
    pub namespace: Option<Namespace>,
    pub data: ConfigData,
    #[serde(default)]
    pub immutable: bool,
}

/// `config.update`: replaces the data. `immutable: true` may be set here too (making a config
/// immutable is one-way, as for a Kubernetes ConfigMap).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigUpdate {
    pub name: Name,
    #[serde(default)]
    pub namespace: Option<Namespace>,
    pub data: ConfigData,
    #[serde(default)]
    pub immutable: Option<bool>,
}

#[derive(Debug)]
pub enum Command {
    SecretCreate(SecretCreate),
    SecretGet(NameParams),
    SecretDelete(NameParams),
    SecretList(ListParams),
    SecretRotate(SecretRotate),
    ConfigCreate(ConfigCreate),
    ConfigGet(NameParams),
    ConfigUpdate(ConfigUpdate),
    ConfigDelete(NameParams),
    ConfigList(ListParams),
}

impl Command {
    pub const NAMES: [&'static str; 10] = [
        "secret.create",
        "secret.get",
        "secret.delete",
        "secret.list",
        "secret.rotate",
        "config.create",
        "config.get",
        "config.update",
        "config.delete",
        "config.list",
    ];

    /// Parses `params` for `command`. Missing params mean `{}` (only the list commands accept that).
    pub fn parse(command: &str, params: Option<&RawValue>) -> Result<Command, InvokeError> {
        let raw = params.map_or("{}", RawValue::get);
        fn p<'a, T: Deserialize<'a>>(command: &str, raw: &'a str) -> Result<T, InvokeError> {
            // serde's derived structs also accept an array of their fields in order; the
            // protocol's params are an object with named fields, nothing else.
            if !raw.trim_start().starts_with('{') {
                return Err(InvokeError::invalid(format!(
                    "params of {command} must be a JSON object of named parameters"
                )));
            }
            let de = &mut serde_json::Deserializer::from_str(raw);
            let value = serde_path_to_error::deserialize(de).map_err(|e| {
                let path = e.path().to_string();
                let inner = sanitize_serde_message(&e.into_inner().to_string());
                let at = if path == "." {
                    String::new()
                } else {
                    format!(" (at {path})")
                };
                InvokeError::invalid(format!("params of {command}{at}: {inner}"))
            })?;
            Ok(value)
        }
        Ok(match command {
            "secret.create" => Command::SecretCreate(p(command, raw)?),
            "secret.get" => Command::SecretGet(p(command, raw)?),
            "secret.delete" => Command::SecretDelete(p(command, raw)?),
            "secret.list" => Command::SecretList(p(command, raw)?),
            "secret.rotate" => Command::SecretRotate(p(command, raw)?),
            "config.create" => Command::ConfigCreate(p(command, raw)?),
            "config.get" => Command::ConfigGet(p(command, raw)?),
            "config.update" => Command::ConfigUpdate(p(command, raw)?),
            "config.delete" => Command::ConfigDelete(p(command, raw)?),
            "config.list" => Command::ConfigList(p(command, raw)?),
            other => {
                return Err(InvokeError::invalid(format!(
                    "unknown command {:?}; the commands are {}",
                    truncate_for_message(other),
                    Command::NAMES.join(", ")
                )));
            }
        })
    }

    /// Whether calls of the command `name` are audited: every secret command (the seed: "All
    /// access is audited"), and every config write (nothing changes unaudited). Config reads
    /// are not (the seed's table: configs are not access-audited).
    pub fn is_audited(name: &str) -> bool {
        name.starts_with("secret.")
            || matches!(name, "config.create" | "config.update" | "config.delete")
    }

    /// Whether the command changes state (and so takes part in idempotency).
    pub fn is_write(&self) -> bool {
        matches!(
            self,
            Command::SecretCreate(_)
                | Command::SecretRotate(_)
                | Command::SecretDelete(_)
                | Command::ConfigCreate(_)
                | Command::ConfigUpdate(_)
                | Command::ConfigDelete(_)
        )
    }

    pub fn name(&self) -> &'static str {
        match self {
            Command::SecretCreate(_) => "secret.create",
            Command::SecretGet(_) => "secret.get",
            Command::SecretDelete(_) => "secret.delete",
            Command::SecretList(_) => "secret.list",
            Command::SecretRotate(_) => "secret.rotate",
            Command::ConfigCreate(_) => "config.create",
            Command::ConfigGet(_) => "config.get",
            Command::ConfigUpdate(_) => "config.update",
            Command::ConfigDelete(_) => "config.delete",
            Command::ConfigList(_) => "config.list",
        }
    }

    /// The object the command names, if any (for the audit record).
    pub fn target_name(&self) -> Option<&Name> {
        match self {
            Command::SecretCreate(c) => Some(&c.name),
            Command::SecretRotate(c) => Some(&c.name),
            Command::ConfigCreate(c) => Some(&c.name),
            Command::ConfigUpdate(c) => Some(&c.name),
            Command::SecretGet(c)
            | Command::SecretDelete(c)
            | Command::ConfigGet(c)
            | Command::ConfigDelete(c) => Some(&c.name),
            Command::SecretList(_) | Command::ConfigList(_) => None,
        }
    }

    /// The namespace the caller asked for, if it named one.
    pub fn requested_namespace(&self) -> Option<&Namespace> {
        match self {
            Command::SecretCreate(c) => c.namespace.as_ref(),
            Command::SecretRotate(c) => c.namespace.as_ref(),
            Command::ConfigCreate(c) => c.namespace.as_ref(),
            Command::ConfigUpdate(c) => c.namespace.as_ref(),
            Command::SecretGet(c)
            | Command::SecretDelete(c)
            | Command::ConfigGet(c)
            | Command::ConfigDelete(c) => c.namespace.as_ref(),
            Command::SecretList(c) | Command::ConfigList(c) => c.namespace.as_ref(),
        }
    }
}

/// Echoing a caller's input back is useful for names and commands, but only in small doses.
pub(crate) fn truncate_for_message(s: &str) -> String {
    const MAX: usize = 64;
    if s.chars().count() <= MAX {
        s.to_owned()
    } else {
        format!("{}...", s.chars().take(MAX).collect::<String>())
    }
}

/// serde's messages quote the offending value ("invalid type: string \"s3cret\", expected a
/// boolean"). A value in the wrong field may be a secret, so the quoted part is replaced by its
/// kind. Field names and our own messages (which quote only names and keys) are kept.
pub(crate) fn sanitize_serde_message(msg: &str) -> String {
    for marker in ["invalid type: ", "invalid value: "] {
        if let Some(start) = msg.find(marker) {
            let after = start + marker.len();
            if let Some(rel_end) = msg[after..].find(", expected ") {
                let unexpected = &msg[after..after + rel_end];
                let kind = unexpected
                    .split([' ', '`', '"'])
                    .next()
                    .filter(|k| !k.is_empty())
                    .unwrap_or("value");
                return format!(
                    "{}{}a {kind}{}",
                    &msg[..start],
                    marker,
                    &msg[after + rel_end..]
                );
            }
            return format!("{}{}(value withheld)", &msg[..start], marker);
        }
    }
    msg.to_owned()
}

/// A deserialization error with every quoted part (`"..."` or `` `...` ``, where serde and
/// serde-value put the offending value) replaced: for errors about whole objects read from the
/// API server, whose messages come in more shapes than [`sanitize_serde_message`] knows and may
/// quote any field's value, plaintext included.
pub(crate) fn withhold_quoted(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    let mut quote: Option<char> = None;
    for c in msg.chars() {
        match quote {
            Some(q) if c == q => quote = None,
            Some(_) => {}
            None if c == '"' || c == '`' => {
                quote = Some(c);
                out.push_str("(value withheld)");
            }
            None => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serde_messages_lose_their_values() {
        let m = sanitize_serde_message(
            "invalid type: string \"hunter2\", expected a boolean at line 1 column 30",
        );
        assert_eq!(
            m,
            "invalid type: a string, expected a boolean at line 1 column 30"
        );
        let m = sanitize_serde_message("invalid type: integer `1234`, expected a string");
        assert!(!m.contains("1234"), "{m}");
    }

    #[test]
    fn quoted_parts_are_withheld() {
        assert_eq!(
            withhold_quoted(r#"Invalid type string "canary-1". Expected u64"#),
            "Invalid type string (value withheld). Expected u64"
        );
        assert_eq!(
            withhold_quoted("invalid type: integer `41`, expected a string"),
            "invalid type: integer (value withheld), expected a string"
        );
        assert!(!withhold_quoted(r#"cut "short"#).contains("short"));
    }

    #[test]
    fn wrong_field_types_do_not_echo_values() {
        let raw = RawValue::from_string(
            r#"{"name":"x","data":{"k":"v"},"immutable":"canary-9f8e"}"#.to_owned(),
        )
        .unwrap();
        let err = Command::parse("config.create", Some(&raw)).unwrap_err();
        assert!(!err.message.contains("canary"), "{err}");
        assert!(
            err.message.contains("immutable") || err.message.contains("boolean"),
            "{err}"
        );
    }
}
