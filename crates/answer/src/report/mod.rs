//! A static, single-file HTML report of one re-identification run.
//!
//! [`render`] turns a [`ReportData`] (evaluation metrics, training curves, and every query
//! photo with its top-k neighbours) into one self-contained HTML5 page: inline CSS, inline
//! SVG charts, images embedded as `data:` URIs (or linked as given), and a few lines of
//! inline JavaScript to filter the query grid. Nothing is fetched from the network, so the
//! file can be mailed, attached to a ticket or opened from an object store as it is.
//!
//! Why a hand-written renderer rather than a template engine: the page is small, its
//! structure is fixed, and keeping it dependency-free means the report can be produced by
//! any stage (or test) without pulling a template crate into the build. Every string that
//! comes from data goes through [`html_escape`] exactly once, at the point it is written.

use std::fmt::Write as _;

mod charts;

use charts::render_curves;

/// Everything the report shows. Built by the caller from the run's tables; the renderer
/// computes nothing it could not derive from this (summary counts, first-match ranks).
#[derive(Debug, Clone)]
pub struct ReportData {
    /// Page title, e.g. `"ingest-to-submission — run 20261128T..."`.
    pub title: String,
    /// When the report was produced, RFC 3339.
    pub generated_at: String,
    /// Identifier of the model whose embeddings produced the neighbours.
    pub model_id: String,
    /// Evaluation table rows (one per query/gallery split).
    pub metrics: Vec<MetricRow>,
    /// Training curves per epoch: "loss", "lr", "val mAP@20", "val P@1", ...
    pub curves: Vec<Curve>,
    /// Each query photo with its top-k neighbours (k usually 20), in rank order.
    pub queries: Vec<QueryRow>,
    /// Free text lines shown in the footer (e.g. how to regenerate the report).
    pub notes: Vec<String>,
}

/// One row of the evaluation table.
#[derive(Debug, Clone)]
pub struct MetricRow {
    /// Name of the query split.
    pub queries: String,
    /// Name of the gallery split.
    pub gallery: String,
    /// Number of queries evaluated.
    pub n_queries: i64,
    /// Precision at rank 1.
    pub precision_at_1: f64,
    /// Mean average precision over the top 20.
    pub map_at_20: f64,
    /// Recall within the top 20.
    pub recall_at_20: f64,
}

/// A named series of `(epoch, value)` points. Non-finite points are skipped when drawn.
#[derive(Debug, Clone)]
pub struct Curve {
    /// Series name, shown as the chart title and y-axis label.
    pub name: String,
    /// `(epoch, value)` pairs, in any order of appearance (drawn in the given order).
    pub points: Vec<(f64, f64)>,
}

/// One query photo and its retrieved neighbours.
#[derive(Debug, Clone)]
pub struct QueryRow {
    /// The query photo.
    pub photo: Photo,
    /// Neighbours in rank order (rank 1 first).
    pub neighbours: Vec<Neighbour>,
    /// `Some(true)` when the run flagged this query as a probable new individual.
    pub new_individual: Option<bool>,
}

/// A photo as shown in the report.
#[derive(Debug, Clone)]
pub struct Photo {
    /// The lake's photo id (free text; escaped when rendered).
    pub photo_id: String,
    /// The individual the photo is labelled with, if known.
    pub individual_id: Option<String>,
    /// Where the thumbnail comes from.
    pub image: ImageRef,
}

/// A retrieved neighbour of a query.
#[derive(Debug, Clone)]
pub struct Neighbour {
    /// The gallery photo.
    pub photo: Photo,
    /// Similarity score (shown with 2 decimals).
    pub similarity: f64,
    /// Same individual as the query; `None` when either label is unknown.
    pub correct: Option<bool>,
}

/// A thumbnail's source.
#[derive(Debug, Clone)]
pub enum ImageRef {
    /// Encoded image bytes (JPEG, PNG, ...), embedded as a base64 `data:` URI.
    Embedded {
        /// MIME type, e.g. `image/jpeg`.
        mime: String,
        /// The encoded image.
        bytes: Vec<u8>,
    },
    /// A URL or relative path, used as the `src` as given (escaped).
    Link(String),
    /// No image: a grey placeholder box with the photo id is drawn instead.
    Missing,
}

/// Escapes text for use in HTML element content and in quoted attribute values.
///
/// Replaces `&`, `<`, `>`, `"` and `'`, which is sufficient for both contexts as long as
/// attributes are always quoted (they are, throughout this module).
#[must_use]
pub fn html_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

/// Renders the whole report as one HTML5 document.
#[must_use]
pub fn render(data: &ReportData) -> String {
    let mut out = String::with_capacity(16 * 1024 + embedded_size(data));
    let title = html_escape(&data.title);
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta name=\"generator\" content=\"pipeline report\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n"
    );
    render_header(&mut out, data);
    out.push_str("<main>\n");
    render_summary(&mut out, &data.queries);
    render_metrics(&mut out, &data.metrics);
    render_curves(&mut out, &data.curves);
    render_queries(&mut out, &data.queries);
    out.push_str("</main>\n");
    render_footer(&mut out, data);
    let _ = write!(out, "<script>{SCRIPT}</script>\n</body>\n</html>\n");
    out
}

/// Thumbnail edge of the query photo, in CSS pixels.
const QUERY_PX: u32 = 168;
/// Thumbnail edge of a neighbour photo, in CSS pixels.
const NEIGHBOUR_PX: u32 = 104;

