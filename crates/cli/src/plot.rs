//! The result of `pinion bench --sweep-budget`, decode speed against the memory budget (as in PowerInfer-2's
//! Figure 10), as a markdown table and as a PNG plot.
//!
//! Text in the plot is drawn with DejaVu Sans, embedded in the binary and registered with plotters, so drawing
//! needs no system font (and no fontconfig): a fresh CI machine renders the same picture as a desktop.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use pinion_prepare::partial_path;
use plotters::prelude::*;
use plotters::style::FontStyle;

/// One budget of a sweep.
#[derive(Clone, Debug, serde::Serialize)]
pub(crate) struct SweepPoint {
    /// The memory budget in bytes.
    pub budget_bytes: u64,
    /// The budget as a share of the model file (0.5 = 50%).
    pub budget_share: f64,
    /// Decode speed (median over repetitions).
    pub tokens_per_s: f64,
    /// Decode speed the run's plan predicted.
    pub predicted_tokens_per_s: f64,
    /// Bytes read from storage per token, in MB (10^6).
    pub mb_read_per_token: f64,
    /// Share of FFN neuron uses served from memory.
    pub hit_rate: f64,
    /// Share of token time spent waiting on I/O.
    pub io_stall_share: f64,
}

/// A second series drawn on the same axes (e.g. llama.cpp under the same limits), optional.
#[derive(Clone, Debug)]
pub(crate) struct Series {
    /// The name shown in the legend.
    pub name: String,
    /// `(budget_share, tokens_per_s)` pairs, drawn in the order given.
    pub points: Vec<(f64 /*budget_share*/, f64 /*tokens_per_s*/)>,
}

/// What can go wrong writing the sweep plot.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PlotError {
    /// The sweep has no point to draw.
    #[error("a sweep plot needs at least one point, got none")]
    NoPoints,
    /// A plotted value is NaN or infinite.
    #[error("{series} point {index} has a non-finite {field}: {value}")]
    NonFinite {
        /// The series the point belongs to (`pinion` for the sweep itself).
        series: String,
        /// The point's position in its series.
        index: usize,
        /// Which value (`budget_share` or `tokens_per_s`).
        field: &'static str,
        /// The value.
        value: f64,
    },
    /// Plotters (or the PNG encoder, or the embedded font) failed.
    #[error("drawing the plot failed: {0}")]
    Backend(String),
    /// Writing or renaming the file failed.
    #[error("cannot write {path}: {source}")]
    Io {
        /// The file written.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
}

/// Width and height of the PNG, in pixels.
const SIZE: (u32, u32) = (800, 500);
/// Name of the pinion series in the legend.
const PINION: &str = "pinion";
/// Line colours: pinion first, then the other series in turn (matplotlib's first five).
const COLOURS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
];

/// A markdown table of the sweep, one row per point in the order given: the budget (MiB and % of the GGUF
/// file), tokens/s measured and predicted by the plan with the prediction's error, MB read per token, hit rate %
/// and I/O stall %.
pub(crate) fn render_sweep_table(points: &[SweepPoint]) -> String {
    let mut out = String::new();
    out.push_str(
        "| budget (MiB) | budget (% of GGUF) | tokens/s | predicted | error % | MB read/token | hit rate % | I/O stall % |\n",
    );
    out.push_str("| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |\n");
    for p in points {
        // Writing to a String cannot fail.
        let _ = writeln!(
            out,
            "| {:.1} | {:.1} | {:.2} | {:.2} | {:+.1} | {:.2} | {:.1} | {:.1} |",
            p.budget_bytes as f64 / (1024.0 * 1024.0),
            p.budget_share * 100.0,
            p.tokens_per_s,
            p.predicted_tokens_per_s,
            100.0 * (p.predicted_tokens_per_s / p.tokens_per_s.max(1e-12) - 1.0),
            p.mb_read_per_token,
            p.hit_rate * 100.0,
            p.io_stall_share * 100.0,
        );
    }
    out
}

