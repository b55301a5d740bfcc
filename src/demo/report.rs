//! The demo's results table and report files: `results.txt`, `curves.csv` and two PNG charts (plotters) — learning curves (CTR
//! per variant over time, with the random and oracle rankings' expected CTR) and freshness.
//!
//! Text is drawn with a system TrueType font (DejaVu Sans, Debian's fonts-dejavu-core); without
//! one the charts are skipped with a message and the CSV is still written.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::{register_font, FontStyle};

use super::{percentile, Lift, Outcome, Tally, BUCKET_MS};

const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn load_font() -> bool {
    static LOADED: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *LOADED.get_or_init(|| {
        for p in FONT_PATHS {
            if let Ok(bytes) = std::fs::read(p) {
                // plotters keeps registered fonts for the life of the process.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

pub fn write(o: &Outcome, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    let csv = dir.join("curves.csv");
    let mut text = String::from(
        "window_start_s,treatment_impressions,treatment_ctr,treatment_expected_ctr,holdout_impressions,holdout_ctr,holdout_expected_ctr,random_expected_ctr,oracle_expected_ctr,freshness_p50_ms,freshness_p99_ms\n",
    );
    for (i, b) in o.buckets.iter().enumerate() {
        let mut all = b.treatment;
        all.merge(&b.holdout);
        let mut f = b.freshness_ms.clone();
        f.sort_unstable();
        let opt = |v: Option<i64>| v.map_or(String::new(), |v| v.to_string());
        text.push_str(&format!(
            "{},{},{:.5},{:.5},{},{:.5},{:.5},{:.5},{:.5},{},{}\n",
            i as i64 * BUCKET_MS / 1000,
            b.treatment.impressions,
            b.treatment.ctr(),
            b.treatment.per(b.treatment.expected),
            b.holdout.impressions,
            b.holdout.ctr(),
            b.holdout.per(b.holdout.expected),
            all.per(all.random),
            all.per(all.oracle),
            opt(percentile(&f, 0.5)),
            opt(percentile(&f, 0.99)),
        ));
    }
    std::fs::write(&csv, text).with_context(|| format!("writing {}", csv.display()))?;
    out.push(csv);
    if !load_font() {
        eprintln!(
            "no DejaVu Sans font found (install fonts-dejavu-core): charts skipped, curves.csv written"
        );
        return Ok(out);
    }
    let learning = dir.join("learning.png");
    learning_chart(o, &learning).with_context(|| format!("drawing {}", learning.display()))?;
    out.push(learning);
    let fresh = dir.join("freshness.png");
    freshness_chart(o, &fresh).with_context(|| format!("drawing {}", fresh.display()))?;
    out.push(fresh);
    Ok(out)
}

type Series = Vec<(f64, f64)>;

fn learning_chart(o: &Outcome, path: &Path) -> anyhow::Result<()> {
    let x = |i: usize| (i as f64 + 0.5) * BUCKET_MS as f64 / 1000.0;
    let mut series: Vec<(&str, RGBColor, Series)> = vec![
        ("treatment CTR (measured)", RGBColor(31, 119, 180), Vec::new()),
        ("holdout CTR (measured)", RGBColor(214, 39, 40), Vec::new()),
        ("treatment expected CTR", RGBColor(120, 180, 230), Vec::new()),
        ("uniformly random (expected)", RGBColor(127, 127, 127), Vec::new()),
        ("oracle ranking (expected)", RGBColor(44, 160, 44), Vec::new()),
    ];
    for (i, b) in o.buckets.iter().enumerate() {
        let mut all = b.treatment;
        all.merge(&b.holdout);
        if b.treatment.impressions > 0 {
            series[0].2.push((x(i), b.treatment.ctr()));
            series[2].2.push((x(i), b.treatment.per(b.treatment.expected)));
        }
        // A window with a handful of holdout impressions says nothing; leave it out.
        if b.holdout.impressions >= 30 {
            series[1].2.push((x(i), b.holdout.ctr()));
        }
        if all.impressions > 0 {
            series[3].2.push((x(i), all.per(all.random)));
            series[4].2.push((x(i), all.per(all.oracle)));
        }
    }
    let x_max = (o.buckets.len().max(1) as i64 * BUCKET_MS) as f64 / 1000.0;
    let y_max = series.iter().flat_map(|s| s.2.iter().map(|p| p.1)).fold(0.0f64, f64::max) * 1.15 + 1e-6;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Clicks per impression by variant (5 s windows)", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart.configure_mesh().x_desc("seconds since start").y_desc("clicks per impression").draw()?;
    for (name, color, pts) in series {
        let c = color;
        chart
            .draw_series(LineSeries::new(pts, c.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend_and_save(chart, &root)
}

fn freshness_chart(o: &Outcome, path: &Path) -> anyhow::Result<()> {
    let x = |i: usize| (i as f64 + 0.5) * BUCKET_MS as f64 / 1000.0;
    let (mut p50, mut p99) = (Vec::new(), Vec::new());
    for (i, b) in o.buckets.iter().enumerate() {
        let mut f = b.freshness_ms.clone();
        f.sort_unstable();
        if let (Some(a), Some(c)) = (percentile(&f, 0.5), percentile(&f, 0.99)) {
            p50.push((x(i), a as f64 / 1000.0));
            p99.push((x(i), c as f64 / 1000.0));
        }
    }
    let x_max = (o.buckets.len().max(1) as i64 * BUCKET_MS) as f64 / 1000.0;
    let y_max = p99.iter().map(|p| p.1).fold(0.0f64, f64::max) * 1.15 + 0.1;
    let root = BitMapBackend::new(path, (1000, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption("Freshness: feedback written → visible to ranking", ("sans-serif", 24))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_max, 0.0..y_max)?;
    chart.configure_mesh().x_desc("seconds since start").y_desc("seconds").draw()?;
    for (name, color, pts) in [("p50", RGBColor(31, 119, 180), p50), ("p99", RGBColor(214, 39, 40), p99)] {
        chart
            .draw_series(LineSeries::new(pts, color.stroke_width(2)))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    }
    legend_and_save(chart, &root)
}

/// Draws the series legend (bottom right, where the curves are not) and writes the file.
fn legend_and_save<'a>(
    mut chart: ChartContext<'a, BitMapBackend<'a>, Cartesian2d<RangedCoordf64, RangedCoordf64>>,
    root: &DrawingArea<BitMapBackend<'a>, Shift>,
) -> anyhow::Result<()> {
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// A line chart of named series to `path` (benchmark plots: learning and examination curves).
/// Returns false, writing nothing, when no font is installed.
pub fn line_chart(
    path: &Path,
    title: &str,
    x_desc: &str,
    y_desc: &str,
    series: &[(String, Vec<(f64, f64)>)],
) -> anyhow::Result<bool> {
    const PALETTE: [RGBColor; 10] = [
        RGBColor(31, 119, 180),
        RGBColor(255, 127, 14),
        RGBColor(44, 160, 44),
        RGBColor(214, 39, 40),
        RGBColor(148, 103, 189),
        RGBColor(140, 86, 75),
        RGBColor(227, 119, 194),
        RGBColor(127, 127, 127),
        RGBColor(188, 189, 34),
        RGBColor(23, 190, 207),
    ];
    if !load_font() {
        return Ok(false);
    }
    let points = || series.iter().flat_map(|s| s.1.iter());
    let (x_min, x_max) =
        points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.0), b.max(p.0)));
    let (y_min, y_max) =
        points().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), p| (a.min(p.1), b.max(p.1)));
    if !(x_min.is_finite() && y_min.is_finite()) {
        return Ok(false);
    }
    let pad = (y_max - y_min).abs() * 0.08 + 1e-9;
    let root = BitMapBackend::new(path, (1000, 600)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d(x_min..x_max.max(x_min + 1e-9), (y_min - pad)..(y_max + pad))?;
    chart.configure_mesh().x_desc(x_desc).y_desc(y_desc).draw()?;
    for (i, (name, pts)) in series.iter().enumerate() {
        let c = PALETTE[i % PALETTE.len()];
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), c.stroke_width(2)))?
            .label(name.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], c.stroke_width(2)));
    }
    legend_and_save(chart, &root)?;
    Ok(true)
}

