//! Time windows (`time_outside` / `time_inside` with `timezone`).

use jiff::{Timestamp, civil::Time, tz::TimeZone};

/// A daily window in a time zone's civil time: `start` inclusive, `end` exclusive; when `end`
/// is before `start` the window crosses midnight.
#[derive(Debug, Clone)]
pub(crate) struct TimeWindow {
    start: Time,
    end: Time,
    /// The rule applies outside the window (`time_outside`) rather than inside it.
    outside: bool,
    zone: TimeZone,
}

impl TimeWindow {
    /// Parses `"HH:MM-HH:MM"`.
    pub(crate) fn parse(text: &str) -> Result<(Time, Time), String> {
        let (start, end) = text.split_once('-').ok_or_else(|| {
            format!("time window '{text}' is not HH:MM-HH:MM (for example \"09:00-17:00\")")
        })?;
        let time = |s: &str| {
            s.trim().parse::<Time>().map_err(|e| {
                format!(
                    "time window '{text}': '{}' is not a time of day HH:MM ({e})",
                    s.trim()
                )
            })
        };
        let (start, end) = (time(start)?, time(end)?);
        if start == end {
            return Err(format!(
                "time window '{text}' is empty (start equals end); remove the window to mean always"
            ));
        }
        Ok((start, end))
    }

    pub(crate) fn new(start: Time, end: Time, outside: bool, zone: TimeZone) -> TimeWindow {
        TimeWindow {
            start,
            end,
            outside,
            zone,
        }
    }

    /// Does the rule apply at `now`?
    pub(crate) fn active(&self, now: Timestamp) -> bool {
        // Civil time in the zone, so a DST change moves the window with the wall clock.
        let t = self.zone.to_datetime(now).time();
        let inside = if self.start < self.end {
            self.start <= t && t < self.end
        } else {
            t >= self.start || t < self.end
        };
        inside != self.outside
    }
}

/// An IANA zone name, or `UTC`.
pub(crate) fn zone(name: &str) -> Result<TimeZone, String> {
    if name == "UTC" {
        return Ok(TimeZone::UTC);
    }
    jiff::tz::db().get(name).map_err(|_| {
        format!(
            "unknown time zone '{name}' (use an IANA name such as \"Europe/Paris\", or \"UTC\")"
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> Timestamp {
        s.parse().unwrap()
    }

    #[test]
    fn parses_windows() {
        assert!(TimeWindow::parse("09:00-17:00").is_ok());
        assert!(TimeWindow::parse("22:00 - 06:30").is_ok());
        for bad in ["09:00", "9-17", "25:00-26:00", "09:00-09:00", "aa:bb-cc:dd"] {
            assert!(TimeWindow::parse(bad).is_err(), "{bad}");
        }
        assert!(zone("Europe/Paris").is_ok());
        assert!(zone("Mars/Olympus").is_err());
    }

    #[test]
    fn window_across_midnight_in_a_zone() {
        let (s, e) = TimeWindow::parse("22:00-06:00").unwrap();
        let w = TimeWindow::new(s, e, false, zone("Asia/Tokyo").unwrap());
        assert!(w.active(at("2024-05-01T14:30:00Z"))); // 23:30 JST
        assert!(w.active(at("2024-05-01T20:59:00Z"))); // 05:59 JST
        assert!(!w.active(at("2024-05-01T21:00:00Z"))); // 06:00 JST
        assert!(!w.active(at("2024-05-01T12:59:00Z"))); // 21:59 JST
    }

    #[test]
    fn window_follows_dst() {
        let (s, e) = TimeWindow::parse("09:00-17:00").unwrap();
        let w = TimeWindow::new(s, e, true, zone("America/New_York").unwrap());
        // 13:30Z is 08:30 EST the day before the change, 09:30 EDT the day after.
        assert!(w.active(at("2024-03-09T13:30:00Z")));
        assert!(!w.active(at("2024-03-11T13:30:00Z")));
    }
}
