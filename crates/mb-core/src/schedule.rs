//! When the quarantine digests go out (`quarantine.digest.schedule`): `hourly`, or
//! `daily HH:MM` in the host's local time. Parsed here so that the registry refuses a
//! schedule the scheduler could not follow.

use std::fmt;
use std::str::FromStr;

/// A digest schedule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schedule {
    /// At the start of every hour.
    Hourly,
    /// Once a day at this local time.
    Daily { hour: u8, minute: u8 },
}

/// A schedule that is neither `hourly` nor `daily HH:MM`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a digest schedule: say \"hourly\" or \"daily HH:MM\" (24-hour local time, such as daily 08:00)"
)]
pub struct ScheduleError(pub String);

impl FromStr for Schedule {
    type Err = ScheduleError;

    fn from_str(text: &str) -> Result<Schedule, ScheduleError> {
        let bad = || ScheduleError(text.to_string());
        let t = text.trim().to_ascii_lowercase();
        if t == "hourly" {
            return Ok(Schedule::Hourly);
        }
        let at = t.strip_prefix("daily").ok_or_else(bad)?.trim();
        let (h, m) = at.split_once(':').ok_or_else(bad)?;
        let digits = |s: &str| (1..=2).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit());
        if !digits(h) || m.len() != 2 || !digits(m) {
            return Err(bad());
        }
        let (hour, minute) = (
            h.parse::<u8>().map_err(|_| bad())?,
            m.parse::<u8>().map_err(|_| bad())?,
        );
        if hour > 23 || minute > 59 {
            return Err(bad());
        }
        Ok(Schedule::Daily { hour, minute })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Hourly => f.write_str("hourly"),
            Schedule::Daily { hour, minute } => write!(f, "daily {hour:02}:{minute:02}"),
        }
    }
}

impl Schedule {
    /// The latest scheduled time at or before `now` (Unix seconds), for a host whose
    /// local time is `offset` seconds ahead of UTC.
    pub fn last_due(self, now: i64, offset: i64) -> i64 {
        let local = now + offset;
        match self {
            Schedule::Hourly => local.div_euclid(3600) * 3600 - offset,
            Schedule::Daily { hour, minute } => {
                let day = local.div_euclid(86_400) * 86_400;
                let at = day + i64::from(hour) * 3600 + i64::from(minute) * 60;
                let at = if at > local { at - 86_400 } else { at };
                at - offset
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedules_parse_and_print() {
        for (text, want) in [
            ("hourly", Some(Schedule::Hourly)),
            (
                " Daily 08:00 ",
                Some(Schedule::Daily { hour: 8, minute: 0 }),
            ),
            ("daily 7:05", Some(Schedule::Daily { hour: 7, minute: 5 })),
            ("daily 24:00", None),
            ("daily 08:60", None),
            ("daily 8", None),
            ("weekly", None),
            ("daily 08:0", None),
            ("", None),
        ] {
            assert_eq!(text.parse::<Schedule>().ok(), want, "{text:?}");
        }
        assert_eq!(
            Schedule::Daily { hour: 8, minute: 0 }.to_string(),
            "daily 08:00"
        );
    }

    #[test]
    fn the_last_due_time_follows_the_local_clock() {
        // 2026-12-02 10:30:00 UTC.
        let now = 1_796_207_400;
        let daily = Schedule::Daily { hour: 8, minute: 0 };
        assert_eq!(daily.last_due(now, 0), now - 2 * 3600 - 1800);
        // At UTC+3 it is 13:30 local: 08:00 local was 05:00 UTC.
        assert_eq!(daily.last_due(now, 3 * 3600), now - 5 * 3600 - 1800);
        // At UTC-9 it is 01:30 local: yesterday's 08:00 local, 17:00 UTC yesterday.
        assert_eq!(daily.last_due(now, -9 * 3600), now - 17 * 3600 - 1800);
        assert_eq!(Schedule::Hourly.last_due(now, 0), now - 1800);
        // Exactly on time counts as due.
        assert_eq!(
            daily.last_due(now - 2 * 3600 - 1800, 0),
            now - 2 * 3600 - 1800
        );
    }
}
