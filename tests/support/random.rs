//! Random names and values for tests (from the OS RNG).
//!
//! ```ignore
//! #[path = "support/random.rs"]
//! mod random;
//! ```
#![allow(dead_code)] // every test target uses a different subset

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut b = vec![0u8; n];
    getrandom::getrandom(&mut b).expect("OS RNG");
    claw_secrets::hex::encode(&b)
}

/// A random u64.
pub fn random_u64() -> u64 {
    let mut b = [0u8; 8];
    getrandom::getrandom(&mut b).expect("OS RNG");
    u64::from_le_bytes(b)
}
