//! Names of secrets and configs, namespaces and workloads, each parsed once into a type that
//! can only hold a valid value.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::{DomainError, dns};

/// The longest name the seed allows.
pub const MAX_NAME_LEN: usize = 253;

/// The rule, as the seed states it; quoted in every rejection.
const NAME_RULE: &str = "names are 1-253 characters of lowercase letters, digits, '-', '_' and '.'";

fn is_name_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '-' | '_' | '.')
}

/// The name of a secret or a config: 1-253 characters of `[a-z0-9._-]`, exactly as the seed says.
///
/// Note that the seed allows names Kubernetes object names cannot hold (`_`, a leading `.`); the
/// Kubernetes layer maps them to object names, never the other way round.
///
/// ```
/// use claw_secrets::domain::Name;
///
/// assert_eq!(Name::parse("db.credentials").unwrap().as_str(), "db.credentials");
/// assert!(Name::parse("_private").is_ok()); // the seed allows it; Kubernetes would not
/// let refused = Name::parse("DB").unwrap_err();
/// assert!(refused.to_string().contains("names are 1-253 characters"), "{refused}");
/// ```
///
/// Held as a shared string: an object's key is copied into every map that names it (the
/// store's, the manifest's, the agent's), and a copy then costs a reference count, not an
/// allocation (about 1.7 MiB less at 10,000 secrets).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Name(Arc<str>);

impl Name {
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        if s.is_empty() {
            return Err(DomainError::new(format!("name is empty: {NAME_RULE}")));
        }
        if s.len() > MAX_NAME_LEN {
            return Err(DomainError::new(format!(
                "name is {} characters long: {NAME_RULE}",
                s.chars().count()
            )));
        }
        if let Some(bad) = s.chars().find(|c| !is_name_char(*c)) {
            return Err(DomainError::new(format!(
                "name {s:?} contains {bad:?}: {NAME_RULE}"
            )));
        }
        Ok(Name(Arc::from(s)))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Name {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Name::parse(&s)
    }
}

impl From<Name> for String {
    fn from(n: Name) -> String {
        n.0.as_ref().to_owned()
    }
}

impl std::fmt::Display for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Name {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A `prefix` filter for the list commands: what a name may start with, so 0-253 characters
/// of the name alphabet. An empty prefix lists everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NamePrefix(String);

impl NamePrefix {
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        if s.len() > MAX_NAME_LEN {
            return Err(DomainError::new(format!(
                "prefix is longer than {MAX_NAME_LEN} characters, so no name can match it: {NAME_RULE}"
            )));
        }
        if let Some(bad) = s.chars().find(|c| !is_name_char(*c)) {
            return Err(DomainError::new(format!(
                "prefix {s:?} contains {bad:?}, which no name can contain: {NAME_RULE}"
            )));
        }
        Ok(NamePrefix(s.to_owned()))
    }

    pub fn matches(&self, name: &Name) -> bool {
        name.as_str().starts_with(&self.0)
    }
}

/// `s` itself if `valid` holds (each type then holds it as it holds strings).
fn parse_dns<'a>(
    what: &str,
    s: &'a str,
    valid: fn(&str) -> bool,
    rule: &str,
) -> Result<&'a str, DomainError> {
    if !valid(s) {
        return Err(DomainError::new(format!(
            "{what} {s:?} is invalid: it must be {rule}"
        )));
    }
    Ok(s)
}

/// A Kubernetes namespace (DNS-1123 label). Dev mode keeps everything in `default`. Shared, as
/// [`Name`] is.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Namespace(Arc<str>);

