//! SVG charts of a bench run, next to its JSON: ns per verdict class (the
//! guard against the parse→drop floor and xdp-filter) and packets/s per
//! configuration on the veth pair. Drawn with plotters from the JSON the
//! sections wrote, so `cargo xtask charts FILE` redraws an older run.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result};
use plotters::{
    prelude::*,
    style::text_anchor::{HPos, Pos, VPos},
};
use serde_json::Value;

const WIDTH: u32 = 960;
const ROW: u32 = 30;
/// Guard, parse→drop floor, xdp-filter.
const COLOURS: [RGBColor; 3] = [
    RGBColor(31, 119, 180),
    RGBColor(160, 160, 160),
    RGBColor(255, 127, 14),
];

/// Horizontal bars: per row a label and up to three values (median), one
/// per series; missing values are left out.
fn bars(
    path: &Path,
    title: &str,
    unit: &str,
    series: &[&str],
    rows: &[(String, Vec<Option<f64>>)],
) -> Result<()> {
    let height = 90 + ROW * rows.len() as u32 * series.len() as u32 / 2 + ROW * rows.len() as u32;
    let root = SVGBackend::new(path, (WIDTH, height)).into_drawing_area();
    root.fill(&WHITE)?;
    let max = rows
        .iter()
        .flat_map(|(_, vs)| vs.iter().flatten())
        .copied()
        .fold(1.0, f64::max);
    let n = rows.len() as f64;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(10)
        .x_label_area_size(40)
        .y_label_area_size(330)
        .build_cartesian_2d(0.0..max * 1.1, 0.0..n)?;
    // Row labels are drawn by hand, centred on their bars: the axis would
    // put its ticks between rows.
    chart
        .configure_mesh()
        .disable_y_mesh()
        .x_desc(unit)
        .y_labels(0)
        .draw()?;
    let label_style =
        TextStyle::from(("sans-serif", 13).into_font()).pos(Pos::new(HPos::Right, VPos::Center));
    for (i, (label, _)) in rows.iter().enumerate() {
        let (x, y) = chart.backend_coord(&(0.0, n - i as f64 - 0.5));
        root.draw(&Text::new(label.clone(), (x - 8, y), label_style.clone()))?;
    }
    let band = 0.8 / series.len() as f64;
    for (k, name) in series.iter().enumerate() {
        let colour = COLOURS[k % COLOURS.len()];
        let rects = rows.iter().enumerate().filter_map(|(i, (_, vs))| {
            let v = (*vs.get(k)?)?;
            let top = n - i as f64 - 0.1 - band * k as f64;
            Some(Rectangle::new(
                [(0.0, top - band), (v, top)],
                colour.filled(),
            ))
        });
        chart
            .draw_series(rects)?
            .label(*name)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 12, y + 5)], colour.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

fn median(v: &Value) -> Option<f64> {
    v["median"].as_f64()
}

/// Short row labels: the class label up to its first parenthesis.
fn short(label: &str) -> String {
    let cut = label.split(" (").next().unwrap_or(label);
    if cut.chars().count() > 48 {
        format!("{}…", cut.chars().take(47).collect::<String>())
    } else {
        cut.to_string()
    }
}

/// Draws the charts `run` (a bench run's JSON) has data for into `dir`;
/// the files written.
pub fn write(run: &Value, dir: &Path, stem: &str) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    if let Some(classes) = run["verdict"]["classes"].as_object() {
        let rows: Vec<(String, Vec<Option<f64>>)> = classes
            .values()
            .map(|c| {
                let ns = &c["ns"];
                (
                    short(c["label"].as_str().unwrap_or("?")),
                    vec![
                        median(&ns["guard"]),
                        median(&ns["parse_drop"]),
                        median(&ns["xdp_filter"]),
                    ],
                )
            })
            .collect();
        let path = dir.join(format!("{stem}-verdict.svg"));
        bars(
            &path,
            "Verdict cost per frame (BPF_PROG_TEST_RUN, median)",
            "ns per frame",
            &["portwatch guard", "parse→drop floor", "xdp-filter"],
            &rows,
        )
        .with_context(|| format!("drawing {}", path.display()))?;
        out.push(path);
    }
    if let Some(configs) = run["veth"]["configs"].as_object() {
        let rows: Vec<(String, Vec<Option<f64>>)> = configs
            .values()
            .map(|c| {
                (
                    short(c["label"].as_str().unwrap_or("?")),
                    vec![median(&c["packets_per_s"]).map(|p| p / 1e3)],
                )
            })
            .collect();
        let path = dir.join(format!("{stem}-veth.svg"));
        bars(
            &path,
            "Drop throughput on a veth pair (TCP SYN flood, median)",
            "thousand packets/s",
            &["packets/s"],
            &rows,
        )
        .with_context(|| format!("drawing {}", path.display()))?;
        out.push(path);
    }
    Ok(out)
}
