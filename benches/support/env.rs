//! Reading a bench's settings from the environment, for the benches that need nothing more of
//! `support/` (those with a load generator read theirs through `loadgen::env_or`).

/// `name` as a number, or `default` when unset; a value that is not a number stops the bench.
pub fn env_usize(name: &str, default: usize) -> usize {
    match std::env::var(name) {
        Ok(v) => v
            .parse()
            .unwrap_or_else(|_| panic!("{name}={v:?} is not a number")),
        Err(_) => default,
    }
}
