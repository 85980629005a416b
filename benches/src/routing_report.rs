//! The routing benchmark's outputs (`src/bin/routing.rs`): the markdown
//! table and the plot.

use std::fmt::Write as _;

/// One workload x strategy run.
pub struct Row {
    pub workload: &'static str,
    pub strategy: &'static str,
    pub hit: f64,
    pub p50: f64,
    pub p99: f64,
    pub warm_p99: f64,
    pub rps: f64,
    pub busiest: f64,
    pub errors: usize,
    /// Prefix-affinity hops turned away by the pod's sidecar (`spill`).
    pub turned_away: f64,
}

pub fn markdown(rows: &[Row]) -> String {
    let mut s = String::from(
        "| workload | strategy | prefix-cache hit | TTFT p50 | TTFT p99 | p99 warm | req/s | busiest pod | hops turned away | errors |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {:.1}% | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} | {:.0}% | {} | {} |",
            r.workload,
            r.strategy,
            r.hit * 100.0,
            r.p50,
            r.p99,
            r.warm_p99,
            r.rps,
            r.busiest * 100.0,
            r.turned_away,
            r.errors
        );
    }
    s
}

const COLORS: [&str; 5] = ["#999999", "#6a9fd4", "#d4a76a", "#2e8b57", "#8fbc8f"];
const BAR: f64 = 22.0;

/// Two panels of bars per workload and strategy (colour by the index in
/// `strategies`): prefix-cache hit rate, and TTFT p99.
pub fn svg(rows: &[Row], strategies: &[&str]) -> String {
    let (w, panel) = (720.0, 260.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{}\" font-family=\"sans-serif\" font-size=\"12\">\n",
        2.0 * panel
    );
    bars(
        &mut s,
        rows,
        strategies,
        0.0,
        panel,
        "prefix-cache hit rate (from the pods' vLLM metrics), 4 pods",
        |r| {
            (
                r.hit.clamp(0.0, 1.0),
                format!("{:.0}", r.hit * 100.0),
                format!("{:.1}%", r.hit * 100.0),
            )
        },
    );
    let max = rows.iter().map(|r| r.p99).fold(1.0, f64::max);
    bars(
        &mut s,
        rows,
        strategies,
        panel,
        panel,
        &format!("time to first token, p99 (ms; scale 0 to {max:.0})"),
        |r| {
            (
                r.p99 / max,
                format!("{:.0}", r.p99),
                format!("{:.1} ms", r.p99),
            )
        },
    );
    for (i, name) in strategies.iter().enumerate() {
        let (lx, ly) = (w - 150.0, 30.0 + 14.0 * i as f64);
        let _ = writeln!(
            s,
            "<rect x=\"{lx}\" y=\"{ly}\" width=\"10\" height=\"10\" fill=\"{}\"/><text x=\"{}\" y=\"{}\">{name}</text>",
            COLORS[i % COLORS.len()],
            lx + 14.0,
            ly + 9.0,
        );
    }
    s.push_str("</svg>\n");
    s
}

/// One panel at `y0`: `value` gives a bar's height (0..1 of the plot), its
/// label and its tooltip.
fn bars(
    s: &mut String,
    rows: &[Row],
    strategies: &[&str],
    y0: f64,
    h: f64,
    title: &str,
    value: impl Fn(&Row) -> (f64, String, String),
) {
    let (left, top, gap) = (50.0, y0 + 30.0, 40.0);
    let plot_h = h - 80.0;
    let _ = writeln!(s, "<text x=\"{left}\" y=\"{}\">{title}</text>", y0 + 18.0);
    let mut x = left;
    let mut last = "";
    for r in rows {
        if r.workload != last {
            if !last.is_empty() {
                x += gap;
            }
            let _ = writeln!(
                s,
                "<text x=\"{x}\" y=\"{}\">{}</text>",
                top + plot_h + 20.0,
                r.workload
            );
            last = r.workload;
        }
        let i = strategies
            .iter()
            .position(|n| *n == r.strategy)
            .unwrap_or(0);
        let (v, label, tip) = value(r);
        let bh = plot_h * v.clamp(0.0, 1.0);
        let _ = writeln!(
            s,
            "<rect x=\"{x}\" y=\"{}\" width=\"{BAR}\" height=\"{bh}\" fill=\"{}\"><title>{} {}: {tip}</title></rect><text x=\"{}\" y=\"{}\" font-size=\"9\">{label}</text>",
            top + plot_h - bh,
            COLORS[i % COLORS.len()],
            r.workload,
            r.strategy,
            x + 2.0,
            top + plot_h - bh - 3.0,
        );
        x += BAR + 2.0;
    }
}
