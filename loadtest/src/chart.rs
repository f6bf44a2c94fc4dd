//! The PNG chart: deliveries/s over time (top) and latency p50/p99/max per second (bottom); a failover run's
//! kills are vertical lines on both (registry leader kills purple, edge kills orange).
//!
//! plotters draws the lines; text is drawn here with font8x8's bitmap glyphs, because plotters' own text needs
//! system fonts (font-kit) or a TTF file, and the chart must render on any machine.

use std::path::Path;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::report::RunReport;

const WIDTH: u32 = 960;
const HEIGHT: u32 = 640;

pub(crate) fn draw(report: &RunReport, path: &Path) -> anyhow::Result<()> {
    let root = BitMapBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let title = format!(
        "{} / {}: {} subscribers, {} publishes/s, {}",
        report.scenario.name,
        report.target,
        report.scenario.clients.connections,
        report.scenario.publish.rate,
        // The verdict names missed targets too; a run that is correct but slow must not read "passed".
        if report.verdict.is_empty() {
            if report.passed {
                "passed"
            } else {
                "FAILED"
            }
        } else {
            report.verdict.as_str()
        }
    );
    text(&root, 12, 8, &title, &BLACK, 2);
    let (_, body) = root.split_vertically(30);
    let (top, bottom) = body.split_vertically(HEIGHT / 2 - 5);
    let points = &report.timeline;
    let t_max = points.last().map_or(1.0, |p| p.t.max(1.0));

    let leader_color = RGBColor(150, 60, 200).to_rgba();
    let edge_color = RGBColor(240, 140, 0).to_rgba();
    let mut kills: Vec<(f64, RGBAColor)> = Vec::new();
    if let Some(f) = &report.failover {
        kills.extend(f.leader_rounds.iter().map(|r| (r.at_secs, leader_color)));
        kills.extend(f.edge_kills.iter().map(|k| (k.round.at_secs, edge_color)));
    }
    let throughput: Vec<(f64, f64)> = points.iter().map(|p| (p.t, p.delivered_per_sec)).collect();
    let y_max = nice_ceiling(throughput.iter().map(|p| p.1).fold(0.0, f64::max));
    let kill_legend: &[(&str, RGBAColor)] = if kills.is_empty() {
        &[]
    } else {
        &[("leader", leader_color), ("edge", edge_color)]
    };
    panel(
        &top,
        "deliveries/s",
        t_max,
        y_max,
        &[(&throughput, BLUE.to_rgba())],
        kill_legend,
        &kills,
    )?;

    let series = |f: fn(&crate::report::TimelinePoint) -> f64| -> Vec<(f64, f64)> {
        points.iter().map(|p| (p.t, f(p))).collect()
    };
    let p50 = series(|p| p.p50_ms);
    let p99 = series(|p| p.p99_ms);
    let max = series(|p| p.max_ms);
    let l_max = nice_ceiling(p99.iter().map(|p| p.1).fold(0.0, f64::max) * 1.5);
    panel(
        &bottom,
        "latency ms (clipped at 1.5x the worst p99)",
        t_max,
        l_max,
        &[
            (&p50, GREEN.to_rgba()),
            (&p99, RED.to_rgba()),
            (&max, RGBColor(160, 160, 160).to_rgba()),
        ],
        &[
            ("p50", GREEN.to_rgba()),
            ("p99", RED.to_rgba()),
            ("max", RGBColor(160, 160, 160).to_rgba()),
        ],
        &kills,
    )?;
    root.present()?;
    Ok(())
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;

/// One chart: axes with tick labels, the series, vertical markers at `markers` (x, colour), a legend.
fn panel(
    area: &Area<'_>,
    label: &str,
    x_max: f64,
    y_max: f64,
    series: &[(&Vec<(f64, f64)>, RGBAColor)],
    legend: &[(&str, RGBAColor)],
    markers: &[(f64, RGBAColor)],
) -> anyhow::Result<()> {
    let (w, h) = area.dim_in_pixel();
    // backend_coord answers in the whole image's pixels; text is drawn relative to this area.
    let (base_x, base_y) = area.get_base_pixel();
    let (left, right, top, bottom) = (80i32, 20i32, 40i32, 30i32);
    let plot = area.margin(top as u32, bottom as u32, left as u32, right as u32);
    let mut chart = ChartBuilder::on(&plot).build_cartesian_2d(0f64..x_max, 0f64..y_max)?;
    // Grid and axes drawn as plain lines (the mesh's labels would need a font).
    let grid = RGBColor(225, 225, 225);
    for i in 0..=4 {
        let y = y_max * f64::from(i) / 4.0;
        chart.draw_series(LineSeries::new([(0.0, y), (x_max, y)], grid))?;
        let (_, py) = chart.backend_coord(&(0.0, y));
        let label = short_number(y);
        text(
            area,
            left - 8 - 8 * label.len() as i32,
            py - base_y - 4,
            &label,
            &BLACK,
            1,
        );
    }
    for i in 0..=5 {
        let x = x_max * f64::from(i) / 5.0;
        chart.draw_series(LineSeries::new([(x, 0.0), (x, y_max)], grid))?;
        let (px, _) = chart.backend_coord(&(x, 0.0));
        text(
            area,
            px - base_x - 8,
            h as i32 - bottom + 6,
            &if x_max < 10.0 {
                format!("{x:.1}s")
            } else {
                format!("{x:.0}s")
            },
            &BLACK,
            1,
        );
    }
    chart.draw_series(LineSeries::new([(0.0, 0.0), (x_max, 0.0)], BLACK))?;
    chart.draw_series(LineSeries::new([(0.0, 0.0), (0.0, y_max)], BLACK))?;
    for (x, color) in markers.iter().filter(|(x, _)| *x <= x_max) {
        chart.draw_series(LineSeries::new([(*x, 0.0), (*x, y_max)], *color))?;
    }
    for (points, color) in series {
        chart.draw_series(LineSeries::new(
            points.iter().map(|(x, y)| (*x, y.min(y_max))),
            color.stroke_width(2),
        ))?;
    }
    text(area, left, top - 16, label, &BLACK, 1);
    let mut lx = w as i32 - right - 80 * legend.len() as i32;
    for (name, color) in legend {
        area.draw(&Rectangle::new(
            [(lx, top - 14), (lx + 16, top - 8)],
            color.filled(),
        ))?;
        text(area, lx + 20, top - 16, name, &BLACK, 1);
        lx += 80;
    }
    Ok(())
}

/// Draws `s` with 8x8 bitmap glyphs at (x, y), each glyph pixel `scale` pixels wide.
fn text<C: Color>(area: &Area<'_>, x: i32, y: i32, s: &str, color: &C, scale: i32) {
    use font8x8::UnicodeFonts;
    let color = color.to_rgba();
    for (i, ch) in s.chars().enumerate() {
        let glyph = font8x8::BASIC_FONTS
            .get(ch)
            .or_else(|| font8x8::BASIC_FONTS.get('?'))
            .unwrap_or([0; 8]);
        let gx = x + i as i32 * 8 * scale;
        for (row, bits) in glyph.iter().enumerate() {
            for col in 0..8 {
                if bits & (1 << col) != 0 {
                    let px = gx + col * scale;
                    let py = y + row as i32 * scale;
                    // Pixels outside the area are simply not drawn.
                    for dx in 0..scale {
                        for dy in 0..scale {
                            let _ = area.draw_pixel((px + dx, py + dy), &color);
                        }
                    }
                }
            }
        }
    }
}

/// 1, 2 or 5 times a power of ten at or above `v` (at least 1), for round axis ends.
fn nice_ceiling(v: f64) -> f64 {
    if v.is_nan() || v <= 1.0 {
        return 1.0;
    }
    let magnitude = 10f64.powf(v.log10().floor());
    for step in [1.0, 2.0, 5.0, 10.0] {
        if v <= step * magnitude {
            return step * magnitude;
        }
    }
    10.0 * magnitude
}

fn short_number(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.1}M", v / 1e6)
    } else if v >= 1e3 && v % 1e3 == 0.0 {
        format!("{:.0}k", v / 1e3)
    } else if v >= 1e3 {
        format!("{:.2}k", v / 1e3)
    } else if v >= 10.0 || v == 0.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ceilings() {
        assert_eq!(nice_ceiling(0.0), 1.0);
        assert_eq!(nice_ceiling(f64::NAN), 1.0);
        assert_eq!(nice_ceiling(3.2), 5.0);
        assert_eq!(nice_ceiling(480_000.0), 500_000.0);
        assert_eq!(nice_ceiling(510_000.0), 1_000_000.0);
    }
}