impl Namespace {
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        parse_dns("namespace", s, dns::is_label, dns::LABEL_RULE).map(|s| Namespace(Arc::from(s)))
    }

    pub fn default_namespace() -> Self {
        Namespace(Arc::from("default"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Namespace {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Namespace::parse(&s)
    }
}

impl From<Namespace> for String {
    fn from(n: Namespace) -> String {
        n.0.as_ref().to_owned()
    }
}

impl std::fmt::Display for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Namespace {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// A workload: in Kubernetes, the name of the ServiceAccount it runs as, so it follows the
/// ServiceAccount naming rule (DNS-1123 subdomain).
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Workload(String);

impl Workload {
    pub fn parse(s: &str) -> Result<Self, DomainError> {
        parse_dns("workload", s, dns::is_subdomain, dns::SUBDOMAIN_RULE)
            .map(|s| Workload(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Workload {
    type Error = DomainError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Workload::parse(&s)
    }
}

impl From<Workload> for String {
    fn from(n: Workload) -> String {
        n.0
    }
}

impl std::fmt::Display for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::fmt::Debug for Workload {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

/// The `allowed_workloads` of a secret: empty means every workload of the namespace may read it.
///
/// Sorted and without duplicates, in one shared slice (none when empty): every held secret has
/// one, a `BTreeSet` of one name costs about 280 B more (a whole tree node), and the secrets of
/// a namespace mostly allow the same workloads, so the store keeps one copy of a set for the
/// entries that have it ([`WorkloadSet::share`]). Lookups are a binary search.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<Workload>", into = "Vec<Workload>")]
pub struct WorkloadSet(Option<Arc<[Workload]>>);

impl WorkloadSet {
    /// More than this many entries is almost certainly a mistake (use a namespace instead).
    pub const MAX_ENTRIES: usize = 256;

    pub fn parse(list: Vec<Workload>) -> Result<Self, DomainError> {
        if list.len() > Self::MAX_ENTRIES {
            return Err(DomainError::new(format!(
                "allowed_workloads has {} entries; at most {} are allowed",
                list.len(),
                Self::MAX_ENTRIES
            )));
        }
        let mut list = list;
        list.sort_unstable();
        list.dedup();
        Ok(WorkloadSet((!list.is_empty()).then(|| list.into())))
    }

    /// Whether `workload` may read a secret guarded by this set.
    pub fn permits(&self, workload: &Workload) -> bool {
        self.is_empty() || self.as_slice().binary_search(workload).is_ok()
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_none()
    }

    pub fn iter(&self) -> impl Iterator<Item = &Workload> {
        self.as_slice().iter()
    }

    /// Takes `other`'s copy if it names the same workloads: both then share one.
    pub fn share(&mut self, other: &WorkloadSet) {
        if self == other {
            self.0.clone_from(&other.0);
        }
    }

    /// Whether both are one copy (see [`WorkloadSet::share`]).
    pub fn is_shared_with(&self, other: &WorkloadSet) -> bool {
        match (&self.0, &other.0) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (a, b) => a.is_none() && b.is_none(),
        }
    }

    fn as_slice(&self) -> &[Workload] {
        self.0.as_deref().unwrap_or_default()
    }
}

impl TryFrom<Vec<Workload>> for WorkloadSet {
    type Error = DomainError;
    fn try_from(list: Vec<Workload>) -> Result<Self, Self::Error> {
        WorkloadSet::parse(list)
    }
}

impl From<WorkloadSet> for Vec<Workload> {
    fn from(s: WorkloadSet) -> Vec<Workload> {
        s.as_slice().to_vec()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_workload_set_is_sorted_without_duplicates_and_permits_what_it_names() {
        let w = |s: &str| Workload::parse(s).unwrap();
        let set = WorkloadSet::parse(vec![w("web"), w("api"), w("web")]).unwrap();
        assert_eq!(Vec::from(set.clone()), [w("api"), w("web")]);
        assert!(set.permits(&w("api")) && set.permits(&w("web")));
        assert!(!set.permits(&w("batch")));
        // Empty: every workload of the namespace.
        assert!(WorkloadSet::default().permits(&w("batch")));
        // Serialized as the sorted list it always was (entry files' MACs cover it).
        assert_eq!(serde_json::to_string(&set).unwrap(), r#"["api","web"]"#);
        let empty: WorkloadSet = serde_json::from_str("[]").unwrap();
        assert!(empty.is_empty() && empty.iter().next().is_none());
        assert_eq!(serde_json::to_string(&empty).unwrap(), "[]");
    }

    #[test]
    fn a_workload_set_takes_another_copy_only_of_the_same_workloads() {
        let w = |s: &str| Workload::parse(s).unwrap();
        let a = WorkloadSet::parse(vec![w("web"), w("api")]).unwrap();
        let mut b = WorkloadSet::parse(vec![w("api"), w("web")]).unwrap();
        assert!(!b.is_shared_with(&a));
        b.share(&a);
        assert!(b.is_shared_with(&a));
        let mut c = WorkloadSet::parse(vec![w("api")]).unwrap();
        c.share(&a);
        assert!(!c.is_shared_with(&a));
        assert_eq!(Vec::from(c), [w("api")]);
    }

    #[test]
    fn seed_names_are_accepted() {
        for ok in [
            "db.password",
            "app.settings",
            "external.openai",
            "a",
            "under_score",
            ".leading-dot",
            "trailing-",
            "..",
            &"x".repeat(253),
        ] {
            assert!(Name::parse(ok).is_ok(), "{ok:?} should be valid");
        }
    }

    #[test]
    fn names_outside_the_rule_are_rejected_with_the_rule() {
        for bad in [
            "",
            "Upper",
            "sp ace",
            "slash/x",
            "ü",
            "colon:x",
            &"x".repeat(254),
        ] {
            let err = Name::parse(bad).unwrap_err();
            assert!(err.message().contains("1-253 characters"), "{err}");
        }
    }

    #[test]
    fn prefix_may_be_empty_but_not_foreign() {
        assert!(
            NamePrefix::parse("")
                .unwrap()
                .matches(&Name::parse("x").unwrap())
        );
        assert!(
            NamePrefix::parse("db.")
                .unwrap()
                .matches(&Name::parse("db.x").unwrap())
        );
        assert!(
            !NamePrefix::parse("db.")
                .unwrap()
                .matches(&Name::parse("dbx").unwrap())
        );
        assert!(NamePrefix::parse("DB").is_err());
    }

    #[test]
    fn workloads_follow_service_account_rules() {
        assert!(Workload::parse("api-server").is_ok());
        assert!(Workload::parse("-x").is_err());
        assert!(Workload::parse("a_b").is_err());
        let set = WorkloadSet::parse(vec![Workload::parse("api-server").unwrap()]).unwrap();
        assert!(set.permits(&Workload::parse("api-server").unwrap()));
        assert!(!set.permits(&Workload::parse("worker").unwrap()));
        assert!(WorkloadSet::default().permits(&Workload::parse("worker").unwrap()));
    }
}
