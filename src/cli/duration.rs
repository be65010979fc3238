//! Durations on the command line: `500ms`, `15s`, `2m`.

use std::time::Duration;

/// `500ms`, `15s`, `2m`: a whole number and a unit, at least 1 ms and at most an hour.
pub(super) fn parse_duration(text: &str) -> Result<Duration, String> {
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

/// A period that may be off: `30d`, `12h`, `90m`, `45s`, or `0` (off: `Period(None)`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Period(pub Option<Duration>);

/// Parses a [`Period`].
pub(super) fn parse_period(text: &str) -> Result<Period, String> {
    period(text).map(Period)
}

fn period(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text == "0" {
        return Ok(None);
    }
    let split = text.find(|c: char| !c.is_ascii_digit()).ok_or_else(|| {
        format!("{text:?} has no unit; write it as 30d, 12h, 90m or 45s (0: off)")
    })?;
    let (number, unit) = text.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{text:?} must start with a whole number, as in 30d"))?;
    let seconds = match unit {
        "s" => n,
        "m" => n.saturating_mul(60),
        "h" => n.saturating_mul(3600),
        "d" => n.saturating_mul(86_400),
        _ => return Err(format!("{text:?}: the unit must be d, h, m or s")),
    };
    if seconds == 0 || seconds > 3650 * 86_400 {
        return Err(format!("{text:?} must be between 1s and 3650d, or 0 (off)"));
    }
    Ok(Some(Duration::from_secs(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_take_days_and_zero_turns_them_off() {
        let days = |d: u64| Ok(Period(Some(Duration::from_secs(d))));
        assert_eq!(parse_period("30d"), days(30 * 86_400));
        assert_eq!(parse_period("12h"), days(12 * 3600));
        assert_eq!(parse_period("45s"), days(45));
        assert_eq!(parse_period("0"), Ok(Period(None)));
        for bad in ["30", "0d", "1.5d", "3651d", "d", "", "1w"] {
            assert!(parse_period(bad).is_err(), "{bad:?} was accepted");
        }
    }

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
