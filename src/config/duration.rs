//! A duration written the way operators write them: `30s`, `10m`, `1h30m`, `250ms`, or bare seconds.

use std::fmt;
use std::time::Duration;

use serde::Deserialize;

const MAX: Duration = Duration::from_secs(365 * 24 * 3600);

/// A `Duration` read from `30s`-style text or a plain number of seconds.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Seconds(Duration);

impl Seconds {
    /// Whole seconds.
    pub const fn from_secs(s: u64) -> Self {
        Self(Duration::from_secs(s))
    }

    /// The value.
    pub const fn get(self) -> Duration {
        self.0
    }
}

impl From<Duration> for Seconds {
    fn from(d: Duration) -> Self {
        Self(d)
    }
}

impl fmt::Debug for Seconds {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_duration(self.0))
    }
}

impl<'de> Deserialize<'de> for Seconds {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Secs(u64),
            Text(String),
        }
        let d = match Raw::deserialize(d)? {
            Raw::Secs(s) => Duration::from_secs(s),
            Raw::Text(t) => humantime::parse_duration(t.trim()).map_err(|e| {
                serde::de::Error::custom(format!("`{t}` is not a duration like 30s or 10m: {e}"))
            })?,
        };
        // Timeouts become deadlines (`Instant + timeout`); a year is far beyond any sane setting and keeps
        // that addition from overflowing.
        if d > MAX {
            return Err(serde::de::Error::custom(
                "durations are limited to 365 days",
            ));
        }
        Ok(Self(d))
    }
}
