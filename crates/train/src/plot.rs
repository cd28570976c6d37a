//! `train plot`: loss curves of one or more run folders (train and validation loss against
//! tokens) to PNG, with the corpus' unigram entropy as a reference line. Text is drawn with the
//! DejaVu Sans font embedded from `data/fonts/` (no system fonts needed).

use std::path::{Path, PathBuf};
use std::sync::Once;

use anyhow::{bail, Result};
use clap::Args;
use plotters::prelude::*;
use plotters::style::FontStyle;

use crate::metrics;

static FONT: &[u8] = include_bytes!("../../../data/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run folders (each holds metrics.jsonl); several are drawn on one chart.
    #[arg(long = "run", num_args = 1.., required = true)]
    pub runs: Vec<PathBuf>,
    /// Output PNG (default: loss.png in the first run folder).
    #[arg(long)]
    pub out: Option<PathBuf>,
}

pub fn run(a: PlotArgs) -> Result<()> {
    let out = a.out.clone().unwrap_or_else(|| a.runs[0].join("loss.png"));
    crate::metrics::ensure_writable_parent(&out)?;
    render_runs(&a.runs, &out)?;
    println!("wrote {}", out.display());
    Ok(())
}

struct Series {
    label: String,
    train: Vec<(f64, f64)>,
    val: Vec<(f64, f64)>,
    entropy: Option<f64>,
}

fn load(run: &Path) -> Result<Series> {
    let recs = metrics::read(&metrics::Metrics::path(run))?;
    let get = |kind: &str| -> Vec<(f64, f64)> {
        recs.iter()
            .filter(|r| r["kind"] == kind)
            .filter_map(|r| Some((r["tokens"].as_f64()? / 1e6, r["loss"].as_f64()?)))
            .filter(|(_, l)| l.is_finite())
            .collect()
    };
    let settings: Option<serde_json::Value> = std::fs::read_to_string(run.join("run.json"))
        .ok()
        .and_then(|s| serde_json::from_str(&s).ok());
    let label = settings
        .as_ref()
        .and_then(|s| {
            s["attn"]
                .as_str()
                .map(|a| format!("{} ({a})", run.display()))
        })
        .unwrap_or_else(|| run.display().to_string());
    Ok(Series {
        label,
        train: smooth(&get("train"), 10),
        val: get("val"),
        entropy: settings.and_then(|s| s["unigram_entropy"].as_f64()),
    })
}

/// Trailing moving average over `w` points (train loss is noisy per step).
fn smooth(xs: &[(f64, f64)], w: usize) -> Vec<(f64, f64)> {
    (0..xs.len())
        .map(|i| {
            let lo = i.saturating_sub(w - 1);
            let m = xs[lo..=i].iter().map(|p| p.1).sum::<f64>() / (i + 1 - lo) as f64;
            (xs[i].0, m)
        })
        .collect()
}

pub fn render_runs(runs: &[PathBuf], out: &Path) -> Result<()> {
    REGISTER.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).ok();
    });
    let series: Vec<Series> = runs.iter().map(|r| load(r)).collect::<Result<_>>()?;
    let pts = || series.iter().flat_map(|s| s.train.iter().chain(&s.val));
    if pts().next().is_none() {
        bail!("the runs have no loss records yet; train for a few steps first")
    }
    let xmax = pts().map(|p| p.0).fold(0.0, f64::max).max(1e-6);
    let ymax = pts().map(|p| p.1).fold(0.0, f64::max) * 1.05;
    let ymin = pts()
        .map(|p| p.1)
        .chain(series.iter().filter_map(|s| s.entropy))
        .fold(f64::INFINITY, f64::min)
        * 0.95;
    let err = |e: &dyn std::fmt::Display| anyhow::anyhow!("drawing {}: {e}", out.display());
    let root = BitMapBackend::new(out, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("loss (nats/token)", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(40)
        .y_label_area_size(55)
        .build_cartesian_2d(0.0..xmax * 1.02, ymin..ymax)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("training tokens (millions)")
        .y_desc("loss")
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    for (i, s) in series.iter().enumerate() {
        let c = Palette99::pick(i).to_rgba();
        let label = s.label.clone();
        chart
            .draw_series(LineSeries::new(
                s.train.clone(),
                c.mix(0.45).stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{label} train"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.mix(0.45)));
        chart
            .draw_series(LineSeries::new(s.val.clone(), c.stroke_width(3)))
            .map_err(|e| err(&e))?
            .label(format!("{label} val"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 18, y)], c.stroke_width(3)));
        chart
            .draw_series(s.val.iter().map(|&p| Circle::new(p, 3, c.filled())))
            .map_err(|e| err(&e))?;
    }
    if let Some(h) = series.iter().find_map(|s| s.entropy) {
        chart
            .draw_series(LineSeries::new(
                [(0.0, h), (xmax * 1.02, h)],
                BLACK.mix(0.6).stroke_width(1),
            ))
            .map_err(|e| err(&e))?
            .label(format!("unigram entropy {h:.2}"))
            .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.6)));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
