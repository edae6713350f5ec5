//! The boot-time distribution plot (PNG, plotters' bitmap backend).
//!
//! Text is drawn with plotters' `ab_glyph` renderer and a TrueType font from a Debian package
//! (DejaVu Sans, `fonts-dejavu-core`, installed if missing), so nothing depends on fontconfig.
//! Without a font the plot is drawn without any text and the markdown carries the legend.

use std::path::Path;

use plotters::prelude::*;
use plotters::style::FontStyle;

use super::BootCell;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/truetype/freefont/FreeSans.ttf",
];

/// Ember's colour (ember orange).
const EMBER: RGBColor = RGBColor(214, 69, 25);
/// QEMU's colour.
const QEMU: RGBColor = RGBColor(40, 90, 170);
/// Firecracker's colour.
const FIRECRACKER: RGBColor = RGBColor(60, 150, 60);
/// Other Ember builds (`--ember NAME=PATH`), in order.
const OTHERS: &[RGBColor] = &[
    RGBColor(130, 60, 160),
    RGBColor(150, 100, 40),
    RGBColor(20, 140, 140),
    RGBColor(200, 80, 150),
    RGBColor(120, 120, 30),
    RGBColor(90, 90, 90),
    RGBColor(230, 160, 0),
    RGBColor(0, 90, 60),
    RGBColor(160, 30, 60),
    RGBColor(100, 140, 220),
];

fn colour(cell: &BootCell, others: &mut Vec<String>) -> RGBColor {
    if cell.peer.starts_with("QEMU") {
        QEMU
    } else if cell.is_ember && cell.peer == "Ember" {
        EMBER
    } else if cell.peer.to_lowercase().contains("firecracker") {
        FIRECRACKER
    } else {
        let i = match others.iter().position(|o| *o == cell.peer) {
            Some(i) => i,
            None => {
                others.push(cell.peer.clone());
                others.len() - 1
            }
        };
        OTHERS[i % OTHERS.len()]
    }
}

/// Registers a font for `sans-serif`; false if none could be found.
fn register_font() -> bool {
    let find = || FONTS.iter().find_map(|p| std::fs::read(p).ok());
    let bytes = match find() {
        Some(b) => b,
        None => {
            let _ = crate::ensure_packages(&["fonts-dejavu-core"]);
            match find() {
                Some(b) => b,
                None => return false,
            }
        }
    };
    // plotters keeps the font for the life of the process.
    let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
    plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
}

