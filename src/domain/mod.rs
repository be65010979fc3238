//! The vocabulary of the product: values here can only exist if they are valid.
//!
//! Nothing in this layer knows about files, HTTP or Kubernetes.

mod data;
pub mod dns;
mod error;
mod name;
mod version;

pub use data::{ConfigData, DataKey, MAX_DATA_BYTES, SecretData, SecretValue, wipe_bytes};
pub use error::{DomainError, ErrorCode};
pub use name::{MAX_NAME_LEN, Name, NamePrefix, Namespace, Workload, WorkloadSet};
pub use version::Version;

/// Which of the two kinds of object a name refers to. Part of every secret's crypto identity,
/// so a secret blob can never be opened as if it were something else.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize, serde::Deserialize,
)]
pub enum Kind {
    #[serde(rename = "ClawSecret")]
    Secret,
    #[serde(rename = "ClawConfig")]
    Config,
}

impl Kind {
    /// The Kubernetes kind name; stable, because it is bound into ciphertexts.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Secret => "ClawSecret",
            Kind::Config => "ClawConfig",
        }
    }
}

/// Where an object lives: its namespace and name. In dev mode every object is in one namespace.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ObjectKey {
    pub namespace: Namespace,
    pub name: Name,
}

impl ObjectKey {
    pub fn new(namespace: Namespace, name: Name) -> Self {
        Self { namespace, name }
    }

    /// Takes `other`'s copy of the namespace's name if it is the same namespace: keys then
    /// share one string (a `Namespace` is a shared string).
    pub fn share_namespace(&mut self, other: &ObjectKey) {
        if self.namespace == other.namespace {
            self.namespace.clone_from(&other.namespace);
        }
    }
}

impl std::fmt::Display for ObjectKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}
