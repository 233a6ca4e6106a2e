//! The SVG chart: three stacked plots over time (active connections, attempts per second,
//! handshake p99 per second), drawn with plotters from the report's timeline.
//!
//! The three share the x axis on purpose: a latency spike that coincides with attempts/s
//! dropping below target points at the generator, one that coincides with a flat active
//! count points at the server.

use std::path::Path;

use anyhow::anyhow;
use plotters::prelude::*;

use crate::report::Report;

const WIDTH: u32 = 1000;
const HEIGHT: u32 = 900;

struct Panel {
    title: &'static str,
    unit: &'static str,
    color: RGBColor,
    points: Vec<(f64, f64)>,
}

/// Writes the chart of `report`'s timeline to `path`.
pub fn write_chart(path: &Path, report: &Report) -> anyhow::Result<()> {
    let t = &report.timeline;
    let panels = [
        Panel {
            title: "active connections",
            unit: "connections",
            color: RGBColor(31, 119, 180),
            points: t
                .iter()
                .map(|p| (p.second as f64, p.active as f64))
                .collect(),
        },
        Panel {
            title: "connection attempts per second",
            unit: "attempts/s",
            color: RGBColor(44, 160, 44),
            points: t
                .iter()
                .map(|p| (p.second as f64, p.attempts as f64))
                .collect(),
        },
        Panel {
            title: "handshake p99 (upgrades completed in that second)",
            unit: "ms",
            color: RGBColor(214, 39, 40),
            points: t
                .iter()
                .filter_map(|p| {
                    p.handshake_p99_us
                        .map(|us| (p.second as f64, us as f64 / 1e3))
                })
                .collect(),
        },
    ];
    let max_x = t.iter().map(|p| p.second).max().unwrap_or(0).max(1) as f64;
    let title = format!(
        "{}: {} connections at {}/s ({} process{})",
        report.config.url,
        report.config.connections,
        report.config.rate,
        report.processes,
        if report.processes == 1 { "" } else { "es" }
    );
    draw(path, &title, max_x, &panels).map_err(|e| anyhow!("drawing {}: {e}", path.display()))
}

fn draw(
    path: &Path,
    title: &str,
    max_x: f64,
    panels: &[Panel],
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let root = SVGBackend::new(path, (WIDTH, HEIGHT)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    let areas = root.split_evenly((panels.len(), 1));
    for (area, panel) in areas.iter().zip(panels) {
        let max_y = panel.points.iter().map(|p| p.1).fold(0.0, f64::max);
        // Headroom above the highest point, and a non-empty range for all-zero series.
        let top = if max_y > 0.0 { max_y * 1.1 } else { 1.0 };
        let mut chart = ChartBuilder::on(area)
            .margin(12)
            .caption(panel.title, ("sans-serif", 16))
            .x_label_area_size(30)
            .y_label_area_size(70)
            .build_cartesian_2d(0.0..max_x, 0.0..top)?;
        let y_fmt = |v: &f64| {
            if top >= 10.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.2}")
            }
        };
        chart
            .configure_mesh()
            .x_desc("seconds since start")
            .y_desc(panel.unit)
            .y_label_formatter(&y_fmt)
            .draw()?;
        chart.draw_series(LineSeries::new(
            panel.points.iter().copied(),
            panel.color.stroke_width(2),
        ))?;
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::TimelinePoint;

    #[test]
    fn writes_an_svg_even_for_an_empty_timeline() {
        let dir = std::env::temp_dir().join(format!("loadtest-chart-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.svg");
        let mut r = Report::default();
        write_chart(&path, &r).unwrap();
        r.timeline = (1..=5)
            .map(|s| TimelinePoint {
                second: s,
                active: s as i64 * 10,
                attempts: 10,
                handshake_p99_us: Some(900),
                ..Default::default()
            })
            .collect();
        write_chart(&path, &r).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("active connections"),
            "{}",
            &svg[..200]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
