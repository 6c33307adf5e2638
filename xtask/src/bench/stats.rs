//! The sections' bookkeeping: rounds of measurements, and the figures the
//! tables and latest.json give of them (median and spread).

use anyhow::Result;
use serde_json::{Map, Value, json};

/// Runs `measure(round, config)` for every configuration in each of
/// `rounds` rounds, each round starting one configuration later than the
/// one before, so that no configuration always follows the same one. The
/// samples, per configuration.
pub fn rotated<T>(
    rounds: usize,
    configs: usize,
    mut measure: impl FnMut(usize, usize) -> Result<T>,
) -> Result<Vec<Vec<T>>> {
    let mut samples: Vec<Vec<T>> = (0..configs).map(|_| Vec::new()).collect();
    for round in 0..rounds {
        for k in 0..configs {
            let i = (k + round) % configs;
            let sample = measure(round, i)?;
            samples[i].push(sample);
        }
    }
    Ok(samples)
}

/// One figure of every sample, e.g. every round's throughput.
pub fn column<T>(samples: &[T], figure: impl Fn(&T) -> f64) -> Vec<f64> {
    samples.iter().map(figure).collect()
}

/// Median of a sample (sorted copy); 0 for an empty one.
pub fn median(xs: &[f64]) -> f64 {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

/// Value at quantile `q` (0..=1) of a sample, nearest rank.
pub fn quantile(xs: &[f64], q: f64) -> f64 {
    let mut v: Vec<f64> = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() {
        return 0.0;
    }
    let idx = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len()) - 1;
    v[idx]
}

pub fn min_max(xs: &[f64]) -> (f64, f64) {
    let lo = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if xs.is_empty() { (0.0, 0.0) } else { (lo, hi) }
}

/// `median (min–max)` with `digits` decimals.
pub fn spread(xs: &[f64], digits: usize) -> String {
    let (lo, hi) = min_max(xs);
    format!(
        "{:.*} ({:.*}–{:.*})",
        digits,
        median(xs),
        digits,
        lo,
        digits,
        hi
    )
}

/// `{median, min, max, samples}` for latest.json.
pub fn stats_json(xs: &[f64]) -> Value {
    let (lo, hi) = min_max(xs);
    json!({"median": median(xs), "min": lo, "max": hi, "samples": xs})
}

/// A table with a row per configuration: the markdown (`header`, then the
/// rows) and latest.json's object of the configurations by key. `rows`:
/// each configuration's key, markdown row and JSON.
pub fn config_table(
    header: &str,
    rows: impl IntoIterator<Item = (&'static str, String, Value)>,
) -> (String, Map<String, Value>) {
    let mut md = header.to_string();
    let mut configs = Map::new();
    for (key, row, json) in rows {
        md.push_str(&row);
        md.push('\n');
        configs.insert(key.into(), json);
    }
    (md, configs)
}

/// "met" / "MISSED".
pub fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "MISSED" }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn median_and_quantiles() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert_eq!(median(&[]), 0.0);
        let xs: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(quantile(&xs, 0.99), 99.0);
        assert_eq!(quantile(&xs, 0.5), 50.0);
    }

    #[test]
    fn spread_is_median_and_range() {
        assert_eq!(spread(&[3.0, 1.0, 2.0], 1), "2.0 (1.0–3.0)");
        assert_eq!(spread(&[], 0), "0 (0–0)");
    }

    #[test]
    fn config_tables_have_a_row_and_an_entry_each() {
        let (md, json) = config_table(
            "| a |\n",
            [
                ("x", "| 1 |".to_string(), json!(1)),
                ("y", "| 2 |".to_string(), json!(2)),
            ],
        );
        assert_eq!(md, "| a |\n| 1 |\n| 2 |\n");
        assert_eq!(Value::Object(json), json!({"x": 1, "y": 2}));
    }

    #[test]
    fn rounds_rotate_the_order() -> Result<()> {
        let mut order = Vec::new();
        let samples = rotated(3, 3, |round, i| {
            order.push(i);
            Ok(round * 10 + i)
        })?;
        assert_eq!(order, [0, 1, 2, 1, 2, 0, 2, 0, 1]);
        assert_eq!(samples, [vec![0, 10, 20], vec![1, 11, 21], vec![2, 12, 22]]);
        assert_eq!(column(&samples[1], |s| *s as f64), [1.0, 11.0, 21.0]);
        Ok(())
    }
}
