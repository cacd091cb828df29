//! A hand-written SVG line plot: cost (y, linear from 0) against rule count
//! (x, log10), one series per configuration, min–max as error bars. No
//! plotting crate: the picture is small and its markup stays diffable.

use std::fmt::Write as _;

pub struct Series {
    pub name: String,
    /// (x, median, min, max)
    pub points: Vec<(f64, f64, f64, f64)>,
}

const W: f64 = 760.0;
const H: f64 = 420.0;
const LEFT: f64 = 80.0;
const RIGHT: f64 = 250.0;
const TOP: f64 = 40.0;
const BOTTOM: f64 = 50.0;
const COLOURS: [&str; 8] = [
    "#444444", "#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
];

/// A "nice" upper bound and tick step for `max`.
fn nice(max: f64) -> (f64, f64) {
    let max = if max > 0.0 { max } else { 1.0 };
    let mag = 10f64.powf(max.log10().floor());
    let step = [0.1, 0.2, 0.25, 0.5, 1.0, 2.0]
        .iter()
        .map(|s| s * mag)
        .find(|s| max / s <= 6.0)
        .unwrap_or(2.0 * mag);
    ((max / step).ceil() * step, step)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

pub fn plot(title: &str, y_label: &str, series: &[Series]) -> String {
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    let (xmin, xmax) = xs
        .iter()
        .fold((f64::MAX, f64::MIN), |(a, b), &x| (a.min(x), b.max(x)));
    let (lx0, lx1) = (xmin.max(1.0).log10() - 0.2, xmax.max(10.0).log10() + 0.2);
    // Scaled to the medians: one outlier round must not flatten every
    // line into the axis. Whiskers taller than the plot are clipped.
    let ymax_raw = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1 * 1.3))
        .fold(0.0, f64::max);
    let (ymax, ystep) = nice(ymax_raw);
    let pw = W - LEFT - RIGHT;
    let ph = H - TOP - BOTTOM;
    let px = |x: f64| LEFT + (x.max(1.0).log10() - lx0) / (lx1 - lx0) * pw;
    let py = |y: f64| TOP + ph - y / ymax * ph;

    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        s,
        r##"<text x="{:.1}" y="22" text-anchor="end" font-size="11" fill="#666">points: median; bars: min–max (clipped at the top)</text>"##,
        W - 10.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{}" y="22" font-size="15" font-weight="bold">{}</text>"#,
        LEFT,
        esc(title)
    );
    // Grid and y ticks.
    let mut y = 0.0;
    while y <= ymax + ystep / 2.0 {
        let _ = writeln!(
            s,
            r##"<line x1="{LEFT}" x2="{:.1}" y1="{:.1}" y2="{:.1}" stroke="#e0e0e0"/><text x="{:.1}" y="{:.1}" text-anchor="end">{}</text>"##,
            LEFT + pw,
            py(y),
            py(y),
            LEFT - 6.0,
            py(y) + 4.0,
            fmt_num(y)
        );
        y += ystep;
    }
    // X ticks at the rule counts measured.
    let mut ticks = xs.clone();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        let _ = writeln!(
            s,
            r##"<line x1="{0:.1}" x2="{0:.1}" y1="{1:.1}" y2="{2:.1}" stroke="#e0e0e0"/><text x="{0:.1}" y="{3:.1}" text-anchor="middle">{4}</text>"##,
            px(x),
            TOP,
            TOP + ph,
            TOP + ph + 16.0,
            fmt_num(x)
        );
    }
    let _ = writeln!(
        s,
        r##"<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#888"/>"##
    );
    let _ = writeln!(
        s,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">rules in the map (log scale)</text>"#,
        LEFT + pw / 2.0,
        H - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text transform="translate(18 {:.1}) rotate(-90)" text-anchor="middle">{}</text>"#,
        TOP + ph / 2.0,
        esc(y_label)
    );
    for (i, ser) in series.iter().enumerate() {
        let c = COLOURS[i % COLOURS.len()];
        let dash = if ser.name.contains("peer") {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let pts: Vec<String> = ser
            .points
            .iter()
            .map(|p| format!("{:.1},{:.1}", px(p.0), py(p.1)))
            .collect();
        let _ = writeln!(
            s,
            r#"<polyline points="{}" fill="none" stroke="{c}" stroke-width="2"{dash}/>"#,
            pts.join(" ")
        );
        for p in &ser.points {
            let (x, y0, y1) = (px(p.0), py(p.2.min(ymax)), py(p.3.min(ymax)));
            let _ = writeln!(
                s,
                r#"<line x1="{x:.1}" x2="{x:.1}" y1="{y0:.1}" y2="{y1:.1}" stroke="{c}"/><circle cx="{x:.1}" cy="{:.1}" r="3" fill="{c}"/>"#,
                py(p.1)
            );
        }
        let ly = TOP + 10.0 + i as f64 * 20.0;
        let lx = LEFT + pw + 15.0;
        let _ = writeln!(
            s,
            r#"<line x1="{lx}" x2="{}" y1="{ly}" y2="{ly}" stroke="{c}" stroke-width="2"{dash}/><text x="{}" y="{}">{}</text>"#,
            lx + 22.0,
            lx + 28.0,
            ly + 4.0,
            esc(&ser.name)
        );
    }
    s.push_str("</svg>\n");
    s
}

/// 1234567 → "1 234 567"; 2.5 → "2.5".
pub fn fmt_num(v: f64) -> String {
    if v.fract().abs() > 1e-9 && v.abs() < 100.0 {
        return format!("{v:.1}");
    }
    let digits = format!("{}", v.round() as i64);
    let (sign, digits) = digits
        .strip_prefix('-')
        .map_or(("", digits.as_str()), |d| ("-", d));
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push('\u{202f}');
        }
        out.push(ch);
    }
    format!("{sign}{out}")
}