/// The results table.
pub fn table(o: &Outcome) -> String {
    use std::fmt::Write as _;
    let mut s = String::new();
    let t = &o.treatment;
    let h = &o.holdout;
    let _ = writeln!(
        s,
        "banditflow demo — {:.0} s, Kafka: {}",
        o.elapsed.as_secs_f64(),
        if o.mock { "in-process mock cluster" } else { "broker" }
    );
    let _ = writeln!(s, "shop: ZOZOTOWN item priors from {}", o.priors_source);
    let _ = writeln!(s);
    let _ = writeln!(
        s,
        "{:<34} {:>11} {:>10} {:>12} {:>13}",
        "", "impressions", "CTR", "expected CTR", "regret/impr."
    );
    let row = |s: &mut String, name: &str, t: &Tally| {
        let _ = writeln!(
            s,
            "{:<34} {:>11} {:>10.4} {:>12.4} {:>13.4}",
            name,
            t.impressions,
            t.ctr(),
            t.per(t.expected),
            t.per(t.oracle - t.expected)
        );
    };
    row(&mut s, "treatment (Thompson sampling)", t);
    row(&mut s, "holdout (candidates' given order)", h);
    let mut all = *t;
    all.merge(h);
    let _ = writeln!(
        s,
        "{:<34} {:>11} {:>10} {:>12.4} {:>13.4}",
        "uniformly random ranking",
        "–",
        "–",
        all.per(all.random),
        all.per(all.oracle - all.random)
    );
    let _ = writeln!(
        s,
        "{:<34} {:>11} {:>10} {:>12.4} {:>13.4}",
        "oracle ranking (true appeal)",
        "–",
        "–",
        all.per(all.oracle),
        0.0
    );
    let _ = writeln!(
        s,
        "CTR = clicks per impression (a slate of 10); expected CTR and regret under the simulator's truth."
    );
    let _ = writeln!(s);
    let show = |l: Option<Lift>| match l {
        Some(l) => format!(
            "{:+.4} clicks/impression ({:+.1} %), 95 % CI [{:+.4}, {:+.4}]",
            l.diff,
            l.relative * 100.0,
            l.low,
            l.high
        ),
        None => "not enough impressions".into(),
    };
    let _ = writeln!(s, "lift over holdout:             {}", show(o.lift));
    let _ = writeln!(s, "lift over holdout, last third: {}", show(o.lift_last_third));
    let mut f = o.freshness_ms.clone();
    f.sort_unstable();
    let fmt = |v: Option<i64>| v.map_or("–".to_string(), |v| format!("{:.2} s", v as f64 / 1000.0));
    let _ = writeln!(
        s,
        "freshness (feedback written → visible to ranking): p50 {}, p99 {} ({} records)",
        fmt(percentile(&f, 0.5)),
        fmt(percentile(&f, 0.99)),
        f.len()
    );
    // The first seconds include the consumer group's first rebalance (3 s on the mock cluster).
    let mut steady: Vec<i64> =
        o.buckets.iter().skip(2).flat_map(|b| b.freshness_ms.iter().copied()).collect();
    steady.sort_unstable();
    let _ = writeln!(
        s,
        "  after the first {} s:                            p50 {}, p99 {} ({} records)",
        2 * BUCKET_MS / 1000,
        fmt(percentile(&steady, 0.5)),
        fmt(percentile(&steady, 0.99)),
        steady.len()
    );
    let _ = writeln!(
        s,
        "events: {} written, {} processed (input offsets the final model covers), {} dead-lettered ({} planted bad records)",
        o.produced, o.processed, o.dead_lettered, o.poison_planted
    );
    if !o.rank_errors.is_empty() || o.write_errors > 0 {
        let _ = writeln!(s, "errors: rank {:?}, feedback writes {}", o.rank_errors, o.write_errors);
    }
    let verdict = if o.significant() {
        "the learning variant beats the holdout (95 % interval above zero)"
    } else {
        "the learning variant did NOT beat the holdout significantly"
    };
    let _ = writeln!(s, "verdict: {verdict}");
    s
}

/// Writes `results.txt`, `curves.csv` and the PNG charts into `dir`.
pub fn write_report(o: &Outcome, dir: &Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut out = Vec::new();
    let results = dir.join("results.txt");
    std::fs::write(&results, table(o))?;
    out.push(results);
    out.extend(write(o, dir)?);
    Ok(out)
}
