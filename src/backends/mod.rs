//! Implementations of [`crate::invoke::Backend`].
//!
//! - [`local`]: the embedded, encrypted store of `claw-secrets dev`, with a tokens file for
//!   identity.

pub mod local;
