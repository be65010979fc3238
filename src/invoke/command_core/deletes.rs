//! `secret.delete` and `config.delete`: one rule for both kinds.

use super::super::{
    Authorizer, Current, Deleted, InvokeError, NameParams, Payload, Repository, Resource, Revision,
    Verb,
};
use super::{Call, CommandCore, Target, WRITE_ATTEMPTS, lost_race, not_found, now, replay};
use crate::domain::Version;

impl<A: Authorizer, R: Repository> CommandCore<A, R> {
    /// Deletes a secret or a config. A retried delete gets its first answer, also once the
    /// object is gone; an entry the node refused at start-up can be deleted (that is how an
    /// admin clears it).
    pub(super) async fn delete(
        &self,
        call: &Call<'_>,
        p: &NameParams,
        resource: Resource,
        t: &mut Target,
    ) -> Result<Payload, InvokeError> {
        let (key, _turn) = self
            .begin_write(
                call,
                t,
                Verb::Delete,
                resource,
                &p.name,
                p.namespace.as_ref(),
            )
            .await?;
        let keyed = call.keyed(&key.namespace);
        for attempt in 1..=WRITE_ATTEMPTS {
            t.recorded = false;
            // What the delete needs of the object: its revision, its version (secrets), and
            // the writes it remembers.
            let current: Current<(Revision, Option<Version>)> = match resource {
                Resource::Secrets => {
                    let c = self.repository.current_secret(&key).await?;
                    if let Some(prior) = self.prior(keyed.as_ref(), c.writes())? {
                        return Ok(replay(t, prior));
                    }
                    c.map(|c| (c.revision, Some(c.record.version)))
                }
                Resource::Configs => {
                    let c = self.repository.current_config(&key).await?;
                    if let Some(prior) = self.prior(keyed.as_ref(), c.writes())? {
                        return Ok(replay(t, prior));
                    }
                    c.map(|c| (c.revision, None))
                }
            };
            let base = match current {
                Current::Found((revision, version)) => {
                    t.version = version;
                    Some(revision)
                }
                Current::Missing => return Err(not_found(resource, &key)),
                Current::Refused(_) => None,
            };
            let payload = Payload::Deleted(Deleted {
                name: key.name.clone(),
                namespace: key.namespace.clone(),
                deleted: true,
            });
            let writes = keyed
                .iter()
                .map(|k| k.remember(&self.keys.current(), &payload, now()))
                .collect();
            let base = base.as_ref();
            let committed = match resource {
                Resource::Secrets => {
                    let removal = self
                        .repository
                        .delete_secret(&key, base, writes, call.caller);
                    self.commit(call, t, removal).await
                }
                Resource::Configs => {
                    let removal = self
                        .repository
                        .delete_config(&key, base, writes, call.caller);
                    self.commit(call, t, removal).await
                }
            };
            match committed {
                Ok(()) => return Ok(payload),
                Err(e) if lost_race(&e) && attempt < WRITE_ATTEMPTS => continue,
                Err(e) => return Err(e),
            }
        }
        unreachable!("the last attempt returns")
    }
}