/// Approximate size of all embedded images once base64-encoded, to size the output buffer.
fn embedded_size(data: &ReportData) -> usize {
    let one = |p: &Photo| match &p.image {
        ImageRef::Embedded { bytes, .. } => bytes.len().div_ceil(3) * 4 + 64,
        _ => 0,
    };
    data.queries
        .iter()
        .map(|q| one(&q.photo) + q.neighbours.iter().map(|n| one(&n.photo)).sum::<usize>())
        .sum()
}

fn render_header(out: &mut String, data: &ReportData) {
    let _ = write!(
        out,
        "<header class=\"top\">\n<h1>{}</h1>\n<p class=\"meta\"><span>model <code>{}</code></span>\
         <span>generated <time datetime=\"{}\">{}</time></span></p>\n</header>\n",
        html_escape(&data.title),
        html_escape(&data.model_id),
        html_escape(&data.generated_at),
        html_escape(&data.generated_at),
    );
}

/// Where the first correct neighbour sits in a query's ranked list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstMatch {
    /// 1-based rank of the first neighbour known to be correct.
    At(usize),
    /// Every neighbour is known to be wrong.
    NoMatch,
    /// No neighbour is known correct, some are known wrong, some unknown.
    NoKnownMatch,
    /// No neighbour has a known label (or there are no neighbours).
    Unknown,
}

fn first_match(neighbours: &[Neighbour]) -> FirstMatch {
    if let Some(i) = neighbours.iter().position(|n| n.correct == Some(true)) {
        return FirstMatch::At(i + 1);
    }
    let known = neighbours.iter().filter(|n| n.correct.is_some()).count();
    if neighbours.is_empty() || known == 0 {
        FirstMatch::Unknown
    } else if known == neighbours.len() {
        FirstMatch::NoMatch
    } else {
        FirstMatch::NoKnownMatch
    }
}

/// Whether rank 1 is correct: `Some(true)` hit, `Some(false)` miss, `None` unknown.
fn rank1(q: &QueryRow) -> Option<bool> {
    q.neighbours.first().and_then(|n| n.correct)
}

/// Counts shown above the metrics: computed from the queries on the page, not the metrics
/// table, so that a reader can check what they see against what the numbers say.
fn render_summary(out: &mut String, queries: &[QueryRow]) {
    let shown = queries.len();
    let known = queries.iter().filter(|q| rank1(q).is_some()).count();
    let hits = queries.iter().filter(|q| rank1(q) == Some(true)).count();
    let in_top_k = queries
        .iter()
        .filter(|q| matches!(first_match(&q.neighbours), FirstMatch::At(_)))
        .count();
    let flagged = queries
        .iter()
        .filter(|q| q.new_individual == Some(true))
        .count();
    let p1 = if known == 0 {
        "—".to_string()
    } else {
        format!("{:.3}", hits as f64 / known as f64)
    };
    out.push_str("<section class=\"summary\" aria-label=\"summary\">\n");
    let card = |out: &mut String, value: &str, label: &str, sub: &str| {
        let _ = writeln!(
            out,
            "<div class=\"card\"><div class=\"value\">{value}</div>\
             <div class=\"label\">{label}</div><div class=\"sub\">{sub}</div></div>"
        );
    };
    card(out, &shown.to_string(), "queries shown", "&#160;");
    card(
        out,
        &p1,
        "P@1 among shown",
        &format!("{hits} of {known} with a known rank-1 label"),
    );
    card(
        out,
        &in_top_k.to_string(),
        "matched in top k",
        &format!("{} without a known match", shown - in_top_k),
    );
    card(
        out,
        &flagged.to_string(),
        "new individual?",
        "flagged by the run",
    );
    out.push_str("</section>\n");
}

/// Formats a metric for the table; non-finite values show as an em dash.
fn fmt_metric(v: f64) -> String {
    if v.is_finite() {
        format!("{v:.3}")
    } else {
        "—".to_string()
    }
}

fn render_metrics(out: &mut String, rows: &[MetricRow]) {
    out.push_str("<section class=\"metrics\">\n<h2>Evaluation</h2>\n");
    if rows.is_empty() {
        out.push_str("<p class=\"empty\">No evaluation metrics in this run.</p>\n</section>\n");
        return;
    }
    out.push_str(
        "<div class=\"table-wrap\"><table>\n<thead><tr><th scope=\"col\">Queries</th>\
         <th scope=\"col\">Gallery</th><th scope=\"col\" class=\"num\">n</th>\
         <th scope=\"col\" class=\"num\">P@1</th><th scope=\"col\" class=\"num\">mAP@20</th>\
         <th scope=\"col\" class=\"num\">Recall@20</th></tr></thead>\n<tbody>\n",
    );
    for r in rows {
        let _ = writeln!(
            out,
            "<tr><td>{}</td><td>{}</td><td class=\"num\">{}</td><td class=\"num\">{}</td>\
             <td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
            html_escape(&r.queries),
            html_escape(&r.gallery),
            r.n_queries,
            fmt_metric(r.precision_at_1),
            fmt_metric(r.map_at_20),
            fmt_metric(r.recall_at_20),
        );
    }
    out.push_str("</tbody>\n</table></div>\n</section>\n");
}

