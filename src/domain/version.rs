use serde::{Deserialize, Serialize};

/// A secret's version: 1 on create, incremented by every rotation, never moving backwards.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(into = "u64", try_from = "u64")]
pub struct Version(u64);

impl TryFrom<u64> for Version {
    type Error = &'static str;
    fn try_from(v: u64) -> Result<Self, Self::Error> {
        Version::new(v).ok_or("versions start at 1")
    }
}

impl From<Version> for u64 {
    fn from(v: Version) -> u64 {
        v.0
    }
}

impl Version {
    pub const FIRST: Version = Version(1);

    pub fn new(v: u64) -> Option<Self> {
        (v >= 1).then_some(Version(v))
    }

    pub fn get(self) -> u64 {
        self.0
    }

    /// The version after a rotation. Saturates rather than wrapping: 2^64 rotations will not
    /// happen, and wrapping would break the "never backwards" rule.
    pub fn next(self) -> Version {
        Version(self.0.saturating_add(1))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}
