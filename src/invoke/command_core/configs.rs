//! The five config commands. Configs are plain data: not encrypted, not versioned; an immutable
//! config cannot change.

use super::super::{
    Authorizer, ConfigCreate, ConfigMeta, ConfigUpdate, ConfigView, Current, InvokeError,
    ListParams, NameParams, Payload, Repository, Resource, Verb,
};
use super::{
    Call, CommandCore, Target, WRITE_ATTEMPTS, across, lost_race, not_found, now, on,
    refused_entry, replay,
};
use crate::domain::{ErrorCode, ObjectKey};
use crate::store::{ConfigRecord, Lookup};

impl<A: Authorizer, R: Repository> CommandCore<A, R> {
    pub(super) async fn config_get(
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
        self.authorize(call.caller, on(Verb::Get, Resource::Configs, &key))
            .await?;
        match self.repository.store().config_entry(&key) {
            Lookup::Found(record) => Ok(Payload::Config(ConfigView {
                meta: ConfigMeta::of(&record),
                data: record.data.clone(),
            })),
            Lookup::Missing => Err(not_found(Resource::Configs, &key)),
            Lookup::Quarantined(why) => Err(refused_entry(Resource::Configs, &key, &why)),
        }
    }

    pub(super) async fn config_list(
        &self,
        call: &Call<'_>,
        p: &ListParams,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let ns = Self::namespace(call.caller, p.namespace.clone());
        *t = Target::namespace(&ns);
        self.authorize(call.caller, across(Verb::List, Resource::Configs, &ns))
            .await?;
        let configs = self
            .repository
            .store()
            .list_configs(&ns, &p.prefix)
            .iter()
            .map(|r| ConfigMeta::of(r))
            .collect();
        Ok(Payload::ConfigList { configs })
    }

    pub(super) async fn config_create(
        &self,
        call: &Call<'_>,
        p: &ConfigCreate,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let (key, _turn) = self
            .begin_write(
                call,
                t,
                Verb::Create,
                Resource::Configs,
                &p.name,
                p.namespace.as_ref(),
            )
            .await?;
        let keyed = call.keyed(&key.namespace);
        let current = self.repository.current_config(&key).await?;
        if let Some(prior) = self.prior(keyed.as_ref(), current.writes())? {
            return Ok(replay(t, prior));
        }
        match current {
            Current::Found(_) => {
                return Err(InvokeError::new(
                    ErrorCode::AlreadyExists,
                    format!(
                        "config {:?} already exists in namespace {:?}; use config.update to change it",
                        key.name.as_str(),
                        key.namespace.as_str()
                    ),
                ));
            }
            Current::Refused(why) => return Err(refused_entry(Resource::Configs, &key, &why)),
            Current::Missing => {}
        }
        let at = now();
        let mut record = ConfigRecord {
            key: key.clone(),
            data: p.data.clone(),
            immutable: p.immutable,
            created_at: at,
            updated_at: at,
            origin: None,
            writes: Vec::new(),
            generation: 0,
        };
        let payload = Payload::ConfigMeta(ConfigMeta::of(&record));
        if let Some(k) = &keyed {
            record
                .writes
                .push(k.remember(&self.keys.current(), &payload, at));
        }
        self.commit(call, t, self.repository.create_config(record, call.caller))
            .await?;
        Ok(payload)
    }

    /// `config.update`: replaces the data, unless the config is immutable. `immutable: true`
    /// makes it immutable from then on (one way, as for a ConfigMap).
    pub(super) async fn config_update(
        &self,
        call: &Call<'_>,
        p: &ConfigUpdate,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let (key, _turn) = self
            .begin_write(
                call,
                t,
                Verb::Update,
                Resource::Configs,
                &p.name,
                p.namespace.as_ref(),
            )
            .await?;
        let keyed = call.keyed(&key.namespace);
        for attempt in 1..=WRITE_ATTEMPTS {
            t.recorded = false;
            let current = self.repository.current_config(&key).await?;
            if let Some(prior) = self.prior(keyed.as_ref(), current.writes())? {
                return Ok(replay(t, prior));
            }
            let c = match current {
                Current::Found(c) => c,
                Current::Missing => return Err(not_found(Resource::Configs, &key)),
                Current::Refused(why) => {
                    return Err(refused_entry(Resource::Configs, &key, &why));
                }
            };
            if c.record.immutable {
                return Err(InvokeError::new(
                    ErrorCode::FailedPrecondition,
                    format!(
                        "config {:?} is immutable: it cannot be modified after creation; delete it and create it again to change it",
                        key.name.as_str()
                    ),
                ));
            }
            let at = now();
            let mut record = ConfigRecord {
                key: key.clone(),
                data: p.data.clone(),
                immutable: p.immutable.unwrap_or(false),
                created_at: c.record.created_at,
                updated_at: at.max(c.record.created_at),
                origin: c.record.origin.clone(),
                writes: c.record.writes.clone(),
                generation: 0,
            };
            let payload = Payload::ConfigMeta(ConfigMeta::of(&record));
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
                    self.repository.replace_config(record, &c, call.caller),
                )
                .await;
            match committed {
                Ok(_) => return Ok(payload),
                Err(e) if lost_race(&e) && attempt < WRITE_ATTEMPTS => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }
}
