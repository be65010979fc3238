//! Who claw-secrets is to the API server. Every request carries a User-Agent naming the
//! component (`claw-secrets-operator/0.1.0`), which the API server takes as the field manager
//! of writes that name none (so `managedFields` say who wrote what, never `unknown`, also for
//! the writes kube-runtime makes on our behalf, such as finalizer patches); our own writes name
//! their field manager explicitly too. Events name a domain-qualified reporting controller, as
//! the Events API asks.

use kube::api::{PatchParams, PostParams};

/// The parts of claw-secrets that talk to the API server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    Operator,
    Agent,
    /// `claw-secrets invoke`, `claw-secrets seal` on a user's machine.
    Cli,
}

impl Component {
    /// The field manager, and the product token of the User-Agent.
    pub const fn name(self) -> &'static str {
        match self {
            Component::Operator => "claw-secrets-operator",
            Component::Agent => "claw-secrets-agent",
            Component::Cli => "claw-secrets",
        }
    }

    /// `reportingController` of the component's Events: domain-qualified.
    pub fn controller(self) -> String {
        format!("{}/{}", crate::k8s::crd::GROUP, self.name())
    }

    /// Makes every request of clients built from `config` carry this component's User-Agent.
    pub fn identify(self, config: &mut kube::Config) {
        let agent = format!("{}/{}", self.name(), env!("CARGO_PKG_VERSION"));
        config
            .headers
            .retain(|(name, _)| name != hyper::header::USER_AGENT);
        config.headers.push((
            hyper::header::USER_AGENT,
            hyper::header::HeaderValue::from_str(&agent).expect("a header-safe product token"),
        ));
    }

    /// A client from the kubeconfig (KUBECONFIG, else `~/.kube/config`) or the in-cluster
    /// ServiceAccount, identified as this component. `Err` says what is missing, for the user.
    pub async fn client(self) -> Result<kube::Client, String> {
        let config = self.config().await?;
        kube::Client::try_from(config).map_err(|e| format!("cannot build a Kubernetes client: {e}"))
    }

    /// The client configuration (KUBECONFIG, else the in-cluster account), identified as this
    /// component.
    pub async fn config(self) -> Result<kube::Config, String> {
        let mut config = kube::Config::infer()
            .await
            .map_err(|e| format!("no Kubernetes credentials (KUBECONFIG or in-cluster): {e}"))?;
        self.identify(&mut config);
        Ok(config)
    }

    /// Parameters of a patch this component makes.
    pub fn patch(self) -> PatchParams {
        PatchParams {
            field_manager: Some(self.name().to_owned()),
            ..PatchParams::default()
        }
    }

    /// Parameters of a server-side apply this component makes: it owns the fields it sets.
    pub fn apply(self) -> PatchParams {
        PatchParams::apply(self.name())
    }

    /// Parameters of a create or replace this component makes.
    pub fn post(self) -> PostParams {
        PostParams {
            field_manager: Some(self.name().to_owned()),
            ..PostParams::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_valid_field_managers_and_controllers() {
        for c in [Component::Operator, Component::Agent, Component::Cli] {
            // Field managers: at most 128 characters, printable.
            assert!(c.name().len() <= 128 && c.name().chars().all(|ch| ch.is_ascii_graphic()));
            assert!(c.controller().starts_with("clawbernetes.io/"));
            let mut config = kube::Config::new("https://127.0.0.1:6443".parse().unwrap());
            c.identify(&mut config);
            c.identify(&mut config);
            let agents: Vec<_> = config
                .headers
                .iter()
                .filter(|(n, _)| n == hyper::header::USER_AGENT)
                .collect();
            assert_eq!(agents.len(), 1);
            assert!(agents[0].1.to_str().unwrap().starts_with(c.name()));
        }
    }
}
