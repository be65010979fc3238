//! The DNS-1123 rules of Kubernetes names, written once for the whole project.
//!
//! A label is 1-63 characters of lowercase letters, digits and '-', starting and ending with a
//! letter or digit (namespaces, node ids). A subdomain is at most 253 characters of labels
//! joined by '.' (object names, ServiceAccount and Node names). Each label of a subdomain is held
//! to 63 characters, as DNS (RFC 1123) requires; Kubernetes' own check leaves that out, so this
//! rule is a little stricter than the API server's.

pub const LABEL_MAX: usize = 63;
pub const SUBDOMAIN_MAX: usize = 253;

/// The rule a label breaks, for error messages.
pub const LABEL_RULE: &str = "a DNS-1123 label: 1-63 characters of lowercase letters, digits and '-', starting and ending with a letter or digit";

/// The rule a subdomain breaks, for error messages.
pub const SUBDOMAIN_RULE: &str = "a DNS-1123 subdomain: at most 253 characters of labels joined by '.', each 1-63 lowercase letters, digits and '-', starting and ending with a letter or digit";

pub fn is_label(s: &str) -> bool {
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= LABEL_MAX
        && b.iter().all(|&c| alnum(c) || c == b'-')
        && alnum(b[0])
        && alnum(b[b.len() - 1])
}

pub fn is_subdomain(s: &str) -> bool {
    !s.is_empty() && s.len() <= SUBDOMAIN_MAX && s.split('.').all(is_label)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn labels_and_subdomains() {
        for ok in ["a", "a-b", "0", &"a".repeat(63)] {
            assert!(is_label(ok), "{ok}");
            assert!(is_subdomain(ok), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", &"a".repeat(64)] {
            assert!(!is_label(bad), "{bad}");
        }
        for ok in ["a.b", "db.password", "x-1.y-2.z"] {
            assert!(is_subdomain(ok), "{ok}");
        }
        for bad in [
            "",
            ".a",
            "a.",
            "a..b",
            "a.-b",
            "a-.b",
            "A.b",
            &"a".repeat(64),
        ] {
            assert!(!is_subdomain(bad), "{bad}");
        }
        let long = vec!["a".repeat(63); 4].join(".");
        assert_eq!(long.len(), 255);
        assert!(!is_subdomain(&long));
        assert!(is_subdomain(long[..253].trim_end_matches('.')));
    }
}
