//! The five secret commands.

use super::super::{
    Authorizer, Current, Decision, InvokeError, ListParams, NameParams, Payload, Repository,
    Resource, SecretCreate, SecretMeta, SecretRotate, SecretView, Verb,
};
use super::{
    Call, CommandCore, Target, WRITE_ATTEMPTS, across, lost_race, not_found, now, on,
    refused_entry, replay,
};
use crate::crypto::{self, SecretIdentity};
use crate::domain::{ErrorCode, Kind, ObjectKey, SecretData, Version};
use crate::store::{Lookup, SecretRecord};

/// Said to a workload refused a secret, whether or not the secret exists: a caller that may not
/// read a name cannot learn whether it exists either.
const WORKLOAD_RULE: &str = "a workload reads only the secrets of its own namespace whose allowed_workloads name it or are empty";

fn identity(key: &ObjectKey, version: Version) -> SecretIdentity<'_> {
    SecretIdentity {
        kind: Kind::Secret,
        namespace: &key.namespace,
        name: &key.name,
        version,
    }
}

impl<A: Authorizer, R: Repository> CommandCore<A, R> {
    fn open_secret(&self, record: &SecretRecord) -> Result<SecretData, InvokeError> {
        crypto::open(
            &self.keys.current(),
            &identity(&record.key, record.version),
            &record.envelope,
        )
        .map_err(|e| {
            InvokeError::internal(format!(
                "secret {:?} could not be decrypted: {e}",
                record.key.name.as_str()
            ))
        })
    }

    fn seal_secret(
        &self,
        key: &ObjectKey,
        version: Version,
        data: &SecretData,
    ) -> Result<crypto::Envelope, InvokeError> {
        crypto::seal(&self.keys.current(), &identity(key, version), data)
            .map_err(|e| InvokeError::internal(format!("sealing failed: {e}")))
    }

    /// `secret.get`: a workload reads a secret of its own namespace that lists it (or lists no
    /// one); anyone else needs `reveal`. Asked before existence is revealed.
    pub(super) async fn secret_get(
        &self,
        call: &Call<'_>,
        p: &NameParams,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let key = ObjectKey::new(
            Self::namespace(call.caller, p.namespace.clone()),
            p.name.clone(),
        );
        *t = Target::object(&key);
        let entry = self.repository.store().secret_entry(&key);
        let workload_reads = match (&entry, call.caller.workload_in(&key.namespace)) {
            (Lookup::Found(r), Some(w)) => r.allowed_workloads.permits(w),
            _ => false,
        };
        if !workload_reads {
            let access = on(Verb::Reveal, Resource::Secrets, &key);
            if let Decision::Deny(hint) = self.authorizer.check(call.caller, access).await? {
                let hint = match call.caller.workload {
                    Some(_) => format!("{WORKLOAD_RULE}; {hint}"),
                    None => hint,
                };
                return Err(self.refuse(call.caller, access, &hint));
            }
        }
        let record = match entry {
            Lookup::Found(r) => r,
            Lookup::Missing => return Err(not_found(Resource::Secrets, &key)),
            Lookup::Quarantined(why) => return Err(refused_entry(Resource::Secrets, &key, &why)),
        };
        t.version = Some(record.version);
        let data = self.open_secret(&record)?;
        Ok(Payload::Secret(SecretView {
            meta: SecretMeta::of(&record),
            data,
        }))
    }

    /// `secret.list`: metadata of every secret of the namespace with `list`; without it, a
    /// workload sees the secrets it could read, anyone else is refused.
    pub(super) async fn secret_list(
        &self,
        call: &Call<'_>,
        p: &ListParams,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = Self::namespace(call.caller, p.namespace.clone());
        *t = Target::namespace(&ns);
        let access = across(Verb::List, Resource::Secrets, &ns);
        let workload = match self.authorizer.check(call.caller, access).await? {
            Decision::Allow => None,
            Decision::Deny(hint) => match call.caller.workload_in(&ns) {
                Some(w) => Some(w),
                None => return Err(self.refuse(call.caller, access, &hint)),
            },
        };
        let secrets = self
            .repository
            .store()
            .list_secrets(&ns, &p.prefix)
            .iter()
            .filter(|r| workload.is_none_or(|w| r.allowed_workloads.permits(w)))
            .map(|r| SecretMeta::of(r))
            .collect();
        Ok(Payload::SecretList { secrets })
    }

