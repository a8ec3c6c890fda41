//! A Prometheus text exposition (what the agent's `/metrics` serves),
//! parsed into samples that a test can sum by name and labels.

use std::collections::BTreeSet;

/// One sample line: `name{label="value",...} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: Vec<(String, String)>,
    pub value: f64,
}

impl Sample {
    /// The value of label `name`, if the sample has it.
    pub fn label(&self, name: &str) -> Option<&str> {
        self.labels
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Every sample of an exposition, in order.
#[derive(Debug, Clone, Default)]
pub struct Exposition {
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Parses the text format; comments and lines it cannot read are
    /// skipped.
    pub fn parse(text: &str) -> Exposition {
        Exposition {
            samples: text
                .lines()
                .filter(|l| !l.starts_with('#'))
                .filter_map(sample)
                .collect(),
        }
    }

    /// The samples named `name` that carry every label of `labels`.
    pub fn matching<'a>(
        &'a self,
        name: &'a str,
        labels: &'a [(&str, &str)],
    ) -> impl Iterator<Item = &'a Sample> + 'a {
        self.samples
            .iter()
            .filter(move |s| s.name == name && labels.iter().all(|(k, v)| s.label(k) == Some(*v)))
    }

    /// The sum of the samples named `name` that carry every label of
    /// `labels` (0 when there are none, as for a counter never counted).
    pub fn sum(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// The one sample named `name` whose labels are exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        self.matching(name, labels)
            .find(|s| s.labels.len() == labels.len())
            .map(|s| s.value)
    }

    /// The metric names that have samples.
    pub fn names(&self) -> BTreeSet<&str> {
        self.samples.iter().map(|s| s.name.as_str()).collect()
    }
}

fn sample(line: &str) -> Option<Sample> {
    let line = line.trim();
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, labels) = match series.split_once('{') {
        None => (series, Vec::new()),
        Some((name, rest)) => (name, labels(rest.strip_suffix('}')?)?),
    };
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// `a="x",b="y\"z"` into pairs, with the value's escapes undone.
fn labels(mut text: &str) -> Option<Vec<(String, String)>> {
    let mut out = Vec::new();
    while !text.is_empty() {
        let (name, rest) = text.split_once("=\"")?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            match chars.next()? {
                (i, '"') => break i,
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    c => value.push(c),
                },
                (_, c) => value.push(c),
            }
        };
        out.push((name.trim_start_matches(',').to_owned(), value));
        text = rest[end + 1..].trim_start_matches(',');
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = "# HELP sluice_x_total Connections.\n\
        # TYPE sluice_x_total counter\n\
        sluice_x_total{reason=\"plaintext\",mode=\"proxy\"} 3\n\
        sluice_x_total{reason=\"denied\",mode=\"proxy\"} 2\n\
        sluice_x_total{reason=\"plaintext\",mode=\"kernel\"} 4\n\
        sluice_build_info{version=\"0.1.0\",note=\"a \\\"quoted\\\", b\"} 1\n\
        sluice_up 1\n\
        # EOF\n";

    #[test]
    fn samples_are_summed_by_any_of_their_labels() {
        let e = Exposition::parse(TEXT);
        assert_eq!(e.sum("sluice_x_total", &[]), 9.0);
        assert_eq!(e.sum("sluice_x_total", &[("reason", "plaintext")]), 7.0);
        assert_eq!(e.sum("sluice_x_total", &[("mode", "kernel")]), 4.0);
        assert_eq!(e.sum("sluice_missing_total", &[]), 0.0);
        assert_eq!(e.get("sluice_up", &[]), Some(1.0));
        assert_eq!(e.get("sluice_x_total", &[("reason", "plaintext")]), None);
    }

    #[test]
    fn quoted_label_values_are_read_back() {
        let e = Exposition::parse(TEXT);
        let info = e.matching("sluice_build_info", &[]).next().unwrap();
        assert_eq!(info.label("note"), Some("a \"quoted\", b"));
        assert_eq!(
            e.names().into_iter().collect::<Vec<_>>(),
            ["sluice_build_info", "sluice_up", "sluice_x_total"]
        );
    }
}
