//! The report's charts: training curves as inline SVG (axes with "nice" ticks, one line per
//! series), drawn without any script or external file.

use std::fmt::Write as _;

use super::{Curve, html_escape};

pub(super) fn render_curves(out: &mut String, curves: &[Curve]) {
    out.push_str("<section class=\"curves\">\n<h2>Training</h2>\n");
    if curves.is_empty() {
        out.push_str("<p class=\"empty\">No training curves in this run.</p>\n</section>\n");
        return;
    }
    out.push_str("<div class=\"charts\">\n");
    for c in curves {
        render_chart(out, c);
    }
    out.push_str("</div>\n</section>\n");
}

/// Chart geometry, in SVG user units (the SVG scales to its container).
pub(super) const CW: f64 = 360.0;
pub(super) const CH: f64 = 220.0;
pub(super) const ML: f64 = 58.0;
pub(super) const MR: f64 = 14.0;
pub(super) const MT: f64 = 12.0;
pub(super) const MB: f64 = 40.0;

/// Evenly spaced "nice" ticks (steps of 1, 2 or 5 × 10^k) covering `[min, max]`.
///
/// Returns the tick positions; the first and last ticks bound the axis. `integer` forces a
/// step of at least 1 (epochs). Requires `min < max`, both finite.
pub(super) fn nice_ticks(min: f64, max: f64, target: usize, integer: bool) -> (Vec<f64>, f64) {
    let raw = (max - min) / target.max(1) as f64;
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let mut step = mag
        * if norm < 1.5 {
            1.0
        } else if norm < 3.0 {
            2.0
        } else if norm < 7.0 {
            5.0
        } else {
            10.0
        };
    if integer && step < 1.0 {
        step = 1.0;
    }
    let lo = (min / step).floor() * step;
    let hi = (max / step).ceil() * step;
    let n = ((hi - lo) / step).round() as usize;
    // Guard against pathological ranges (e.g. denormals) producing huge tick counts.
    let n = n.min(50);
    let ticks = (0..=n)
        .map(|i| {
            let t = lo + i as f64 * step;
            // Avoid printing "-0" or 1e-17 for what is zero.
            if t.abs() < step * 1e-9 { 0.0 } else { t }
        })
        .collect();
    (ticks, step)
}

/// Formats a tick label with as many decimals as the step needs; tiny steps (learning
/// rates) use scientific notation.
pub(super) fn fmt_tick(v: f64, step: f64) -> String {
    if step < 1e-3 || v.abs() >= 1e6 {
        if v == 0.0 {
            return "0".to_string();
        }
        return format!("{v:.1e}");
    }
    let decimals = (-step.log10().floor()).clamp(0.0, 6.0) as usize;
    format!("{v:.decimals$}")
}

/// Formats a data value for tooltips and the "last" label.
pub(super) fn fmt_value(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-3..1e6).contains(&a) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// Widens a degenerate range (single point, constant series) so it can be drawn.
pub(super) fn pad_range(min: f64, max: f64) -> (f64, f64) {
    if max > min {
        return (min, max);
    }
    let pad = if min == 0.0 { 1.0 } else { min.abs() * 0.1 };
    (min - pad, max + pad)
}

/// Draws one curve as a small SVG line chart with axes, ticks and labels.
///
/// Points whose epoch or value is not finite are skipped (the line joins the neighbours of a
/// gap); a single point is drawn as a marker; a curve with no finite point says so.
pub(super) fn render_chart(out: &mut String, curve: &Curve) {
    let name = html_escape(&curve.name);
    let pts: Vec<(f64, f64)> = curve
        .points
        .iter()
        .copied()
        .filter(|(x, y)| x.is_finite() && y.is_finite())
        .collect();
    let skipped = curve.points.len() - pts.len();
    let last = pts
        .last()
        .map(|&(x, y)| format!("last {} @ epoch {}", fmt_value(y), fmt_epoch(x)))
        .unwrap_or_else(|| "no data".to_string());
    let _ = write!(
        out,
        "<figure class=\"chart\">\n<figcaption><span class=\"name\">{name}</span>\
         <span class=\"last\">{}</span></figcaption>\n",
        html_escape(&last)
    );
    let _ = write!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" viewBox=\"0 0 {CW} {CH}\" width=\"{CW}\" \
         height=\"{CH}\" role=\"img\" aria-label=\"{name} per epoch\">\n<title>{name} per epoch</title>\n"
    );
    if pts.is_empty() {
        let _ = write!(
            out,
            "<rect class=\"frame\" x=\"{ML}\" y=\"{MT}\" width=\"{}\" height=\"{}\"></rect>\n\
             <text class=\"nodata\" x=\"{}\" y=\"{}\" text-anchor=\"middle\">no data</text>\n",
            CW - ML - MR,
            CH - MT - MB,
            ML + (CW - ML - MR) / 2.0,
            MT + (CH - MT - MB) / 2.0,
        );
    } else {
        render_plot(out, &pts, &name);
    }
    out.push_str("</svg>\n");
    if skipped > 0 {
        let _ = writeln!(
            out,
            "<p class=\"skipped\">{skipped} non-finite point{} skipped</p>",
            if skipped == 1 { "" } else { "s" }
        );
    }
    out.push_str("</figure>\n");
}