fn render_queries(out: &mut String, queries: &[QueryRow]) {
    out.push_str("<section class=\"queries\">\n<h2>Queries</h2>\n");
    if queries.is_empty() {
        out.push_str("<p class=\"empty\">No queries in this report.</p>\n</section>\n");
        return;
    }
    let misses = queries.iter().filter(|q| rank1(q) == Some(false)).count();
    let no_match = queries
        .iter()
        .filter(|q| !matches!(first_match(&q.neighbours), FirstMatch::At(_)))
        .count();
    let flagged = queries
        .iter()
        .filter(|q| q.new_individual == Some(true))
        .count();
    let _ = writeln!(
        out,
        "<div class=\"filters\" role=\"group\" aria-label=\"filter queries\">\
         <button type=\"button\" data-filter=\"all\" aria-pressed=\"true\">All <span>{}</span></button>\
         <button type=\"button\" data-filter=\"miss\" aria-pressed=\"false\">Only rank-1 misses <span>{misses}</span></button>\
         <button type=\"button\" data-filter=\"nomatch\" aria-pressed=\"false\">No known match in top k <span>{no_match}</span></button>\
         <button type=\"button\" data-filter=\"new\" aria-pressed=\"false\">New individual? <span>{flagged}</span></button>\
         <span class=\"showing\" aria-live=\"polite\"></span></div>",
        queries.len()
    );
    out.push_str("<div class=\"grid\">\n");
    for (i, q) in queries.iter().enumerate() {
        render_query(out, i, q);
    }
    out.push_str("</div>\n</section>\n");
}

fn render_query(out: &mut String, index: usize, q: &QueryRow) {
    let r1 = rank1(q);
    let fm = first_match(&q.neighbours);
    let k = q.neighbours.len();
    let hit_attr = match r1 {
        Some(true) => "hit",
        Some(false) => "miss",
        None => "unknown",
    };
    let matched = matches!(fm, FirstMatch::At(_));
    let is_new = q.new_individual == Some(true);
    let _ = writeln!(
        out,
        "<article class=\"query\" id=\"q{}\" data-hit=\"{hit_attr}\" data-match=\"{}\" data-new=\"{}\">",
        index + 1,
        if matched { "yes" } else { "no" },
        if is_new { "yes" } else { "no" },
    );
    // The query itself.
    out.push_str("<div class=\"qhead\">\n");
    let _ = writeln!(out, "<div class=\"qnum\">query {}</div>", index + 1);
    render_thumb(out, &q.photo, QUERY_PX, "qimg");
    let _ = writeln!(
        out,
        "<div class=\"pid\" title=\"{id}\">{id}</div>",
        id = html_escape(&q.photo.photo_id)
    );
    render_individual(out, q.photo.individual_id.as_deref());
    let (r1_class, r1_text) = match r1 {
        Some(true) => ("ok", "rank 1 correct"),
        Some(false) => ("bad", "rank 1 wrong"),
        None if k == 0 => ("unk", "no neighbours"),
        None => ("unk", "rank 1 unknown"),
    };
    let _ = writeln!(out, "<div class=\"status {r1_class}\">{r1_text}</div>");
    let (fm_class, fm_text) = match fm {
        FirstMatch::At(1) => ("ok", "first match at rank 1".to_string()),
        FirstMatch::At(r) => ("warn", format!("first match at rank {r}")),
        FirstMatch::NoMatch => ("bad", format!("no match in top {k}")),
        FirstMatch::NoKnownMatch => ("unk", format!("no known match in top {k}")),
        FirstMatch::Unknown => ("unk", "match unknown".to_string()),
    };
    let _ = writeln!(out, "<div class=\"status {fm_class}\">{fm_text}</div>");
    if is_new {
        out.push_str("<div class=\"badge\">new individual?</div>\n");
    }
    out.push_str("</div>\n");
    // Its neighbours, in rank order.
    if q.neighbours.is_empty() {
        out.push_str("<p class=\"empty\">No neighbours.</p>\n");
    } else {
        out.push_str("<ol class=\"neighbours\">\n");
        for (r, n) in q.neighbours.iter().enumerate() {
            let class = match n.correct {
                Some(true) => "correct",
                Some(false) => "incorrect",
                None => "unknown",
            };
            let verdict = match n.correct {
                Some(true) => "same individual",
                Some(false) => "different individual",
                None => "label unknown",
            };
            let sim = if n.similarity.is_finite() {
                format!("{:.2}", n.similarity)
            } else {
                "—".to_string()
            };
            let _ = write!(
                out,
                "<li class=\"nb {class}\" title=\"rank {rank} · {verdict}\">\n\
                 <div class=\"rank\">{rank}</div>\n",
                rank = r + 1,
            );
            render_thumb(out, &n.photo, NEIGHBOUR_PX, "nimg");
            let _ = writeln!(out, "<div class=\"sim\">{sim}</div>");
            render_individual(out, n.photo.individual_id.as_deref());
            out.push_str("</li>\n");
        }
        out.push_str("</ol>\n");
    }
    out.push_str("</article>\n");
}

fn render_individual(out: &mut String, id: Option<&str>) {
    match id {
        Some(id) => {
            let id = html_escape(id);
            let _ = writeln!(out, "<div class=\"ind\" title=\"{id}\">{id}</div>");
        }
        None => out.push_str("<div class=\"ind none\">unlabelled</div>\n"),
    }
}

