//! What a workload reports: human-readable text, or one JSON object for scripts. The JSON is written by
//! hand (flat objects of numbers and strings), so the load tool needs no serializer.

use std::fmt::Write as _;
use std::time::Duration;

use super::stats::Summary;
use super::{hold, latency, logins, retr};

/// The result of one workload.
#[derive(Debug, Clone)]
pub enum Report {
    /// `logins`.
    Logins(logins::LoginsReport),
    /// `retr`.
    Retr(retr::RetrReport),
    /// `latency`.
    Latency(latency::LatencyReport),
    /// `hold`.
    Hold(hold::HoldReport),
}

/// A JSON object under construction.
#[derive(Debug)]
pub struct JsonObject {
    out: String,
}

impl Report {
    /// True when any reply was wrong or any session failed.
    pub fn failed(&self) -> bool {
        match self {
            Report::Logins(r) => r.errors > 0,
            Report::Retr(_) | Report::Latency(_) => false,
            Report::Hold(r) => r.held < r.requested,
        }
    }

    /// Human-readable lines.
    pub fn text(&self) -> String {
        match self {
            Report::Logins(r) => r.text(),
            Report::Retr(r) => r.text(),
            Report::Latency(r) => r.text(),
            Report::Hold(r) => r.text(),
        }
    }

    /// One JSON object.
    pub fn json(&self) -> String {
        match self {
            Report::Logins(r) => r.json(),
            Report::Retr(r) => r.json(),
            Report::Latency(r) => r.json(),
            Report::Hold(r) => r.json(),
        }
        .finish()
    }
}

// === impl JsonObject ===

impl Default for JsonObject {
    fn default() -> Self {
        Self::new()
    }
}

impl JsonObject {
    /// `{`.
    pub fn new() -> Self {
        Self { out: "{".into() }
    }

    fn key(&mut self, key: &str) {
        if self.out.len() > 1 {
            self.out.push(',');
        }
        push_string(&mut self.out, key);
        self.out.push(':');
    }

    /// A string member.
    pub fn str(mut self, key: &str, value: &str) -> Self {
        self.key(key);
        push_string(&mut self.out, value);
        self
    }

    /// An integer member.
    pub fn int(mut self, key: &str, value: u64) -> Self {
        self.key(key);
        let _ = write!(self.out, "{value}");
        self
    }

    /// A number member (`null` when not finite).
    pub fn num(mut self, key: &str, value: f64) -> Self {
        self.key(key);
        if value.is_finite() {
            let _ = write!(self.out, "{value}");
        } else {
            self.out.push_str("null");
        }
        self
    }

    /// An array of numbers.
    pub fn nums(mut self, key: &str, values: &[f64]) -> Self {
        self.key(key);
        self.out.push('[');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            let _ = write!(self.out, "{v}");
        }
        self.out.push(']');
        self
    }

    /// An array of strings.
    pub fn strs(mut self, key: &str, values: &[String]) -> Self {
        self.key(key);
        self.out.push('[');
        for (i, v) in values.iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            push_string(&mut self.out, v);
        }
        self.out.push(']');
        self
    }

    /// A nested object.
    pub fn obj(mut self, key: &str, value: JsonObject) -> Self {
        self.key(key);
        self.out.push_str(&value.finish());
        self
    }

    /// A latency summary in microseconds.
    pub fn summary_us(self, key: &str, s: &Summary) -> Self {
        let inner = JsonObject::new()
            .int("count", s.count as u64)
            .num("p50_us", us(s.p50))
            .num("p90_us", us(s.p90))
            .num("p99_us", us(s.p99))
            .num("max_us", us(s.max))
            .num("mean_us", us(s.mean));
        self.obj(key, inner)
    }

    /// `}`.
    pub fn finish(mut self) -> String {
        self.out.push('}');
        self.out
    }
}

fn push_string(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// A duration in microseconds with sub-microsecond precision.
pub fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// `p50 … p90 … p99 … max …` in the unit that reads best.
pub fn summary_line(s: &Summary) -> String {
    format!(
        "p50 {}  p90 {}  p99 {}  max {}  (n={})",
        human(s.p50),
        human(s.p90),
        human(s.p99),
        human(s.max),
        s.count
    )
}

/// A duration as µs below 10 ms, else ms.
pub fn human(d: Duration) -> String {
    let us = us(d);
    if us < 10_000.0 {
        format!("{us:.0} µs")
    } else {
        format!("{:.1} ms", us / 1000.0)
    }
}

/// Error samples as indented lines.
pub fn error_lines(errors: &[String]) -> String {
    let mut out = String::new();
    for e in errors {
        let _ = writeln!(out, "  error: {e}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_escaped_and_nested() {
        let j = JsonObject::new()
            .str("a", "x\"y\n")
            .int("b", 3)
            .num("c", f64::NAN)
            .obj("d", JsonObject::new().nums("e", &[1.5, 2.0]))
            .strs("f", &["g".into()])
            .finish();
        assert_eq!(
            j,
            r#"{"a":"x\"y\n","b":3,"c":null,"d":{"e":[1.5,2]},"f":["g"]}"#
        );
    }
}
