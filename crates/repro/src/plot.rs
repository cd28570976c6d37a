//! PNG figures from `results.json` (plotters, bitmap backend). Text uses the DejaVu Sans file that
//! `train plot` already ships in `data/fonts/`, embedded so no system font is needed.

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::coord::{CoordTranslate, Shift};
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::FontStyle;

use crate::paper;
use flash_ops_bench::Variant;

use crate::render::find;
use crate::results::{AttnRow, Results};

static FONT: &[u8] = include_bytes!("../../../data/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

fn font() {
    REGISTER.call_once(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, FONT).ok();
    });
}

pub(crate) fn e(x: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("drawing: {x}")
}

/// Fixed colours per implementation (by [`Variant::key`]) and for the papers' lines, the same
/// in every figure.
fn colour(key: &str) -> RGBColor {
    match (Variant::parse(key), key) {
        (Some(Variant::Naive), _) => RGBColor(120, 120, 120),
        (Some(Variant::V1), _) => RGBColor(31, 119, 180),
        (Some(Variant::V2), _) => RGBColor(214, 39, 40),
        (Some(Variant::CandleNn), _) => RGBColor(44, 160, 44),
        (Some(Variant::TorchSdpa), _) => RGBColor(23, 190, 207),
        (None, "paper") => RGBColor(255, 127, 14),
        (None, "paper-fa") => RGBColor(148, 103, 189),
        (None, _) => RGBColor(0, 0, 0),
    }
}

/// The legend box of every figure: upper left, over a translucent white background.
fn legend<'a, 'b: 'a, CT: CoordTranslate>(
    chart: &mut ChartContext<'a, BitMapBackend<'b>, CT>,
    font: u32,
) -> Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", font))
        .draw()
        .map_err(e)
}

pub(crate) struct Line {
    pub label: String,
    pub colour: RGBColor,
    pub points: Vec<(f64, f64)>,
    /// Paper lines are thin with hollow markers; ours thick with filled ones.
    pub paper: bool,
}

/// A line chart with log₂ x (sequence length) and linear or log y.
fn line_chart(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    y_desc: &str,
    lines: &[Line],
    log_y: bool,
    reference_one: bool,
) -> Result<()> {
    let one = reference_one.then_some("1× (standard attention)");
    line_chart_x(area, title, "sequence length", y_desc, lines, log_y, one)
}

