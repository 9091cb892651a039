//! The run as a picture: an SVG timeline of every engine's reserved and allocated bytes
//! against its limit, the process's RSS against the ceiling, and markers where the global
//! pressure level changed, where reclaims were requested, where the query engine's
//! operators spilled and where a timeseries memtable or a Sparse or CRDT write buffer
//! flushed.
//!
//! Drawn with `plotters`' SVG backend (text becomes SVG `<text>`, so no system fonts are
//! needed). One chart, time on x and MiB on y: each engine has one colour, solid for its
//! reservations, dotted for its arena's allocated bytes and dashed for its limit; RSS is
//! black, the ceiling red and dashed.

use std::path::Path;

use plotters::prelude::*;

use crate::workload::{TimelinePoint, WorkloadReport};

const MIB: f64 = 1024.0 * 1024.0;
/// Lines are drawn through at most this many points (a long run samples thousands); markers
/// use every point.
const MAX_LINE_POINTS: usize = 300;

/// The colours of the engines, in `workload::ENGINES` order.
const COLOURS: [RGBColor; 6] = [
    RGBColor(31, 119, 180),
    RGBColor(44, 160, 44),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(255, 127, 14),
    RGBColor(23, 190, 207),
];

fn mib(bytes: usize) -> f64 {
    bytes as f64 / MIB
}

/// Writes the report's timeline to `path` as SVG.
pub fn write_svg(report: &WorkloadReport, path: &Path) -> Result<(), String> {
    let points = &report.timeline;
    if points.is_empty() {
        return Err("the run recorded no timeline to draw".into());
    }
    let x_end = points.last().map_or(1.0, |p| p.seconds).max(0.1);
    let y_end = points
        .iter()
        .map(|p| p.rss.max(p.ceiling))
        .max()
        .map_or(1.0, mib)
        * 1.05;
    let root = SVGBackend::new(path, (1200, 700)).into_drawing_area();
    let err = |e: &dyn std::fmt::Display| format!("drawing {}: {e}", path.display());
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption("mixed workload: memory over time", ("sans-serif", 22))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(0.0..x_end, 0.0..y_end)
        .map_err(|e| err(&e))?;
    chart
        .configure_mesh()
        .x_desc("seconds")
        .y_desc("MiB")
        .draw()
        .map_err(|e| err(&e))?;

    let stride = points.len().div_ceil(MAX_LINE_POINTS).max(1);
    let drawn: Vec<&TimelinePoint> = points
        .iter()
        .step_by(stride)
        .chain(
            points
                .last()
                .filter(|_| !(points.len() - 1).is_multiple_of(stride)),
        )
        .collect();
    let line = |f: &dyn Fn(&TimelinePoint) -> Option<f64>| -> Vec<(f64, f64)> {
        drawn
            .iter()
            .filter_map(|p| f(p).map(|y| (p.seconds, y)))
            .collect()
    };
    chart
        .draw_series(LineSeries::new(
            line(&|p| Some(mib(p.rss))),
            BLACK.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("process RSS")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], BLACK));
    chart
        .draw_series(DashedLineSeries::new(
            line(&|p| Some(mib(p.ceiling))),
            8,
            4,
            RED.stroke_width(2),
        ))
        .map_err(|e| err(&e))?
        .label("ceiling")
        .legend(|(x, y)| PathElement::new([(x, y), (x + 16, y)], RED));

    let engines: Vec<_> = points[0].engines.iter().map(|(e, ..)| *e).collect();
    for (i, engine) in engines.iter().enumerate() {
        let colour = COLOURS[i % COLOURS.len()];
        let field = |p: &TimelinePoint| p.engines.iter().find(|(e, ..)| e == engine).copied();
        chart
            .draw_series(LineSeries::new(
                line(&|p| field(p).map(|(_, reserved, ..)| mib(reserved))),
                colour.stroke_width(2),
            ))
            .map_err(|e| err(&e))?
            .label(format!("{engine} reserved"))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour));
        chart
            .draw_series(DashedLineSeries::new(
                line(&|p| field(p).map(|(_, _, limit, _)| mib(limit))),
                6,
                6,
                colour.stroke_width(1),
            ))
            .map_err(|e| err(&e))?;
        let allocated = line(&|p| field(p).and_then(|(_, _, _, a)| a).map(mib));
        if !allocated.is_empty() {
            chart
                .draw_series(DashedLineSeries::new(
                    allocated,
                    2,
                    3,
                    colour.stroke_width(1),
                ))
                .map_err(|e| err(&e))?
                .label(format!("{engine} allocated (arena)"))
                .legend(move |(x, y)| PathElement::new([(x, y), (x + 16, y)], colour.mix(0.5)));
        }
    }
    // Markers: pressure level changes (triangles at the top) and reclaims (crosses).
    let mut changes = Vec::new();
    let mut reclaims = Vec::new();
    let mut spills = Vec::new();
    let mut flushes = Vec::new();
    for pair in points.windows(2) {
        if pair[1].flushes > pair[0].flushes {
            flushes.push((pair[1].seconds, y_end * 0.86));
        }
        if pair[1].spills > pair[0].spills {
            spills.push((pair[1].seconds, y_end * 0.90));
        }
        if pair[1].pressure != pair[0].pressure {
            changes.push((pair[1].seconds, y_end * 0.98, pair[1].pressure));
        }
        if pair[1].reclaims > pair[0].reclaims {
            reclaims.push((pair[1].seconds, y_end * 0.94));
        }
    }
    chart
        .draw_series(changes.iter().map(|&(x, y, level)| {
            let colour = match level {
                0 => GREEN,
                1 => YELLOW,
                2 => RGBColor(255, 140, 0),
                _ => RED,
            };
            TriangleMarker::new((x, y), 6, colour.filled())
        }))
        .map_err(|e| err(&e))?
        .label("pressure level change")
        .legend(|(x, y)| TriangleMarker::new((x + 8, y), 5, BLACK.filled()));
    chart
        .draw_series(
            reclaims
                .iter()
                .map(|&(x, y)| Cross::new((x, y), 5, MAGENTA.stroke_width(2))),
        )
        .map_err(|e| err(&e))?
        .label("reclaim requested")
        .legend(|(x, y)| Cross::new((x + 8, y), 4, MAGENTA));
    chart
        .draw_series(
            spills
                .iter()
                .map(|&(x, y)| Circle::new((x, y), 3, BLUE.filled())),
        )
        .map_err(|e| err(&e))?
        .label("query operators spilled")
        .legend(|(x, y)| Circle::new((x + 8, y), 3, BLUE.filled()));
    let flush_colour = RGBColor(120, 120, 120);
    chart
        .draw_series(flushes.iter().map(|&(x, y)| {
            EmptyElement::at((x, y)) + Rectangle::new([(-3, -3), (3, 3)], flush_colour.filled())
        }))
        .map_err(|e| err(&e))?
        .label("memtable or write buffer flushed")
        .legend(move |(x, y)| {
            Rectangle::new([(x + 5, y - 3), (x + 11, y + 3)], flush_colour.filled())
        });
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .position(SeriesLabelPosition::UpperLeft)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
