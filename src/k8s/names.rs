//! Seed names → Kubernetes object names, injectively.
//!
//! The seed allows names that Kubernetes object names cannot hold (`_`, a leading or trailing
//! `.` or `-`, `..`). A name that is already a valid object name (a DNS-1123 subdomain) is used
//! as it is; any other name, and any name that starts with the reserved prefix `cs--`, becomes
//! `cs--` and 56 hex digits of its SHA-256. The two ranges cannot meet (plain names never start
//! with the prefix), and within the hashed range two names meet only by a SHA-256 collision.
//! The real name is always kept in `spec.name`, and the operator refuses an object whose
//! `spec.name` does not map to its object name, so no name can clobber another's object.

use sha2::{Digest, Sha256};

use crate::domain::{Name, dns};

/// The prefix reserved for hashed object names.
pub const HASHED_PREFIX: &str = "cs--";

/// The object name that stores the secret or config called `name`.
pub fn object_name(name: &Name) -> String {
    let n = name.as_str();
    if dns::is_subdomain(n) && !n.starts_with(HASHED_PREFIX) {
        return n.to_owned();
    }
    let digest = Sha256::digest(n.as_bytes());
    let hex = crate::hex::encode(&digest);
    format!("{HASHED_PREFIX}{}", &hex[..56])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;

    fn n(s: &str) -> Name {
        Name::parse(s).unwrap()
    }

    #[test]
    fn dns_names_are_kept() {
        assert_eq!(object_name(&n("db.password")), "db.password");
        assert_eq!(object_name(&n("app.settings")), "app.settings");
    }

    #[test]
    fn other_seed_names_are_hashed_into_valid_object_names() {
        for s in [
            "under_score",
            ".leading",
            "trailing-",
            "..",
            "a..b",
            "cs--x",
            "-",
        ] {
            let o = object_name(&n(s));
            assert!(o.starts_with(HASHED_PREFIX), "{s} -> {o}");
            assert!(dns::is_subdomain(&o), "{o} must be a valid object name");
        }
    }

    #[test]
    fn mapping_is_injective_on_tricky_neighbours() {
        let names = [
            "a_b", "a-b", "a.b", "a..b", ".a", "a.", "-a", "a-", "cs--a", "a", "A_b",
        ];
        let mut seen = HashSet::new();
        for s in names.iter().filter_map(|s| Name::parse(s).ok()) {
            assert!(seen.insert(object_name(&s)), "collision for {s}");
        }
        // A plain name that looks like a hashed one is itself hashed, so it cannot take the slot.
        let hashed = object_name(&n("a_b"));
        assert_ne!(object_name(&n(&hashed)), hashed);
    }
}