    pub(super) async fn secret_create(
        &self,
        call: &Call<'_>,
        p: &SecretCreate,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let (key, _turn) = self
            .begin_write(
                call,
                t,
                Verb::Create,
                Resource::Secrets,
                &p.name,
                p.namespace.as_ref(),
            )
            .await?;
        let keyed = call.keyed(&key.namespace);
        let current = self.repository.current_secret(&key).await?;
        if let Some(prior) = self.prior(keyed.as_ref(), current.writes())? {
            return Ok(replay(t, prior));
        }
        match current {
            Current::Found(c) => {
                t.version = Some(c.record.version);
                return Err(InvokeError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "secret {:?} already exists in namespace {:?} (version {}); use secret.rotate to change its data",
                        key.name.as_str(),
                        key.namespace.as_str(),
                        c.record.version
                    ),
                ));
            }
            Current::Refused(why) => return Err(refused_entry(Resource::Secrets, &key, &why)),
            Current::Missing => {}
        }
        let version = Version::FIRST;
        t.version = Some(version);
        let at = now();
        let mut record = SecretRecord {
            envelope: self.seal_secret(&key, version, &p.data)?,
            key: key.clone(),
            version,
            created_at: at,
            updated_at: at,
            allowed_workloads: p.allowed_workloads.clone(),
            origin: None,
            writes: Vec::new(),
            generation: 0,
        };
        let payload = Payload::SecretMeta(SecretMeta::of(&record));
        if let Some(k) = &keyed {
            record
                .writes
                .push(k.remember(&self.keys.current(), &payload, at));
        }
        self.commit(call, t, self.repository.create_secret(record, call.caller))
            .await?;
        Ok(payload)
    }

    /// `secret.rotate`: the next version, sealed from `newData` (or from the current data, to
    /// re-seal it under the active master key); with `expectedVersion`, only from that version.
    pub(super) async fn secret_rotate(
        &self,
        call: &Call<'_>,
        p: &SecretRotate,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let (key, _turn) = self
            .begin_write(
                call,
                t,
                Verb::Update,
                Resource::Secrets,
                &p.name,
                p.namespace.as_ref(),
            )
            .await?;
        let keyed = call.keyed(&key.namespace);
        for attempt in 1..=WRITE_ATTEMPTS {
            t.recorded = false;
            let current = self.repository.current_secret(&key).await?;
            if let Some(prior) = self.prior(keyed.as_ref(), current.writes())? {
                return Ok(replay(t, prior));
            }
            let c = match current {
                Current::Found(c) => c,
                Current::Missing => return Err(not_found(Resource::Secrets, &key)),
                Current::Refused(why) => {
                    return Err(refused_entry(Resource::Secrets, &key, &why));
                }
            };
            let at_version = c.record.version.max(c.high_water);
            t.version = Some(at_version);
            if let Some(expected) = p.expected_version
                && expected != at_version
            {
                return Err(InvokeError::new(
                    ErrorCode::Conflict,
                    format!(
                        "secret {:?} is at version {at_version}, not at expectedVersion {expected}; read it again before rotating",
                        key.name.as_str()
                    ),
                ));
            }
            let version = at_version.next();
            t.version = Some(version);
            let resealed;
            let data = match &p.new_data {
                Some(data) => data,
                None => {
                    resealed = self.open_secret(&c.record)?;
                    &resealed
                }
            };
            let at = now();
            let mut record = SecretRecord {
                envelope: self.seal_secret(&key, version, data)?,
                key: key.clone(),
                version,
                created_at: c.record.created_at,
                updated_at: at.max(c.record.created_at),
                allowed_workloads: c.record.allowed_workloads.clone(),
                origin: c.record.origin.clone(),
                writes: c.record.writes.clone(),
                generation: 0,
            };
            let payload = Payload::SecretMeta(SecretMeta::of(&record));
            if let Some(k) = &keyed {
                record
                    .writes
                    .push(k.remember(&self.keys.current(), &payload, at));
            }
            record.writes = crate::store::writes::retained(record.writes, at);
            let committed = self
                .commit(
                    call,
                    t,
                    self.repository.replace_secret(record, &c, call.caller),
                )
                .await;
            match committed {
                Ok(_) => {
                    tracing::info!(%key, version = version.get(), "secret rotated");
                    return Ok(payload);
                }
                Err(e)
                    if lost_race(&e)
                        && p.expected_version.is_none()
                        && attempt < WRITE_ATTEMPTS =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }
}