/// A line chart with log₂ x (`x_desc`) and linear or log y; `reference_one` labels a line at 1.
pub(crate) fn line_chart_x(
    area: &DrawingArea<BitMapBackend, Shift>,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    lines: &[Line],
    log_y: bool,
    reference_one: Option<&str>,
) -> Result<()> {
    let pts = || lines.iter().flat_map(|l| l.points.iter());
    if pts().next().is_none() {
        return Ok(());
    }
    // x is drawn as log2(length) on a linear axis, so ticks land on powers of two.
    let xmin = pts().map(|p| p.0.log2()).fold(f64::INFINITY, f64::min) - 0.3;
    let xmax = pts().map(|p| p.0.log2()).fold(0.0, f64::max) + 0.3;
    let ymax = pts().map(|p| p.1).fold(0.0, f64::max);
    let ymin = pts().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let mut b = ChartBuilder::on(area);
    b.caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    let fmt_x = |x: &f64| {
        if (x - x.round()).abs() > 1e-6 {
            return String::new();
        }
        let n = 2f64.powf(x.round());
        if n >= 1024.0 {
            format!("{}K", n / 1024.0)
        } else {
            format!("{n:.0}")
        }
    };
    let fmt_y = |y: &f64| {
        if *y >= 10.0 || *y == 0.0 {
            format!("{y:.0}")
        } else {
            format!("{y:.1}")
        }
    };
    macro_rules! draw {
        ($chart:expr, $ylow:expr) => {{
            let mut chart = $chart;
            // Tick labels at the powers of two only (plotters' own key points are decimal).
            let base = area.get_base_pixel();
            for k in xmin.ceil() as i32..=xmax.floor() as i32 {
                let (px, py) = chart.backend_coord(&(k as f64, $ylow));
                let style = TextStyle::from(("sans-serif", 14).into_font())
                    .pos(Pos::new(HPos::Center, VPos::Top));
                area.draw(&Text::new(
                    fmt_x(&(k as f64)),
                    (px - base.0, py - base.1 + 6),
                    style,
                ))
                .map_err(e)?;
            }
            chart
                .configure_mesh()
                .x_desc(x_desc)
                .y_desc(y_desc)
                .x_labels(0)
                .y_label_formatter(&fmt_y)
                .label_style(("sans-serif", 14))
                .draw()
                .map_err(e)?;
            if let Some(one) = reference_one {
                chart
                    .draw_series(LineSeries::new([(xmin, 1.0), (xmax, 1.0)], BLACK.mix(0.5)))
                    .map_err(e)?
                    .label(one)
                    .legend(|(x, y)| PathElement::new([(x, y), (x + 18, y)], BLACK.mix(0.5)));
            }
            for l in lines {
                let c = l.colour;
                let pts: Vec<(f64, f64)> = l.points.iter().map(|p| (p.0.log2(), p.1)).collect();
                let w = if l.paper { 1 } else { 3 };
                chart
                    .draw_series(LineSeries::new(pts.clone(), c.stroke_width(w)))
                    .map_err(e)?
                    .label(l.label.clone())
                    .legend(move |(x, y)| {
                        PathElement::new([(x, y), (x + 18, y)], c.stroke_width(w))
                    });
                if l.paper {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.stroke_width(1))))
                        .map_err(e)?;
                } else {
                    chart
                        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, c.filled())))
                        .map_err(e)?;
                }
            }
            legend(&mut chart, 13)?;
        }};
    }
    if log_y {
        let c = b
            .build_cartesian_2d(xmin..xmax, (ymin / 2.0..ymax * 3.0).log_scale())
            .map_err(e)?;
        draw!(c, ymin / 2.0);
    } else {
        let top = if reference_one.is_some() {
            ymax.max(1.0)
        } else {
            ymax
        };
        let c = b
            .build_cartesian_2d(xmin..xmax, 0.0..top * 1.25)
            .map_err(e)?;
        draw!(c, 0.0);
    }
    Ok(())
}

fn speedup_line(
    rows: &[AttnRow],
    v: Variant,
    lengths: &[usize],
    d: usize,
    dropout: bool,
) -> Vec<(f64, f64)> {
    lengths
        .iter()
        .filter_map(|&n| {
            let f = find(rows, v, n, d, false, dropout)?.fwd_bwd_ms?;
            let b = find(rows, Variant::Naive, n, d, false, dropout)?.fwd_bwd_ms?;
            Some((n as f64, b / f))
        })
        .collect()
}