/// Draws axes, ticks, labels, the line and its markers for `pts` (all finite, non-empty);
/// `name` is the already-escaped curve name used as the y-axis label.
pub(super) fn render_plot(out: &mut String, pts: &[(f64, f64)], name: &str) {
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for &(x, y) in pts {
        x0 = x0.min(x);
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    let integer_x = pts.iter().all(|(x, _)| x.fract() == 0.0);
    let (x0, x1) = pad_range(x0, x1);
    let (y0, y1) = pad_range(y0, y1);
    let (xt, xstep) = nice_ticks(x0, x1, 6, integer_x);
    let (yt, ystep) = nice_ticks(y0, y1, 5, false);
    let (xa, xb) = (
        xt.first().copied().unwrap_or(x0),
        xt.last().copied().unwrap_or(x1),
    );
    let (ya, yb) = (
        yt.first().copied().unwrap_or(y0),
        yt.last().copied().unwrap_or(y1),
    );
    let (pw, ph) = (CW - ML - MR, CH - MT - MB);
    let sx = |x: f64| ML + (x - xa) / (xb - xa) * pw;
    let sy = |y: f64| MT + ph - (y - ya) / (yb - ya) * ph;

    // Grid and y ticks.
    out.push_str("<g class=\"axis y\">\n");
    for &t in &yt {
        let y = sy(t);
        let _ = writeln!(
            out,
            "<line class=\"grid\" x1=\"{ML}\" x2=\"{:.1}\" y1=\"{y:.1}\" y2=\"{y:.1}\"></line>\
             <text x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            ML + pw,
            ML - 6.0,
            y + 3.5,
            html_escape(&fmt_tick(t, ystep)),
        );
    }
    out.push_str("</g>\n<g class=\"axis x\">\n");
    for &t in &xt {
        let x = sx(t);
        let _ = writeln!(
            out,
            "<line class=\"tick\" x1=\"{x:.1}\" x2=\"{x:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"></line>\
             <text x=\"{x:.1}\" y=\"{:.1}\" text-anchor=\"middle\">{}</text>",
            MT + ph,
            MT + ph + 4.0,
            MT + ph + 15.0,
            html_escape(&fmt_tick(t, xstep)),
        );
    }
    out.push_str("</g>\n");
    let _ = write!(
        out,
        "<line class=\"baseline\" x1=\"{ML}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\"></line>\n\
         <line class=\"baseline\" x1=\"{ML}\" x2=\"{ML}\" y1=\"{MT}\" y2=\"{:.1}\"></line>\n",
        ML + pw,
        MT + ph,
        MT + ph,
        MT + ph,
    );
    // Axis labels.
    let _ = write!(
        out,
        "<text class=\"label\" x=\"{:.1}\" y=\"{:.1}\" text-anchor=\"middle\">epoch</text>\n\
         <text class=\"label\" transform=\"translate(13 {:.1}) rotate(-90)\" text-anchor=\"middle\">{name}</text>\n",
        ML + pw / 2.0,
        CH - 6.0,
        MT + ph / 2.0,
    );
    // The series.
    out.push_str("<polyline class=\"series\" points=\"");
    for (i, &(x, y)) in pts.iter().enumerate() {
        if i > 0 {
            out.push(' ');
        }
        let _ = write!(out, "{:.2},{:.2}", sx(x), sy(y));
    }
    out.push_str("\"></polyline>\n");
    // Markers (with hover tooltips) when there are few enough points to tell apart.
    if pts.len() <= 60 {
        out.push_str("<g class=\"markers\">\n");
        let r = if pts.len() == 1 { 4.0 } else { 2.5 };
        for &(x, y) in pts {
            let _ = writeln!(
                out,
                "<circle cx=\"{:.2}\" cy=\"{:.2}\" r=\"{r}\"><title>epoch {}: {}</title></circle>",
                sx(x),
                sy(y),
                html_escape(&fmt_epoch(x)),
                html_escape(&fmt_value(y)),
            );
        }
        out.push_str("</g>\n");
    }
}

/// Epochs are usually whole numbers; print them without a fraction when they are.
pub(super) fn fmt_epoch(x: f64) -> String {
    if x.fract() == 0.0 && x.abs() < 1e15 {
        format!("{}", x as i64)
    } else {
        format!("{x:.2}")
    }
}