/// Writes an `<img>` (or a placeholder box) of `px`×`px` CSS pixels for `photo`.
fn render_thumb(out: &mut String, photo: &Photo, px: u32, class: &str) {
    let alt = html_escape(&photo.photo_id);
    let src = match &photo.image {
        ImageRef::Embedded { mime, bytes } if !bytes.is_empty() => Some(format!(
            "data:{};base64,{}",
            safe_mime(mime),
            base64_encode(bytes)
        )),
        ImageRef::Link(url) if is_safe_link(url) => Some(html_escape(url)),
        _ => None,
    };
    match src {
        Some(src) => {
            let _ = writeln!(
                out,
                "<img class=\"{class}\" src=\"{src}\" alt=\"{alt}\" title=\"{alt}\" width=\"{px}\" \
                 height=\"{px}\" loading=\"lazy\" decoding=\"async\">"
            );
        }
        None => {
            let _ = writeln!(
                out,
                "<div class=\"{class} ph\" role=\"img\" aria-label=\"{alt} (no image)\" \
                 style=\"width:{px}px;height:{px}px\"><span>{alt}</span></div>"
            );
        }
    }
}

/// The MIME type for a `data:` URI, if it looks like `type/subtype`; otherwise a generic
/// image type, so that a malformed value can never break out of the attribute.
fn safe_mime(mime: &str) -> &str {
    let m = mime.trim();
    let ok = !m.is_empty()
        && m.len() <= 100
        && m.split('/').count() == 2
        && m.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/+-.".contains(&b));
    if ok { m } else { "application/octet-stream" }
}

/// Refuses links that would run script when the page is opened (`javascript:`,
/// `vbscript:`, `data:text/html`); such a photo is drawn as a placeholder instead.
fn is_safe_link(url: &str) -> bool {
    let cleaned: String = url
        .chars()
        .filter(|c| !c.is_whitespace() && !c.is_control())
        .flat_map(char::to_lowercase)
        .collect();
    !(cleaned.is_empty()
        || cleaned.starts_with("javascript:")
        || cleaned.starts_with("vbscript:")
        || (cleaned.starts_with("data:") && !cleaned.starts_with("data:image/")))
}

/// Standard base64 (RFC 4648, with padding), for `data:` URIs. Hand-rolled so that this
/// module adds no dependency to the crate.
fn base64_encode(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b0 = chunk[0] as u32;
        let b1 = chunk.get(1).copied().unwrap_or(0) as u32;
        let b2 = chunk.get(2).copied().unwrap_or(0) as u32;
        let n = (b0 << 16) | (b1 << 8) | b2;
        out.push(ALPHABET[(n >> 18) as usize & 63] as char);
        out.push(ALPHABET[(n >> 12) as usize & 63] as char);
        out.push(if chunk.len() > 1 {
            ALPHABET[(n >> 6) as usize & 63] as char
        } else {
            '='
        });
        out.push(if chunk.len() > 2 {
            ALPHABET[n as usize & 63] as char
        } else {
            '='
        });
    }
    out
}

fn render_footer(out: &mut String, data: &ReportData) {
    out.push_str("<footer>\n");
    if !data.notes.is_empty() {
        out.push_str("<ul class=\"notes\">\n");
        for n in &data.notes {
            let _ = writeln!(out, "<li>{}</li>", html_escape(n));
        }
        out.push_str("</ul>\n");
    }
    let _ = write!(
        out,
        "<p class=\"gen\">Generated by <code>pipeline</code> at <time datetime=\"{t}\">{t}</time>. \
         This file is self-contained: no network access is needed to view it.</p>\n</footer>\n",
        t = html_escape(&data.generated_at)
    );
}

