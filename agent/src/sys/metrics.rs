//! A small writer of the Prometheus text exposition format (version
//! 0.0.4), for the node_exporter textfile the agent and `apply` write and
//! for `imageupd serve`'s `/metrics`. The metrics themselves are declared
//! next to the code they measure (`crate::apply::metrics`,
//! `crate::publish::serve::metrics`); this file knows only the format.
//!
//! Every family gets its `# HELP` and `# TYPE` lines before its samples,
//! label values are escaped (`\\`, `\"`, `\n`), HELP text too (`\\`, `\n`),
//! and a family is written once even when it has several samples.

/// Prefix of every metric name imageupd exposes.
pub const PREFIX: &str = "imageupd_";

/// Content type of the text format, for an HTTP response.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// A metric family's type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Goes up and down.
    Gauge,
    /// Only goes up (names end in `_total`).
    Counter,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Gauge => "gauge",
            Kind::Counter => "counter",
        }
    }
}

/// A metric family: name (with [`PREFIX`]), type and help, declared as a
/// constant next to the code it measures.
#[derive(Clone, Copy, Debug)]
pub struct Family {
    /// Full name, e.g. `imageupd_last_apply_timestamp_seconds`.
    pub name: &'static str,
    /// Gauge or counter.
    pub kind: Kind,
    /// One line for `# HELP`.
    pub help: &'static str,
}

/// A text exposition being built.
#[derive(Default)]
pub struct Exposition {
    out: String,
    /// Families already headed (HELP/TYPE written).
    headed: Vec<&'static str>,
}

impl Exposition {
    /// An empty exposition.
    pub fn new() -> Self {
        Self::default()
    }

    /// One sample of `family` with `labels` (name, value) and `value`.
    /// The family's HELP and TYPE lines are written before its first
    /// sample; samples of one family must be added together.
    pub fn sample(&mut self, family: &Family, labels: &[(&str, &str)], value: f64) {
        debug_assert!(family.name.starts_with(PREFIX), "{}", family.name);
        if self.headed.last() != Some(&family.name) {
            debug_assert!(
                !self.headed.contains(&family.name),
                "samples of {} added apart",
                family.name
            );
            self.headed.push(family.name);
            self.head(family);
        }
        self.out.push_str(family.name);
        if !labels.is_empty() {
            self.out.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.out.push(',');
                }
                self.out.push_str(&format!("{k}=\"{}\"", escape_label(v)));
            }
            self.out.push('}');
        }
        self.out.push(' ');
        self.out.push_str(&format_value(value));
        self.out.push('\n');
    }

    /// Just the HELP and TYPE lines of a family that has no sample now
    /// (so that the family is always listed).
    pub fn declare(&mut self, family: &Family) {
        if !self.headed.contains(&family.name) {
            self.headed.push(family.name);
            self.head(family);
        }
    }

    fn head(&mut self, family: &Family) {
        self.out.push_str(&format!(
            "# HELP {} {}\n# TYPE {} {}\n",
            family.name,
            escape_help(family.help),
            family.name,
            family.kind.as_str()
        ));
    }

    /// The text.
    pub fn finish(self) -> String {
        self.out
    }
}

/// Escape a label value: backslash, double quote and line feed.
pub fn escape_label(v: &str) -> String {
    let mut s = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '\\' => s.push_str("\\\\"),
            '"' => s.push_str("\\\""),
            '\n' => s.push_str("\\n"),
            c => s.push(c),
        }
    }
    s
}

/// Escape HELP text: backslash and line feed.
pub fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A sample value: integers without a fraction, `NaN`, `+Inf`, `-Inf`.
pub fn format_value(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf" } else { "-Inf" }.into()
    } else if v.fract() == 0.0 && v.abs() < 9.0e15 {
        format!("{}", v as i64)
    } else {
        // Shortest round-trip form, with an exponent when large or small.
        format!("{v:?}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const F: Family = Family {
        name: "imageupd_test_total",
        kind: Kind::Counter,
        help: "A test\\counter\nwith two lines.",
    };
    const G: Family = Family {
        name: "imageupd_test_gauge",
        kind: Kind::Gauge,
        help: "A gauge.",
    };

    #[test]
    fn families_are_headed_once_and_labels_escaped() {
        let mut e = Exposition::new();
        e.sample(&F, &[("kind", "object"), ("status", "2xx")], 3.0);
        e.sample(&F, &[("kind", "a\"b\\c\nd")], 1.0);
        e.sample(&G, &[], 0.25);
        e.declare(&G);
        let t = e.finish();
        assert_eq!(
            t,
            "# HELP imageupd_test_total A test\\\\counter\\nwith two lines.\n\
             # TYPE imageupd_test_total counter\n\
             imageupd_test_total{kind=\"object\",status=\"2xx\"} 3\n\
             imageupd_test_total{kind=\"a\\\"b\\\\c\\nd\"} 1\n\
             # HELP imageupd_test_gauge A gauge.\n\
             # TYPE imageupd_test_gauge gauge\n\
             imageupd_test_gauge 0.25\n"
        );
    }

    #[test]
    fn values() {
        assert_eq!(format_value(12.0), "12");
        assert_eq!(format_value(-3.0), "-3");
        assert_eq!(format_value(1.5), "1.5");
        assert_eq!(format_value(f64::NAN), "NaN");
        assert_eq!(format_value(f64::INFINITY), "+Inf");
        assert_eq!(format_value(1e300), "1e300");
    }

    #[test]
    fn declare_without_samples_lists_the_family() {
        let mut e = Exposition::new();
        e.declare(&G);
        assert_eq!(
            e.finish(),
            "# HELP imageupd_test_gauge A gauge.\n# TYPE imageupd_test_gauge gauge\n"
        );
    }
}
