//! What DESIGN.md fixes about the node.invoke protocol, written down once for the tests (not
//! taken from the crate: a test of the crate against its own table would prove nothing).
//!
//! ```ignore
//! #[path = "support/protocol.rs"]
//! mod protocol;
//! ```
#![allow(dead_code)] // every test target uses a different subset

/// The HTTP status DESIGN.md pairs with each error code.
pub fn http_status_of(code: &str) -> u16 {
    match code {
        "INVALID_ARGUMENT" => 400,
        "UNAUTHENTICATED" => 401,
        "PERMISSION_DENIED" => 403,
        "NOT_FOUND" => 404,
        "ALREADY_EXISTS" | "CONFLICT" => 409,
        "FAILED_PRECONDITION" => 412,
        "INTERNAL" => 500,
        "UNAVAILABLE" => 503,
        other => panic!("not a protocol error code: {other:?}"),
    }
}
