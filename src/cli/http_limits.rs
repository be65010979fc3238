//! The HTTP limits `dev` and `agent` share as flags (docs/architecture.md, "Limits and
//! timeouts", gives the reasons for each default).

use clap::Args;
use std::time::Duration;

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

/// `500ms`, `15s`, `2m`: a whole number and a unit, at least 1 ms and at most an hour.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("{text:?} has no unit; write it as 500ms, 15s or 2m"))?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} must start with a whole number, as in 15s"))?;
    let duration = match unit {
        "ms" => Duration::from_millis(n),
        "s" => Duration::from_secs(n),
        "m" => Duration::from_secs(n.saturating_mul(60)),
        _ => return Err(format!("{text:?}: the unit must be ms, s or m")),
    };
    if duration < Duration::from_millis(1) || duration > Duration::from_secs(3600) {
        return Err(format!("{text:?} must be between 1ms and 60m"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_a_unit_and_a_sane_size() {
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("15s"), Ok(Duration::from_secs(15)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["15", "s", "1.5s", "0s", "61m", "-1s", "15 s", "1h", ""] {
            assert!(parse_duration(bad).is_err(), "{bad:?} was accepted");
        }
    }
}