/// Inline stylesheet. Light and dark schemes via CSS variables; no external fonts.
const STYLE: &str = r#"
:root{--bg:#f7f8fa;--fg:#1d2330;--muted:#667085;--card:#fff;--line:#e3e6ec;--accent:#2563eb;
--ok:#16a34a;--bad:#dc2626;--warn:#d97706;--unk:#98a2b3;--ph:#d0d5dd;
font-family:system-ui,-apple-system,"Segoe UI",Roboto,"Helvetica Neue",Arial,"Noto Sans",sans-serif;
font-size:15px;line-height:1.45;color:var(--fg);background:var(--bg)}
@media (prefers-color-scheme:dark){:root{--bg:#0f1319;--fg:#e6e9ef;--muted:#98a2b3;--card:#171c24;
--line:#2a313c;--accent:#60a5fa;--ph:#3a424f}}
*{box-sizing:border-box}
body{margin:0}
header.top{padding:28px 32px 18px;border-bottom:1px solid var(--line);background:var(--card)}
h1{margin:0 0 6px;font-size:1.6rem;font-weight:650;letter-spacing:-.01em}
h2{font-size:1.15rem;font-weight:650;margin:32px 0 12px}
.meta{margin:0;color:var(--muted);display:flex;flex-wrap:wrap;gap:6px 22px}
code{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.92em}
main{padding:8px 32px 24px;max-width:1600px}
.summary{display:flex;flex-wrap:wrap;gap:14px;margin-top:20px}
.card{background:var(--card);border:1px solid var(--line);border-radius:10px;padding:12px 18px;min-width:180px}
.card .value{font-size:1.7rem;font-weight:650;font-variant-numeric:tabular-nums}
.card .label{font-weight:600}
.card .sub{color:var(--muted);font-size:.85rem}
.table-wrap{overflow-x:auto}
table{border-collapse:collapse;background:var(--card);border:1px solid var(--line);border-radius:10px;min-width:560px}
th,td{padding:7px 14px;border-bottom:1px solid var(--line);text-align:left}
th{font-weight:600;color:var(--muted);font-size:.85rem;text-transform:uppercase;letter-spacing:.03em}
tbody tr:last-child td{border-bottom:0}
.num{text-align:right;font-variant-numeric:tabular-nums}
.empty{color:var(--muted);font-style:italic}
.charts{display:grid;grid-template-columns:repeat(auto-fill,minmax(300px,1fr));gap:14px}
.chart{margin:0;background:var(--card);border:1px solid var(--line);border-radius:10px;padding:10px 12px 6px}
.chart figcaption{display:flex;justify-content:space-between;gap:8px;font-weight:600}
.chart .last{color:var(--muted);font-weight:400;font-size:.85rem;font-variant-numeric:tabular-nums}
.chart svg{width:100%;height:auto;display:block}
.chart text{font-size:10.5px;fill:var(--muted);font-variant-numeric:tabular-nums}
.chart text.label{font-size:11px;fill:var(--fg)}
.chart text.nodata{font-size:13px;font-style:italic}
.chart .grid{stroke:var(--line);stroke-width:1}
.chart .tick,.chart .baseline{stroke:var(--muted);stroke-width:1}
.chart .frame{fill:none;stroke:var(--line)}
.chart .series{fill:none;stroke:var(--accent);stroke-width:2;stroke-linejoin:round;stroke-linecap:round}
.chart .markers circle{fill:var(--card);stroke:var(--accent);stroke-width:1.5}
.chart .skipped{margin:0;color:var(--muted);font-size:.8rem}
.filters{display:flex;flex-wrap:wrap;gap:8px;align-items:center;margin-bottom:14px}
.filters button{font:inherit;font-size:.9rem;padding:5px 12px;border-radius:999px;border:1px solid var(--line);
background:var(--card);color:var(--fg);cursor:pointer}
.filters button span{color:var(--muted);margin-left:4px;font-variant-numeric:tabular-nums}
.filters button[aria-pressed=true]{background:var(--accent);border-color:var(--accent);color:#fff}
.filters button[aria-pressed=true] span{color:#fff;opacity:.85}
.filters .showing{color:var(--muted);font-size:.85rem;margin-left:6px}
.grid{display:flex;flex-direction:column;gap:12px}
.query{display:flex;gap:18px;background:var(--card);border:1px solid var(--line);border-radius:10px;padding:14px}
.query[hidden]{display:none}
.qhead{flex:0 0 auto;width:168px;display:flex;flex-direction:column;gap:3px}
.qnum{color:var(--muted);font-size:.8rem;text-transform:uppercase;letter-spacing:.04em}
img,.ph{border-radius:6px;object-fit:cover;display:block;background:var(--ph)}
.ph{display:flex;align-items:center;justify-content:center;text-align:center;color:var(--muted);
font-size:.75rem;padding:6px;overflow:hidden;word-break:break-all}
.pid{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.82rem;
overflow:hidden;text-overflow:ellipsis;white-space:nowrap;margin-top:4px}
.ind{font-size:.82rem;overflow:hidden;text-overflow:ellipsis;white-space:nowrap}
.ind.none{color:var(--muted);font-style:italic}
.status{font-size:.82rem;font-weight:600}
.status.ok{color:var(--ok)}.status.bad{color:var(--bad)}.status.warn{color:var(--warn)}.status.unk{color:var(--muted)}
.badge{align-self:flex-start;margin-top:4px;background:#fef3c7;color:#92400e;border:1px solid #fcd34d;
border-radius:999px;padding:1px 9px;font-size:.78rem;font-weight:600}
.neighbours{list-style:none;margin:0;padding:0;display:flex;flex-wrap:wrap;gap:10px;align-content:flex-start}
.nb{width:112px;padding:3px;border:3px solid var(--line);border-radius:9px;position:relative}
.nb.correct{border-color:var(--ok)}
.nb.incorrect{border-color:var(--bad);opacity:.88}
.nb.unknown{border-color:var(--line);border-style:dashed}
.nb .rank{position:absolute;top:6px;left:6px;background:rgba(0,0,0,.62);color:#fff;font-size:.72rem;
font-weight:700;border-radius:5px;padding:0 6px;z-index:1}
.nb .sim{font-size:.8rem;font-weight:600;font-variant-numeric:tabular-nums;margin-top:3px}
.nb .ind{color:var(--muted)}
footer{padding:18px 32px 36px;color:var(--muted);font-size:.85rem;border-top:1px solid var(--line)}
footer .notes{margin:0 0 8px;padding-left:18px}
footer .gen{margin:0}
@media (max-width:700px){.query{flex-direction:column}main,header.top,footer{padding-left:14px;padding-right:14px}}
"#;

/// Inline script: the query filter buttons. The page is complete without it (all queries
/// show); it only hides rows.
const SCRIPT: &str = r#"
(function(){
var buttons=document.querySelectorAll('.filters button');
var rows=document.querySelectorAll('article.query');
var showing=document.querySelector('.filters .showing');
function keep(row,f){
if(f==='miss')return row.dataset.hit==='miss';
if(f==='nomatch')return row.dataset.match==='no';
if(f==='new')return row.dataset.new==='yes';
return true;}
function apply(f){
var n=0;
rows.forEach(function(r){var k=keep(r,f);r.hidden=!k;if(k)n++;});
buttons.forEach(function(b){b.setAttribute('aria-pressed',b.dataset.filter===f?'true':'false');});
if(showing)showing.textContent='showing '+n+' of '+rows.length;}
buttons.forEach(function(b){b.addEventListener('click',function(){apply(b.dataset.filter);});});
})();
"#;

#[cfg(test)]
mod tests {
    use super::charts::*;
    use super::*;

    fn photo(id: &str, ind: Option<&str>, image: ImageRef) -> Photo {
        Photo {
            photo_id: id.to_string(),
            individual_id: ind.map(str::to_string),
            image,
        }
    }

    fn nb(id: &str, ind: Option<&str>, sim: f64, correct: Option<bool>) -> Neighbour {
        Neighbour {
            photo: photo(id, ind, ImageRef::Missing),
            similarity: sim,
            correct,
        }
    }

    fn empty_data() -> ReportData {
        ReportData {
            title: "empty run".into(),
            generated_at: "2026-11-28T10:00:00Z".into(),
            model_id: "m0".into(),
            metrics: vec![],
            curves: vec![],
            queries: vec![],
            notes: vec![],
        }
    }

    fn sample() -> ReportData {
        ReportData {
            title: "ingest-to-submission — run <1>".into(),
            generated_at: "2026-11-28T10:00:00Z".into(),
            model_id: "effnet-b0 & arcface".into(),
            metrics: vec![MetricRow {
                queries: "val".into(),
                gallery: "train+val".into(),
                n_queries: 120,
                precision_at_1: 0.61,
                map_at_20: 0.7,
                recall_at_20: f64::NAN,
            }],
            curves: vec![
                Curve {
                    name: "loss".into(),
                    points: vec![(1.0, 3.0), (2.0, f64::NAN), (3.0, 2.0), (4.0, 1.5)],
                },
                Curve {
                    name: "lr".into(),
                    points: vec![(1.0, 3e-4), (2.0, 3e-4)],
                },
                Curve {
                    name: "single".into(),
                    points: vec![(5.0, 0.5)],
                },
                Curve {
                    name: "empty".into(),
                    points: vec![],
                },
            ],
            queries: vec![
                QueryRow {
                    photo: photo(
                        "<b>&\"x\"",
                        Some("w_<1>"),
                        ImageRef::Embedded {
                            mime: "image/png".into(),
                            bytes: vec![0x89, b'P', b'N', b'G'],
                        },
                    ),
                    neighbours: vec![
                        nb("n1", Some("w_2"), 0.91, Some(false)),
                        nb("n2", None, 0.8, None),
                        nb("n3", Some("w_<1>"), 0.756, Some(true)),
                    ],
                    new_individual: Some(true),
                },
                QueryRow {
                    photo: photo("q2", None, ImageRef::Link("thumbs/q2.jpg?a=1&b=2".into())),
                    neighbours: vec![nb("m1", Some("w_9"), 0.5, Some(true))],
                    new_individual: None,
                },
                QueryRow {
                    photo: photo("q3", Some("w_3"), ImageRef::Missing),
                    neighbours: vec![
                        nb("k1", Some("w_1"), 0.4, Some(false)),
                        nb("k2", Some("w_2"), 0.3, Some(false)),
                    ],
                    new_individual: Some(false),
                },
            ],
            notes: vec!["regenerate: pipeline report --run <id>".into()],
        }
    }

    /// A small strictness check: every non-void element is closed in order, every `<`
    /// starts a tag, every attribute value is quoted, every `&` starts an entity, and
    /// `<script>`/`<style>` contents are skipped. Returns the first problem found.
    fn check_balance(html: &str) -> Result<(), String> {
        const VOID: &[&str] = &["img", "br", "meta", "hr", "input", "link"];
        let b = html.as_bytes();
        let mut stack: Vec<String> = Vec::new();
        let mut i = 0;
        let check_amp = |text: &str, at: usize| -> Result<(), String> {
            let mut rest = text;
            while let Some(p) = rest.find('&') {
                let after = &rest[p + 1..];
                let end = after.find(';').ok_or(format!("bare & near {at}"))?;
                let ent = &after[..end];
                let ok = (!ent.is_empty() && ent.bytes().all(|c| c.is_ascii_alphanumeric()))
                    || (ent.starts_with('#')
                        && ent.len() > 1
                        && ent[1..].bytes().all(|c| c.is_ascii_digit()));
                if !ok {
                    return Err(format!("bad entity &{ent}; near {at}"));
                }
                rest = &after[end + 1..];
            }
            Ok(())
        };
        while i < b.len() {
            let Some(off) = html[i..].find('<') else {
                check_amp(&html[i..], i)?;
                break;
            };
            check_amp(&html[i..i + off], i)?;
            i += off;
            if html[i..].starts_with("<!--") {
                let end = html[i..].find("-->").ok_or("unclosed comment")?;
                i += end + 3;
                continue;
            }
            if html[i..].starts_with("<!") {
                let end = html[i..].find('>').ok_or("unclosed doctype")?;
                i += end + 1;
                continue;
            }
            let end = html[i..].find('>').ok_or(format!("unclosed tag at {i}"))?;
            let tag = &html[i + 1..i + end];
            i += end + 1;
            if let Some(name) = tag.strip_prefix('/') {
                let name = name.trim().to_ascii_lowercase();
                match stack.pop() {
                    Some(open) if open == name => {}
                    other => return Err(format!("</{name}> closes {other:?} at {i}")),
                }
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let name_end = tag.find(|c: char| c.is_whitespace()).unwrap_or(tag.len());
            let name = tag[..name_end].to_ascii_lowercase();
            if name.is_empty() || !name.bytes().all(|c| c.is_ascii_alphanumeric()) {
                return Err(format!("bad tag name {name:?} at {i}"));
            }
            // Attributes: name or name="value".
            let mut attrs = tag[name_end..].trim_start();
            while !attrs.is_empty() {
                let n_end = attrs
                    .find(|c: char| c == '=' || c.is_whitespace())
                    .unwrap_or(attrs.len());
                if n_end == 0 {
                    return Err(format!("bad attribute in <{name}> at {i}"));
                }
                attrs = &attrs[n_end..];
                if let Some(v) = attrs.strip_prefix('=') {
                    let v = v
                        .strip_prefix('"')
                        .ok_or(format!("unquoted attribute in <{name}> at {i}"))?;
                    let close = v.find('"').ok_or("unterminated attribute")?;
                    if v[..close].contains('<') {
                        return Err(format!("raw < in attribute of <{name}> at {i}"));
                    }
                    check_amp(&v[..close], i)?;
                    attrs = &v[close + 1..];
                }
                attrs = attrs.trim_start();
            }
            if name == "script" || name == "style" {
                let close = format!("</{name}>");
                let end = html[i..].find(&close).ok_or(format!("unclosed <{name}>"))?;
                i += end + close.len();
                continue;
            }
            if !VOID.contains(&name.as_str()) && !self_closing {
                stack.push(name);
            }
        }
        if stack.is_empty() {
            Ok(())
        } else {
            Err(format!("unclosed: {stack:?}"))
        }
    }

    #[test]
    fn checker_catches_problems() {
        assert!(check_balance("<div><p>x</p></div>").is_ok());
        assert!(check_balance("<div><p>x</div>").is_err());
        assert!(check_balance("<div>").is_err());
        assert!(check_balance("<img src=x>").is_err());
        assert!(check_balance("<p>a & b</p>").is_err());
        assert!(check_balance("<p>a < b</p>").is_err());
        assert!(check_balance("<script>if(a<b){}</script><br>").is_ok());
    }

    #[test]
    fn sample_is_balanced() {
        let html = render(&sample());
        check_balance(&html).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.trim_end().ends_with("</html>"));
    }

    #[test]
    fn empty_inputs_render_valid_page() {
        let html = render(&empty_data());
        check_balance(&html).unwrap();
        assert!(html.contains("No evaluation metrics"));
        assert!(html.contains("No training curves"));
        assert!(html.contains("No queries"));
        assert!(!html.contains("<svg"));
        assert!(!html.contains("<img"));
        // Summary with nothing to count.
        assert!(html.contains(">0</div><div class=\"label\">queries shown"));
        assert!(html.contains(">—</div><div class=\"label\">P@1 among shown"));
        // Empty strings everywhere are fine too.
        let blank = ReportData {
            title: String::new(),
            generated_at: String::new(),
            model_id: String::new(),
            ..empty_data()
        };
        check_balance(&render(&blank)).unwrap();
    }

    #[test]
    fn escaping() {
        assert_eq!(
            html_escape("<b>&\"x\"'"),
            "&lt;b&gt;&amp;&quot;x&quot;&#39;"
        );
        let html = render(&sample());
        assert!(!html.contains("<b>&\"x\""));
        assert!(!html.contains("<b>"));
        assert!(html.contains("&lt;b&gt;&amp;&quot;x&quot;"));
        // alt text carries the escaped id.
        assert!(html.contains("alt=\"&lt;b&gt;&amp;&quot;x&quot;\""));
        assert!(!html.contains("w_<1>"));
        assert!(html.contains("w_&lt;1&gt;"));
        assert!(html.contains("run &lt;1&gt;"));
        assert!(html.contains("effnet-b0 &amp; arcface"));
        // Links are escaped, not percent-mangled.
        assert!(html.contains("src=\"thumbs/q2.jpg?a=1&amp;b=2\""));
    }

    #[test]
    fn base64_vectors() {
        // RFC 4648 §10 test vectors.
        for (input, want) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64_encode(input.as_bytes()), want);
        }
        assert_eq!(base64_encode(&[0xff, 0xd8, 0xff, 0xe0]), "/9j/4A==");
        assert_eq!(base64_encode(&[0xfb, 0xff]), "+/8=");
    }

    #[test]
    fn data_uri_embedding() {
        let html = render(&sample());
        // 0x89 'P' 'N' 'G' -> "iVBORw==".
        assert!(html.contains("src=\"data:image/png;base64,iVBORw==\""));
        let mut d = empty_data();
        d.queries.push(QueryRow {
            photo: photo(
                "j",
                None,
                ImageRef::Embedded {
                    mime: "image/jpeg\" onerror=\"x".into(),
                    bytes: vec![0xff, 0xd8, 0xff, 0xe0],
                },
            ),
            neighbours: vec![],
            new_individual: None,
        });
        let html = render(&d);
        check_balance(&html).unwrap();
        assert!(html.contains("src=\"data:application/octet-stream;base64,/9j/4A==\""));
        assert!(!html.contains("onerror"));
    }

    #[test]
    fn images_have_alt_size_and_lazy() {
        let html = render(&sample());
        let imgs: Vec<&str> = html.split("<img ").skip(1).collect();
        assert_eq!(imgs.len(), 2);
        for img in imgs {
            let tag = &img[..img.find('>').unwrap_or(img.len())];
            assert!(tag.contains("alt=\""), "{tag}");
            assert!(tag.contains("width=\"168\"") || tag.contains("width=\"104\""));
            assert!(tag.contains("height=\""));
            assert!(tag.contains("loading=\"lazy\""));
        }
        // Missing images become placeholders with the photo id.
        assert!(html.contains("class=\"nimg ph\""));
        assert!(html.contains("<span>n1</span>"));
        assert!(html.contains("class=\"qimg ph\""));
        assert!(html.contains("<span>q3</span>"));
    }

    #[test]
    fn unsafe_links_are_not_emitted() {
        let mut d = empty_data();
        d.queries.push(QueryRow {
            photo: photo("x", None, ImageRef::Link(" JavaScript:alert(1)".into())),
            neighbours: vec![],
            new_individual: None,
        });
        let html = render(&d);
        assert!(!html.to_ascii_lowercase().contains("javascript:"));
        assert!(html.contains("class=\"qimg ph\""));
    }

    fn polylines(html: &str) -> Vec<usize> {
        html.split("<polyline class=\"series\" points=\"")
            .skip(1)
            .map(|s| {
                let pts = &s[..s.find('"').unwrap_or(0)];
                pts.split_whitespace().count()
            })
            .collect()
    }

    #[test]
    fn svg_curves() {
        let html = render(&sample());
        // loss: 4 points, 1 NaN -> 3; lr: 2 (constant); single: 1; empty: no polyline.
        assert_eq!(polylines(&html), vec![3, 2, 1]);
        assert_eq!(html.matches("<svg ").count(), 4);
        assert!(html.contains("1 non-finite point skipped"));
        assert!(html.contains(">no data</text>"));
        assert!(!html.contains("NaN"));
        assert!(!html.contains("inf"));
        // Axis labels and ticks.
        assert!(html.contains(">epoch</text>"));
        assert!(html.contains("rotate(-90)\" text-anchor=\"middle\">loss</text>"));
        // Learning-rate ticks are in scientific notation.
        assert!(html.contains("e-4</text>"));
        // Every polyline coordinate is a finite number inside the viewBox.
        for s in html.split("points=\"").skip(1) {
            for p in s[..s.find('"').unwrap_or(0)].split_whitespace() {
                let (x, y) = p.split_once(',').unwrap_or(("", ""));
                let (x, y): (f64, f64) = (x.parse().unwrap_or(-1.0), y.parse().unwrap_or(-1.0));
                assert!((0.0..=CW).contains(&x) && (0.0..=CH).contains(&y), "{p}");
            }
        }
        // All-NaN curve renders as "no data".
        let mut d = empty_data();
        d.curves.push(Curve {
            name: "nan".into(),
            points: vec![(1.0, f64::NAN), (f64::INFINITY, 1.0)],
        });
        let html = render(&d);
        check_balance(&html).unwrap();
        assert!(polylines(&html).is_empty());
        assert!(html.contains("2 non-finite points skipped"));
    }

    #[test]
    fn ticks_are_nice() {
        let (t, step) = nice_ticks(0.0, 1.0, 5, false);
        assert_eq!(step, 0.2);
        assert_eq!(t.len(), 6);
        assert_eq!(fmt_tick(t[1], step), "0.2");
        let (t, step) = nice_ticks(1.0, 3.0, 6, true);
        assert_eq!(step, 1.0);
        assert_eq!(t, vec![1.0, 2.0, 3.0]);
        let (lo, hi) = pad_range(2.0, 2.0);
        assert!(lo < 2.0 && hi > 2.0);
        let (lo, hi) = pad_range(0.0, 0.0);
        assert_eq!((lo, hi), (-1.0, 1.0));
    }

    #[test]
    fn correct_and_incorrect_classes() {
        let html = render(&sample());
        assert!(html.contains("class=\"nb correct\""));
        assert!(html.contains("class=\"nb incorrect\""));
        assert!(html.contains("class=\"nb unknown\""));
        assert!(html.contains("first match at rank 3"));
        assert!(html.contains("first match at rank 1"));
        assert!(html.contains("no match in top 2"));
        assert!(html.contains("rank 1 wrong"));
        assert!(html.contains("rank 1 correct"));
        assert!(html.contains("<div class=\"badge\">new individual?</div>"));
        assert_eq!(html.matches("class=\"badge\"").count(), 1);
        assert!(html.contains("data-hit=\"miss\""));
        assert!(html.contains("data-hit=\"hit\""));
        // Similarity with 2 decimals, rank numbers.
        assert!(html.contains(">0.76</div>"));
        assert!(html.contains("<div class=\"rank\">3</div>"));
    }

    #[test]
    fn summary_counts() {
        let html = render(&sample());
        assert!(html.contains(">3</div><div class=\"label\">queries shown"));
        // Rank-1 known for all 3 queries, 1 hit.
        assert!(html.contains(">0.333</div><div class=\"label\">P@1 among shown"));
        assert!(html.contains("1 of 3 with a known rank-1 label"));
        assert!(html.contains(">2</div><div class=\"label\">matched in top k"));
    }

    #[test]
    fn first_match_cases() {
        assert_eq!(first_match(&[]), FirstMatch::Unknown);
        assert_eq!(
            first_match(&[nb("a", None, 0.1, None), nb("b", None, 0.1, Some(true))]),
            FirstMatch::At(2)
        );
        assert_eq!(
            first_match(&[nb("a", None, 0.1, Some(false)), nb("b", None, 0.1, None)]),
            FirstMatch::NoKnownMatch
        );
        assert_eq!(
            first_match(&[nb("a", None, 0.1, Some(false))]),
            FirstMatch::NoMatch
        );
    }
}