/// Draws tokens/s against the budget (% of the model file) to an 800x500 PNG at `path`: a line with markers
/// for pinion and one for each of `others`, with a legend, axis labels and `title`.
///
/// The PNG is written to `<path>.partial` and renamed into place, so `path` is never half-written; on error
/// neither file is left behind.
pub(crate) fn write_sweep_png(
    path: &Path,
    title: &str,
    points: &[SweepPoint],
    others: &[Series],
) -> Result<(), PlotError> {
    if points.is_empty() {
        return Err(PlotError::NoPoints);
    }
    let pinion: Vec<(f64, f64)> = points.iter().map(|p| (p.budget_share, p.tokens_per_s)).collect();
    check_finite(PINION, &pinion)?;
    for s in others {
        check_finite(&s.name, &s.points)?;
    }
    let png = render_png(title, &pinion, others)?;

    let tmp = partial_path(path);
    let result = std::fs::write(&tmp, &png)
        .map_err(|source| PlotError::Io { path: tmp.clone(), source })
        .and_then(|()| {
            std::fs::rename(&tmp, path).map_err(|source| PlotError::Io { path: path.to_path_buf(), source })
        });
    if result.is_err() {
        // The write or rename already failed; a partial file that cannot be removed is not worth a second error.
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn check_finite(series: &str, points: &[(f64, f64)]) -> Result<(), PlotError> {
    for (index, &(share, tps)) in points.iter().enumerate() {
        for (field, value) in [("budget_share", share), ("tokens_per_s", tps)] {
            if !value.is_finite() {
                return Err(PlotError::NonFinite { series: series.to_string(), index, field, value });
            }
        }
    }
    Ok(())
}

/// Registers DejaVu Sans as plotters' `sans-serif` once per process.
fn register_fonts() -> Result<(), PlotError> {
    static REGISTERED: OnceLock<bool> = OnceLock::new();
    let ok = *REGISTERED.get_or_init(|| {
        plotters::style::register_font("sans-serif", FontStyle::Normal, dejavu::sans::regular()).is_ok()
            && plotters::style::register_font("sans-serif", FontStyle::Bold, dejavu::sans::bold()).is_ok()
    });
    if ok { Ok(()) } else { Err(PlotError::Backend("the embedded DejaVu Sans font was rejected".into())) }
}

/// Axis range covering `values` with a margin on each side, never below `floor`.
fn padded_range(values: impl Iterator<Item = f64> + Clone, floor: f64) -> (f64, f64) {
    let lo = values.clone().fold(f64::INFINITY, f64::min);
    let hi = values.fold(f64::NEG_INFINITY, f64::max);
    let pad = if hi > lo { (hi - lo) * 0.05 } else { lo.abs().max(1.0) * 0.1 };
    ((lo - pad).max(floor), hi + pad)
}

/// Decimals that tell apart the tick labels of an axis spanning `span`: plotters puts about ten ticks on an
/// axis, so a step near a tenth of the span.
fn label_decimals(span: f64) -> usize {
    (-(span / 10.0).log10()).ceil().clamp(0.0, 6.0) as usize
}

/// Draws the plot into an RGB buffer and encodes it as PNG bytes.
fn render_png(title: &str, pinion: &[(f64, f64)], others: &[Series]) -> Result<Vec<u8>, PlotError> {
    register_fonts()?;
    let backend = |e: &dyn std::fmt::Display| PlotError::Backend(e.to_string());
    let (w, h) = SIZE;
    let mut rgb = vec![0u8; w as usize * h as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, SIZE).into_drawing_area();
        root.fill(&WHITE).map_err(|e| backend(&e))?;

        let all = || pinion.iter().chain(others.iter().flat_map(|s| s.points.iter()));
        let (x_lo, x_hi) = padded_range(all().map(|&(share, _)| share * 100.0), 0.0);
        let y_max = all().map(|&(_, tps)| tps).fold(0.0, f64::max);
        let y_hi = if y_max > 0.0 { y_max * 1.1 } else { 1.0 };
        let (x_decimals, y_decimals) = (label_decimals(x_hi - x_lo), label_decimals(y_hi));

        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 22, FontStyle::Bold))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(60)
            .build_cartesian_2d(x_lo..x_hi, 0.0..y_hi)
            .map_err(|e| backend(&e))?;
        chart
            .configure_mesh()
            .x_desc("memory budget (% of the model weights)")
            .y_desc("decode speed (tokens/s)")
            .x_label_formatter(&|x| format!("{x:.x_decimals$}%"))
            .y_label_formatter(&|y| format!("{y:.y_decimals$}"))
            .axis_desc_style(("sans-serif", 16))
            .label_style(("sans-serif", 14))
            .light_line_style(WHITE.mix(0.0))
            .bold_line_style(BLACK.mix(0.12))
            .draw()
            .map_err(|e| backend(&e))?;

        let series =
            std::iter::once((PINION, pinion)).chain(others.iter().map(|s| (s.name.as_str(), &s.points[..])));
        for (i, (name, pts)) in series.enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let pts: Vec<(f64, f64)> = pts.iter().map(|&(share, tps)| (share * 100.0, tps)).collect();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), colour.stroke_width(2)))
                .map_err(|e| backend(&e))?
                .label(name)
                .legend(move |(x, y)| {
                    // The series' line with its marker in the middle.
                    EmptyElement::at((x + 10, y))
                        + PathElement::new([(-10, 0), (10, 0)], colour.stroke_width(2))
                        + Circle::new((0, 0), 4, colour.filled())
                });
            chart
                .draw_series(pts.iter().map(|&p| Circle::new(p, 4, colour.filled())))
                .map_err(|e| backend(&e))?;
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperLeft)
            .label_font(("sans-serif", 14))
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .draw()
            .map_err(|e| backend(&e))?;
        root.present().map_err(|e| backend(&e))?;
    }

    let mut png = Vec::new();
    let mut encoder = png::Encoder::new(&mut png, w, h);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().map_err(|e| backend(&e))?;
    writer.write_image_data(&rgb).map_err(|e| backend(&e))?;
    writer.finish().map_err(|e| backend(&e))?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(budget_mib: u64, share: f64, tps: f64) -> SweepPoint {
        SweepPoint {
            budget_bytes: budget_mib * 1024 * 1024,
            budget_share: share,
            tokens_per_s: tps,
            predicted_tokens_per_s: 1.1 * tps,
            mb_read_per_token: 12.5 * (1.0 - share),
            hit_rate: 0.5 + share / 2.0,
            io_stall_share: 0.6 * (1.0 - share),
        }
    }

    fn sweep() -> Vec<SweepPoint> {
        vec![point(256, 0.25, 4.0), point(512, 0.5, 11.5), point(768, 0.75, 19.25), point(1024, 1.0, 24.0)]
    }

    fn llama() -> Series {
        Series { name: "llama.cpp".into(), points: vec![(0.25, 0.8), (0.5, 1.9), (0.75, 6.0), (1.0, 22.0)] }
    }

    /// A fresh directory under the system temp dir, named for the test.
    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("pinion-plot-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Decodes a PNG file to (width, height, RGB bytes).
    fn decode(path: &Path) -> (u32, u32, Vec<u8>) {
        let decoder = png::Decoder::new(std::io::BufReader::new(std::fs::File::open(path).unwrap()));
        let mut reader = decoder.read_info().unwrap();
        let mut buf = vec![0; reader.output_buffer_size().unwrap()];
        let info = reader.next_frame(&mut buf).unwrap();
        assert_eq!(info.color_type, png::ColorType::Rgb);
        buf.truncate(info.buffer_size());
        (info.width, info.height, buf)
    }

    fn distinct_colours(rgb: &[u8]) -> usize {
        let mut colours: Vec<[u8; 3]> = rgb.chunks_exact(3).map(|c| [c[0], c[1], c[2]]).collect();
        colours.sort_unstable();
        colours.dedup();
        colours.len()
    }

    #[test]
    fn plot_table_has_one_row_per_point_in_order() {
        let table = render_sweep_table(&sweep());
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 2 + 4, "{table}");
        assert_eq!(
            lines[0],
            "| budget (MiB) | budget (% of GGUF) | tokens/s | predicted | error % | MB read/token | hit rate % | I/O stall % |"
        );
        assert_eq!(lines[2], "| 256.0 | 25.0 | 4.00 | 4.40 | +10.0 | 9.38 | 62.5 | 45.0 |");
        assert_eq!(lines[3], "| 512.0 | 50.0 | 11.50 | 12.65 | +10.0 | 6.25 | 75.0 | 30.0 |");
        assert_eq!(lines[4], "| 768.0 | 75.0 | 19.25 | 21.18 | +10.0 | 3.12 | 87.5 | 15.0 |");
        assert_eq!(lines[5], "| 1024.0 | 100.0 | 24.00 | 26.40 | +10.0 | 0.00 | 100.0 | 0.0 |");
        // Rows keep the order given, even when it is not sorted by budget.
        let reversed: Vec<SweepPoint> = sweep().into_iter().rev().collect();
        let lines: Vec<String> = render_sweep_table(&reversed).lines().map(str::to_string).collect();
        assert!(lines[2].starts_with("| 1024.0 |") && lines[5].starts_with("| 256.0 |"), "{lines:?}");
        // No points: the header alone.
        assert_eq!(render_sweep_table(&[]).lines().count(), 2);
    }

    #[test]
    fn plot_png_is_800x500_and_draws_every_series() {
        let dir = temp_dir("png");
        let alone = dir.join("alone.png");
        let both = dir.join("both.png");
        write_sweep_png(&alone, "SmolLM2-135M: decode speed against memory budget", &sweep(), &[]).unwrap();
        write_sweep_png(&both, "SmolLM2-135M: decode speed against memory budget", &sweep(), &[llama()])
            .unwrap();

        for path in [&alone, &both] {
            let bytes = std::fs::read(path).unwrap();
            assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "{} is not a PNG", path.display());
            assert!(!partial_path(path).exists());
        }
        let (w, h, alone_rgb) = decode(&alone);
        assert_eq!((w, h), (800, 500));
        let (w, h, both_rgb) = decode(&both);
        assert_eq!((w, h), (800, 500));
        // White, black, grey grid lines, the series colour and antialiased text: far more than a blank canvas.
        assert!(distinct_colours(&alone_rgb) > 20, "{} colours", distinct_colours(&alone_rgb));
        assert!(distinct_colours(&both_rgb) > distinct_colours(&alone_rgb));
        // The second series' colour appears only in the plot that has it.
        let orange = |rgb: &[u8]| rgb.chunks_exact(3).filter(|c| *c == [255, 127, 14]).count();
        assert_eq!(orange(&alone_rgb), 0);
        assert!(orange(&both_rgb) > 100, "{} orange pixels", orange(&both_rgb));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plot_label_decimals_follow_the_axis_span() {
        assert_eq!(label_decimals(110.0), 0);
        assert_eq!(label_decimals(10.0), 0);
        assert_eq!(label_decimals(5.0), 1);
        assert_eq!(label_decimals(1.0), 1);
        assert_eq!(label_decimals(0.5), 2);
        assert_eq!(label_decimals(1e-12), 6);
    }

    #[test]
    fn plot_png_single_point_and_flat_zero_speed_draw() {
        let dir = temp_dir("single");
        let path = dir.join("one.png");
        write_sweep_png(&path, "one budget", &[point(512, 0.5, 0.0)], &[]).unwrap();
        assert_eq!(decode(&path).0, 800);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn plot_png_rejects_empty_and_non_finite_and_leaves_no_file() {
        let dir = temp_dir("errors");
        let path = dir.join("sweep.png");
        let no_file = || !path.exists() && !partial_path(&path).exists();

        let err = write_sweep_png(&path, "t", &[], &[]).unwrap_err();
        assert!(matches!(err, PlotError::NoPoints), "{err:?}");
        assert!(no_file());

        let mut points = sweep();
        points[2].tokens_per_s = f64::NAN;
        let err = write_sweep_png(&path, "t", &points, &[]).unwrap_err();
        assert!(
            matches!(err, PlotError::NonFinite { ref series, index: 2, field: "tokens_per_s", .. } if series == "pinion"),
            "{err:?}"
        );
        assert!(no_file());

        let mut other = llama();
        other.points[1].0 = f64::INFINITY;
        let err = write_sweep_png(&path, "t", &sweep(), &[other]).unwrap_err();
        assert!(
            matches!(err, PlotError::NonFinite { ref series, index: 1, field: "budget_share", .. } if series == "llama.cpp"),
            "{err:?}"
        );
        assert!(no_file());

        // A failed write (the directory is gone) reports an io error and leaves nothing either.
        let gone = dir.join("missing").join("sweep.png");
        let err = write_sweep_png(&gone, "t", &sweep(), &[]).unwrap_err();
        assert!(matches!(err, PlotError::Io { .. }), "{err:?}");
        assert!(!gone.exists() && !partial_path(&gone).exists());

        // A failed rename (a directory is in the way) removes the partial file it had written.
        let blocked = dir.join("blocked.png");
        std::fs::create_dir_all(blocked.join("inside")).unwrap();
        let err = write_sweep_png(&blocked, "t", &sweep(), &[]).unwrap_err();
        assert!(matches!(err, PlotError::Io { ref path, .. } if *path == blocked), "{err:?}");
        assert!(blocked.is_dir() && !partial_path(&blocked).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