/// A small deterministic jitter in [-1, 1] so equal values do not hide each other.
fn jitter(i: usize) -> f64 {
    let x = (i as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 40;
    (x as f64 / (1u64 << 24) as f64) * 2.0 - 1.0
}

/// 1-2-5 tick values covering `[lo, hi]`.
fn ticks(lo: f64, hi: f64) -> Vec<f64> {
    let mut v = Vec::new();
    let mut decade = 10f64.powf(lo.log10().floor());
    while decade <= hi {
        for m in [1.0, 2.0, 5.0] {
            let t = decade * m;
            if t >= lo && t <= hi {
                v.push(t);
            }
        }
        decade *= 10.0;
    }
    v
}

/// Draws exec → first line and exec → exit, one dot per run, one column per VMM within each
/// guest configuration, the median as a bar; log scale.
pub fn boot_plot(path: &Path, cells: &[BootCell]) -> Result<(), String> {
    let with_text = register_font();
    let with_data: Vec<&BootCell> = cells.iter().filter(|c| !c.exit.is_empty()).collect();
    let mut scenarios: Vec<&str> = Vec::new();
    let mut vmms: Vec<&BootCell> = Vec::new();
    for c in &with_data {
        if !scenarios.contains(&c.scenario.as_str()) {
            scenarios.push(&c.scenario);
        }
        if !vmms.iter().any(|v| v.peer == c.peer) {
            vmms.push(c);
        }
    }
    if scenarios.is_empty() {
        return Err("no boot samples".into());
    }
    let mut others = Vec::new();
    let colours: Vec<(String, RGBColor)> = vmms
        .iter()
        .map(|c| (c.peer.clone(), colour(c, &mut others)))
        .collect();
    let colour_of = |peer: &str| {
        colours
            .iter()
            .find(|(p, _)| p == peer)
            .map_or(BLACK, |(_, c)| *c)
    };
    let all = || {
        with_data
            .iter()
            .flat_map(|c| c.exit.iter().chain(&c.first_line))
    };
    let ymax = all().fold(0.0f64, |a, &b| a.max(b)) * 1.3;
    let ymin = all().fold(f64::MAX, |a, &b| a.min(b)).max(0.05) * 0.75;
    let n = scenarios.len();
    let width = (300 + n as u32 * (70 * vmms.len() as u32).max(200)).max(900);
    // Legend entries, laid out in rows that fit the width.
    let entry_width = |name: &str| 40 + 10 * name.chars().count() as i32;
    let mut rows = 1;
    let mut x = 70;
    for (name, _) in &colours {
        if x + entry_width(name) > width as i32 - 20 && x > 70 {
            rows += 1;
            x = 70;
        }
        x += entry_width(name);
    }
    let legend_height = 16 + 30 * rows as u32;
    let root = BitMapBackend::new(path, (width, 910 + legend_height)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| e.to_string())?;
    let (legend, charts) = root.split_vertically(legend_height);
    if with_text {
        let style = ("sans-serif", 18).into_font().color(&BLACK);
        let (mut x, mut y) = (70, 22);
        for (name, colour) in &colours {
            if x + entry_width(name) > width as i32 - 20 && x > 70 {
                x = 70;
                y += 30;
            }
            legend
                .draw(&Circle::new((x, y), 7, colour.filled()))
                .map_err(|e| e.to_string())?;
            legend
                .draw_text(name, &style, (x + 14, y - 10))
                .map_err(|e| e.to_string())?;
            x += entry_width(name);
        }
    }
    let (top, bottom) = charts.split_vertically(455);
    let width_per_vmm = 0.8 / vmms.len() as f64;
    for (area, title, first) in [
        (&top, "exec → first console line (ms, log scale)", true),
        (&bottom, "exec → VMM exit (ms, log scale)", false),
    ] {
        let mut b = ChartBuilder::on(area);
        b.margin(12);
        if with_text {
            b.caption(title, ("sans-serif", 22))
                .x_label_area_size(36)
                .y_label_area_size(60);
        } else {
            b.x_label_area_size(6).y_label_area_size(6);
        }
        let mut chart = b
            .build_cartesian_2d(
                -0.5f64..(n as f64 - 0.5),
                (ymin..ymax).log_scale().with_key_points(ticks(ymin, ymax)),
            )
            .map_err(|e| e.to_string())?;
        {
            let mut mesh = chart.configure_mesh();
            mesh.disable_x_mesh()
                .light_line_style(RGBColor(235, 235, 235))
                .bold_line_style(RGBColor(210, 210, 210));
            if with_text {
                let labels: Vec<String> = scenarios.iter().map(|s| s.to_string()).collect();
                let fmt = move |x: &f64| {
                    let i = x.round();
                    if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < labels.len() {
                        labels[i as usize].clone()
                    } else {
                        String::new()
                    }
                };
                mesh.x_labels(n + 1)
                    .x_label_formatter(&fmt)
                    .y_label_formatter(&|y| format!("{y}"))
                    .label_style(("sans-serif", 15))
                    .draw()
                    .map_err(|e| e.to_string())?;
            } else {
                mesh.x_labels(0)
                    .y_label_formatter(&|_| String::new())
                    .draw()
                    .map_err(|e| e.to_string())?;
            }
        }
        for c in &with_data {
            let (Some(si), Some(vi)) = (
                scenarios.iter().position(|s| *s == c.scenario),
                vmms.iter().position(|v| v.peer == c.peer),
            ) else {
                continue;
            };
            let colour = colour_of(&c.peer);
            let x0 = si as f64 - 0.4 + width_per_vmm * (vi as f64 + 0.5);
            let values = if first { &c.first_line } else { &c.exit };
            chart
                .draw_series(values.iter().enumerate().map(|(i, &y)| {
                    Circle::new(
                        (x0 + jitter(i) * width_per_vmm * 0.3, y),
                        3,
                        colour.mix(0.7).filled(),
                    )
                }))
                .map_err(|e| e.to_string())?;
            if let Some(s) = super::stats::Summary::of(values) {
                let half = width_per_vmm * 0.42;
                chart
                    .draw_series(std::iter::once(PathElement::new(
                        vec![(x0 - half, s.median), (x0 + half, s.median)],
                        colour.stroke_width(3),
                    )))
                    .map_err(|e| e.to_string())?;
            }
        }
    }
    root.present()
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn log_ticks() {
        assert_eq!(super::ticks(1.5, 60.0), vec![2.0, 5.0, 10.0, 20.0, 50.0]);
    }

    #[test]
    fn jitter_in_range() {
        for i in 0..100 {
            let j = super::jitter(i);
            assert!((-1.0..=1.0).contains(&j), "{j}");
        }
    }
}
