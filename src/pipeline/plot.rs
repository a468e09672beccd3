//! `--plot F.svg`: the size/sensitivity trade-off of a Pareto search as an SVG chart (plotters'
//! SVG backend lays text out without loading a font, so this works on any machine).

use plotters::prelude::*;

use crate::error::{Error, Result};
use crate::pipeline::quantize::ParetoReport;

fn err(e: impl std::fmt::Display) -> Error {
    Error::Exec(format!("plot: {e}"))
}

/// The frontier (line), the uniform-precision points (labelled squares), the budget (vertical
/// line) and the chosen point (red), with file size in KB across and summed sensitivity (log)
/// up.
pub fn frontier_svg(r: &ParetoReport, title: &str) -> Result<String> {
    let floor = 1e-7f64;
    let y = |s: f64| s.max(floor);
    let pts: Vec<(f64, f64)> = r
        .frontier
        .iter()
        .map(|p| (p.bytes as f64 / 1000.0, y(p.sensitivity)))
        .collect();
    let uni: Vec<(f64, f64, u8)> = r
        .uniform
        .iter()
        .map(|p| (p.bytes as f64 / 1000.0, y(p.sensitivity), p.bits[0]))
        .collect();
    let all = pts.iter().copied().chain(uni.iter().map(|u| (u.0, u.1)));
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, s) in all {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(s);
        y1 = y1.max(s);
    }
    if r.budget != u64::MAX {
        let b = r.budget as f64 / 1000.0;
        x0 = x0.min(b);
        x1 = x1.max(b);
    }
    let pad = (x1 - x0).max(1.0) * 0.05;
    let (x0, x1) = (x0 - pad, x1 + pad);
    let (y0, y1) = (y0 / 2.0, y1 * 2.0);
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (900, 600)).into_drawing_area();
        root.fill(&WHITE).map_err(err)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(title, ("sans-serif", 20))
            .margin(15)
            .x_label_area_size(45)
            .y_label_area_size(70)
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("file size (KB)")
            .y_desc("summed sensitivity (KL, log)")
            .y_label_formatter(&|v| format!("{v:.0e}"))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .draw()
            .map_err(err)?;
        chart
            .draw_series(LineSeries::new(pts.iter().copied(), &BLUE))
            .map_err(err)?
            .label("Pareto frontier")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
        chart
            .draw_series(pts.iter().map(|&p| Circle::new(p, 2, BLUE.filled())))
            .map_err(err)?;
        chart
            .draw_series(uni.iter().map(|&(x, s, b)| {
                EmptyElement::at((x, s))
                    + Rectangle::new([(-4, -4), (4, 4)], BLACK.filled())
                    + Text::new(
                        if b == 16 {
                            "fp16".to_string()
                        } else {
                            format!("W{b}")
                        },
                        (6, -14),
                        ("sans-serif", 14),
                    )
            }))
            .map_err(err)?
            .label("uniform precision")
            .legend(|(x, y)| Rectangle::new([(x + 6, y - 4), (x + 14, y + 4)], BLACK.filled()));
        if r.budget != u64::MAX {
            let b = r.budget as f64 / 1000.0;
            chart
                .draw_series(LineSeries::new(vec![(b, y0), (b, y1)], &GREEN))
                .map_err(err)?
                .label("budget")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
        }
        let c = (r.chosen.bytes as f64 / 1000.0, y(r.chosen.sensitivity));
        chart
            .draw_series(std::iter::once(Circle::new(c, 7, RED.filled())))
            .map_err(err)?
            .label("chosen")
            .legend(|(x, y)| Circle::new((x + 10, y), 5, RED.filled()));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(err)?;
        root.present().map_err(err)?;
    }
    Ok(svg)
}