fn speedup(r: &Results, out: &Path) -> Result<()> {
    let Some(s) = &r.attention else { return Ok(()) };
    let root = BitMapBackend::new(out, (1400, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((1, 2));
    for (panel, dropout) in panels.iter().zip([false, true]) {
        let mut lines = Vec::new();
        for v in [Variant::V1, Variant::V2] {
            lines.push(Line {
                label: format!(
                    "ours: {}, {}, batch {} × {} heads, d {}",
                    v.name(),
                    crate::render::device_short(r),
                    s.setup.batch,
                    s.setup.heads,
                    s.setup.d
                ),
                colour: colour(v.key()),
                points: speedup_line(&s.rows, v, &s.setup.lengths, s.setup.d, dropout),
                paper: false,
            });
        }
        let p = if dropout {
            paper::FA1_SPEEDUP_DROPOUT_MASK
        } else {
            paper::FA1_SPEEDUP_PLAIN
        };
        lines.push(Line {
            label: "paper: FlashAttention, A100 fp16, batch 16".into(),
            colour: colour("paper"),
            points: paper::FA1_LENGTHS
                .iter()
                .zip(p)
                .map(|(&n, x)| (n as f64, x))
                .collect(),
            paper: true,
        });
        let title = format!(
            "fwd+bwd speedup over standard attention, {}",
            if dropout {
                "dropout + mask"
            } else {
                "no dropout, no mask"
            },
        );
        line_chart(panel, &title, "speedup (×)", &lines, false, true)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

fn memory(r: &Results, out: &Path) -> Result<()> {
    let Some(s) = &r.attention else { return Ok(()) };
    let root = BitMapBackend::new(out, (1000, 640)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let lengths = s.setup.memory_table_lengths();
    let ours = |v: Variant| -> Vec<(f64, f64)> {
        lengths
            .iter()
            .filter_map(|&n| {
                let m = find(&s.rows, v, n, s.setup.d, false, false)?.fwd_bwd_mem_bytes?;
                Some((n as f64, m as f64 / 1e6))
            })
            .collect()
    };
    let mut lines: Vec<Line> = [Variant::Naive, Variant::V1, Variant::V2]
        .into_iter()
        .map(|v| Line {
            label: format!("ours: {}", v.name()),
            colour: colour(v.key()),
            points: ours(v),
            paper: false,
        })
        .collect();
    // The paper's two memory columns: PyTorch, then FlashAttention.
    for (column, (who, key)) in [("PyTorch", "paper"), ("FlashAttention", "paper-fa")]
        .into_iter()
        .enumerate()
    {
        lines.push(Line {
            label: format!("paper: {who} (A100, batch 16, fp16)"),
            colour: colour(key),
            points: paper::FA1_LENGTHS
                .iter()
                .zip(paper::FA1_MEMORY_MB)
                .map(|(&n, (torch, flash))| (n as f64, [torch, flash][column]))
                .collect(),
            paper: true,
        });
    }
    let oom: Vec<usize> = lengths
        .iter()
        .copied()
        .filter(|&n| {
            find(&s.rows, Variant::Naive, n, s.setup.d, false, false)
                .is_some_and(|x| x.skipped.is_some())
        })
        .collect();
    let title = format!(
        "fwd+bwd peak memory (ours: {}, batch {} × {} heads, d {}; standard over the {} budget at {})",
        crate::render::device_short(r),
        s.setup.batch,
        s.setup.heads,
        s.setup.d,
        crate::measure::bytes(s.memory_budget_bytes as f64),
        if oom.is_empty() { "no length".to_string() } else { oom.iter().map(|n| n.to_string()).collect::<Vec<_>>().join(", ") }
    );
    line_chart(&root, &title, "MB (log scale)", &lines, true, false)?;
    root.present().map_err(e)?;
    Ok(())
}

/// Which GFLOP/s a bar chart shows.
#[derive(Clone, Copy)]
enum Pass {
    Fwd,
    Bwd,
    FwdBwd,
}

fn gflops(r: &AttnRow, p: Pass) -> Option<f64> {
    match p {
        Pass::Fwd => r.gflops_fwd(),
        Pass::Bwd => r.gflops_bwd(),
        Pass::FwdBwd => r.gflops_fwd_bwd(),
    }
}

struct Bars<'a> {
    title: String,
    y_desc: &'a str,
    groups: Vec<String>,
    /// (series key for the colour, label, value per group)
    series: Vec<(String, String, Vec<Option<f64>>)>,
}

/// A bar's value label: 2–3 significant digits.
fn short(v: f64) -> String {
    if v >= 10.0 {
        format!("{v:.0}")
    } else if v >= 1.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Grouped bars, one group per x label, values written above the bars (the papers' style).
fn bar_chart(area: &DrawingArea<BitMapBackend, Shift>, b: &Bars) -> Result<()> {
    let ymax = b
        .series
        .iter()
        .flat_map(|s| s.2.iter().flatten())
        .fold(0.0f64, |m, &v| m.max(v))
        .max(1e-9);
    let groups = b.groups.len().max(1);
    let mut chart = ChartBuilder::on(area)
        .caption(&b.title, ("sans-serif", 18))
        .margin(12)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..groups as f64, 0.0..ymax * 1.3)
        .map_err(e)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(0)
        .y_desc(b.y_desc)
        .label_style(("sans-serif", 13))
        .draw()
        .map_err(e)?;
    let k = b.series.len().max(1) as f64;
    let width = 0.8 / k;
    for (si, (key, label, vals)) in b.series.iter().enumerate() {
        let c = colour(key);
        let rects = vals.iter().enumerate().filter_map(|(g, v)| {
            let x0 = g as f64 + 0.1 + si as f64 * width;
            v.map(|v| Rectangle::new([(x0, 0.0), (x0 + width * 0.92, v)], c.filled()))
        });
        chart
            .draw_series(rects)
            .map_err(e)?
            .label(label.clone())
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 14, y + 5)], c.filled()));
        let texts = vals.iter().enumerate().filter_map(|(g, v)| {
            let x = g as f64 + 0.1 + (si as f64 + 0.1) * width;
            v.map(|v| Text::new(short(v), (x, v + ymax * 0.02), ("sans-serif", 11)))
        });
        chart.draw_series(texts).map_err(e)?;
        // Cells not measured (over the memory budget) are marked where the bar would be.
        let missing = vals
            .iter()
            .enumerate()
            .filter(|(_, v)| v.is_none())
            .map(|(g, _)| {
                let x = g as f64 + 0.1 + si as f64 * width;
                Text::new(
                    "OOM",
                    (x, ymax * 0.03),
                    ("sans-serif", 10).into_font().color(&c),
                )
            });
        chart.draw_series(missing).map_err(e)?;
    }
    for (g, label) in b.groups.iter().enumerate() {
        let (px, py) = chart.backend_coord(&(g as f64 + 0.5, 0.0));
        let style =
            TextStyle::from(("sans-serif", 14).into_font()).pos(Pos::new(HPos::Center, VPos::Top));
        area.draw(&Text::new(
            label.clone(),
            (
                px - area.get_base_pixel().0,
                py - area.get_base_pixel().1 + 6,
            ),
            style,
        ))
        .map_err(e)?;
    }
    legend(&mut chart, 12)
}

fn fa2(r: &Results, out: &Path, pass: Pass) -> Result<()> {
    let Some(s) = &r.fa2 else { return Ok(()) };
    let cols = 2;
    let rows_n = (s.setup.head_dims.len() * 2).div_ceil(cols);
    let root = BitMapBackend::new(out, (1400, 480 * rows_n as u32)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((rows_n, cols));
    let pass_name = match pass {
        Pass::Fwd => "forward",
        Pass::Bwd => "backward",
        Pass::FwdBwd => "forward+backward",
    };
    let measured = |v: Variant| s.rows.iter().any(|x| x.variant == v.key());
    let mut variants = vec![Variant::Naive, Variant::V1, Variant::V2];
    if matches!(pass, Pass::Fwd) && measured(Variant::CandleNn) {
        variants.push(Variant::CandleNn);
    }
    if measured(Variant::TorchSdpa) {
        variants.push(Variant::TorchSdpa);
    }
    let mut i = 0;
    for &d in &s.setup.head_dims {
        for causal in [false, true] {
            let series = variants
                .iter()
                .map(|&v| {
                    let vals = s
                        .setup
                        .lengths
                        .iter()
                        .map(|&n| {
                            find(&s.rows, v, n, d, causal, false).and_then(|x| gflops(x, pass))
                        })
                        .collect();
                    (v.key().to_string(), v.name().to_string(), vals)
                })
                .collect();
            let bars = Bars {
                title: format!(
                    "{pass_name}, {}, head dim {d} ({} tokens, hidden {})",
                    if causal { "causal" } else { "non-causal" },
                    s.setup.tokens,
                    s.setup.hidden
                ),
                y_desc: "GFLOP/s",
                groups: s.setup.lengths.iter().map(|n| format!("seq {n}")).collect(),
                series,
            };
            bar_chart(&panels[i], &bars)?;
            i += 1;
        }
    }
    root.present().map_err(e)?;
    Ok(())
}

fn e2e(r: &Results, out: &Path) -> Result<()> {
    let Some(s) = &r.e2e else { return Ok(()) };
    let runs: Vec<_> = s.runs.iter().filter(|x| x.report.is_some()).collect();
    if runs.is_empty() {
        return Ok(());
    }
    let root = BitMapBackend::new(out, (560 * runs.len() as u32, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let panels = root.split_evenly((1, runs.len()));
    for (panel, run) in panels.iter().zip(runs) {
        let rep = run.report.as_ref().expect("filtered");
        let rows = rep["rows"].as_array().cloned().unwrap_or_default();
        let mut seqs: Vec<u64> = rows.iter().filter_map(|x| x["seq_len"].as_u64()).collect();
        seqs.dedup();
        // `train bench` names its rows by the models' attention kind.
        let series = [Variant::Naive, Variant::V1, Variant::V2]
            .into_iter()
            .filter_map(|v| Some((v, v.kind()?.to_string())))
            .map(|(v, kind)| {
                let vals = seqs
                    .iter()
                    .map(|&n| {
                        rows.iter()
                            .find(|x| {
                                x["seq_len"].as_u64() == Some(n)
                                    && x["attn"].as_str() == Some(kind.as_str())
                            })
                            .and_then(|x| x["tokens_per_s"].as_f64())
                    })
                    .collect();
                (v.key().to_string(), v.name().to_string(), vals)
            })
            .collect();
        let bars = Bars {
            title: run.label.clone(),
            y_desc: "training tokens/s",
            groups: seqs.iter().map(|n| format!("seq {n}")).collect(),
            series,
        };
        bar_chart(panel, &bars)?;
    }
    root.present().map_err(e)?;
    Ok(())
}

/// A figure of one section's own, drawn into the path it is given.
type SectionPlot<'a> = Box<dyn Fn(&Path) -> Result<()> + 'a>;

/// `plot` of section `s`, when the run has the section.
fn section<'a, S>(s: &'a Option<S>, plot: fn(&S, &Path) -> Result<()>) -> Option<SectionPlot<'a>> {
    s.as_ref()
        .map(|s| Box::new(move |p: &Path| plot(s, p)) as SectionPlot<'a>)
}

/// Writes every figure into `dir`; returns the files written.
pub fn all(r: &Results, dir: &Path) -> Result<Vec<String>> {
    font();
    let mut written = Vec::new();
    let mut go = |name: &str, f: &dyn Fn(&Path) -> Result<()>| -> Result<()> {
        let path = dir.join(name);
        f(&path)?;
        if path.exists() {
            written.push(name.to_string());
        }
        Ok(())
    };
    go("speedup.png", &|p| speedup(r, p))?;
    go("memory.png", &|p| memory(r, p))?;
    go("fa2_fwd_bwd.png", &|p| fa2(r, p, Pass::FwdBwd))?;
    go("fa2_fwd.png", &|p| fa2(r, p, Pass::Fwd))?;
    go("fa2_bwd.png", &|p| fa2(r, p, Pass::Bwd))?;
    go("e2e.png", &|p| e2e(r, p))?;
    let sections = [
        ("prefix.png", section(&r.prefix, crate::prefix::plot)),
        (
            "blocksparse.png",
            section(&r.blocksparse, crate::blocksparse::plot),
        ),
        ("context.png", section(&r.context, crate::context::plot)),
        ("listops.png", section(&r.listops, crate::listops::plot)),
    ];
    for (name, plot) in &sections {
        if let Some(plot) = plot {
            go(name, plot)?;
        }
    }
    Ok(written)
}
