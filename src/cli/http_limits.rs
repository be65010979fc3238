//! The HTTP limits `dev` and `agent` share as flags (docs/architecture.md, "Limits and
//! timeouts", gives the reasons for each default).

use clap::Args;
use std::time::Duration;

use super::duration::parse_duration;
use crate::invoke::HttpLimits;

#[derive(Debug, Clone, Args)]
pub struct HttpLimitArgs {
    /// How long a client has to send a request's headers, from the connection's start or the
    /// end of its previous response; also how long an idle keep-alive connection stays open.
    /// A number with a unit: 500ms, 15s, 2m.
    #[arg(long, value_name = "DURATION", default_value = "15s", value_parser = parse_duration)]
    http_header_timeout: Duration,
    /// How long a request's body may take to arrive once its headers have.
    #[arg(long, value_name = "DURATION", default_value = "30s", value_parser = parse_duration)]
    http_body_timeout: Duration,
    /// Connections open at once; past it the connection idle longest is closed for the new one
    /// (default: the soft open-files limit minus 128).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    http_max_connections: Option<u32>,
    /// Bytes of request bodies held in memory at once, over all connections, in MiB; a request
    /// that does not fit waits (up to the body timeout), then gets UNAVAILABLE.
    #[arg(long, value_name = "MIB", default_value_t = 64, value_parser = clap::value_parser!(u32).range(8..=65_536))]
    http_max_body_buffer_mib: u32,
}

impl HttpLimitArgs {
    pub fn limits(&self) -> HttpLimits {
        let defaults = HttpLimits::default();
        HttpLimits {
            header_timeout: self.http_header_timeout,
            body_timeout: self.http_body_timeout,
            max_connections: self
                .http_max_connections
                .map_or(defaults.max_connections, |n| n as usize),
            max_body_buffer: self.http_max_body_buffer_mib as usize * 1024 * 1024,
        }
    }
}
