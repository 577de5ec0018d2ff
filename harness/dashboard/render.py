"""Dashboard output: SVG trend and bar plots, the self-contained HTML page, and the plain-text latest table."""

from __future__ import annotations

import html
import math
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Mapping, Sequence

from harness.dashboard.load import Problem, Run, finite
from harness.dashboard.stats import (
    SPEEDUP_BASE_OP,
    SPEEDUP_SKIP_FAMILIES,
    RegressionCheck,
    Series,
    analyse,
    build_series,
    device_of,
    speed_tables,
    speed_targets,
    speedups,
    time_to_find,
    validate_rule,
)

__all__ = ["render_html", "render_page", "latest_table"]


# --------------------------------------------------------------------------- SVG
_BLUE, _BAND, _RED, _GREY, _GREEN = "#1f77b4", "#aec7e8", "#d62728", "#7f7f7f", "#2ca02c"
_ORANGE, _PURPLE = "#ff7f0e", "#9467bd"


def _op_colour(op: str) -> str:
    if op == "fp8_linear":
        return _GREEN
    if op.startswith("legacy."):
        return _ORANGE
    if op.startswith("fp8_linear."):
        return _PURPLE
    return _GREY


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def _nice_ticks(lo: float, hi: float, n: int = 4) -> list[float]:
    if hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    ticks = []
    t = first
    while t <= hi + 1e-12 * abs(hi):
        ticks.append(t)
        t += step
    return ticks


def _trend_svg(s: Series, runs: Sequence[Run], checks: Sequence[RegressionCheck | None], threshold: float) -> str:
    """Median line with a min/max band over the runs; flagged points in red; the latest limit dashed."""
    W, H, L, R, T, B = 520, 210, 64, 14, 16, 40
    pw, ph = W - L - R, H - T - B
    pts = s.points
    ys = [p.min for p in pts] + [p.max for p in pts]
    last = checks[-1] if checks else None
    if last is not None:
        ys.append(last.limit)
    lo, hi = min(ys), max(ys)
    pad = (hi - lo) * 0.08 or max(abs(hi) * 0.05, 1e-9)
    lo, hi = max(0.0, lo - pad), hi + pad
    n = len(pts)

    def X(i: int) -> float:
        return L + (pw / 2 if n == 1 else pw * i / (n - 1))

    def Y(v: float) -> float:
        return T + ph * (1 - (v - lo) / (hi - lo))

    parts = [
        f'<svg class="plot trend" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" data-points="{n}" role="img" aria-label="trend of {html.escape(s.name)}">',
        f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="#ffffff" stroke="#cccccc"/>',
    ]
    for t in _nice_ticks(lo, hi):
        parts.append(f'<line x1="{L}" x2="{L + pw}" y1="{Y(t):.1f}" y2="{Y(t):.1f}" stroke="#eeeeee"/>')
        parts.append(f'<text x="{L - 6}" y="{Y(t) + 4:.1f}" text-anchor="end" class="tick">{_fmt(t)}</text>')
    parts.append(
        f'<text x="14" y="{T + ph / 2:.0f}" transform="rotate(-90 14 {T + ph / 2:.0f})" '
        'text-anchor="middle" class="axis">ms</text>'
    )
    first_lbl = runs[pts[0].run].label
    last_lbl = runs[pts[-1].run].label
    parts.append(f'<text x="{L}" y="{H - 22}" class="tick">{html.escape(first_lbl)}</text>')
    if n > 1:
        parts.append(f'<text x="{L + pw}" y="{H - 22}" text-anchor="end" class="tick">{html.escape(last_lbl)}</text>')
    parts.append(f'<text x="{L + pw / 2:.0f}" y="{H - 6}" text-anchor="middle" class="axis">run ({n})</text>')
    parts.append('<g class="data">')
    band = [f"{X(i):.1f},{Y(p.max):.1f}" for i, p in enumerate(pts)]
    band += [f"{X(i):.1f},{Y(p.min):.1f}" for i, p in reversed(list(enumerate(pts)))]
    if n == 1:  # a single run: a short vertical bar for its range
        x = X(0)
        band = [
            f"{x - 4:.1f},{Y(pts[0].max):.1f}",
            f"{x + 4:.1f},{Y(pts[0].max):.1f}",
            f"{x + 4:.1f},{Y(pts[0].min):.1f}",
            f"{x - 4:.1f},{Y(pts[0].min):.1f}",
        ]
    parts.append(
        f'<polygon class="band" points="{" ".join(band)}" fill="{_BAND}" stroke="{_BAND}" stroke-width="1.5"/>'
    )
    line = " ".join(f"{X(i):.1f},{Y(p.median):.1f}" for i, p in enumerate(pts))
    parts.append(f'<polyline class="median" points="{line}" fill="none" stroke="{_BLUE}" stroke-width="2"/>')
    if last is not None:
        y = Y(last.limit)
        parts.append(
            f'<line class="limit" x1="{L}" x2="{L + pw}" y1="{y:.1f}" y2="{y:.1f}" stroke="{_RED}" '
            f'stroke-dasharray="5,4" stroke-width="1"><title>regression limit of the latest run: '
            f"{_fmt(last.limit)} ms = median of previous {last.window_used} runs x (1 + {threshold:g})</title></line>"
        )
    for i, (p, c) in enumerate(zip(pts, checks)):
        bad = c is not None and c.regressed
        tip = f"{runs[p.run].label}: median {_fmt(p.median)} ms (min {_fmt(p.min)}, max {_fmt(p.max)}; {p.source})"
        if c is not None:
            tip += f"; baseline {_fmt(c.baseline)} ms, {c.change:+.1%}" + (" REGRESSION" if bad else "")
        parts.append(
            f'<circle class="{"pt regressed" if bad else "pt"}" cx="{X(i):.1f}" cy="{Y(p.median):.1f}" '
            f'r="{5 if bad else 3}" fill="{_RED if bad else _BLUE}"><title>{html.escape(tip)}</title></circle>'
        )
    parts.append("</g></svg>")
    return "".join(parts)


def _bar_svg(
    rows: Sequence[tuple[str, float, str]], *, unit: str, target: float | None = None, target_label: str = "", css: str
) -> str:
    """Horizontal bars (label, value, colour); an optional dashed target line."""
    # the label column is as wide as the longest label (11 px sans-serif: ~6.5 px per character)
    L = int(min(640, max(120, 6.5 * max((len(label) for label, _, _ in rows), default=10) + 14)))
    W, row_h, R, T, B = L + 460, 20, 70, 10, 28
    H = T + B + row_h * len(rows)
    vmax = max([v for _, v, _ in rows if math.isfinite(v)] + [target or 0, 1e-12]) * 1.1
    pw = W - L - R

    def X(v: float) -> float:
        return L + pw * max(0.0, min(v, vmax)) / vmax

    parts = [
        f'<svg class="plot bars {css}" xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
        f'viewBox="0 0 {W} {H}" data-points="{len(rows)}" role="img">',
        f'<rect x="{L}" y="{T}" width="{pw}" height="{row_h * len(rows)}" fill="#ffffff" stroke="#cccccc"/>',
    ]
    for t in _nice_ticks(0.0, vmax):
        parts.append(f'<line x1="{X(t):.1f}" x2="{X(t):.1f}" y1="{T}" y2="{H - B}" stroke="#eeeeee"/>')
        parts.append(f'<text x="{X(t):.1f}" y="{H - B + 14}" text-anchor="middle" class="tick">{_fmt(t)}</text>')
    parts.append(f'<text x="{L + pw / 2:.0f}" y="{H - 4}" text-anchor="middle" class="axis">{html.escape(unit)}</text>')
    parts.append('<g class="data">')
    for i, (label, v, colour) in enumerate(rows):
        y = T + i * row_h + 3
        w = X(v) - L if math.isfinite(v) else 0
        parts.append(f'<text x="{L - 6}" y="{y + 12}" text-anchor="end" class="lbl">{html.escape(label)}</text>')
        parts.append(
            f'<rect class="bar" x="{L}" y="{y}" width="{max(w, 1):.1f}" height="{row_h - 6}" fill="{colour}">'
            f"<title>{html.escape(label)}: {_fmt(v)} {html.escape(unit)}</title></rect>"
        )
        parts.append(f'<text x="{L + max(w, 1) + 4:.1f}" y="{y + 12}" class="val">{_fmt(v)}</text>')
    parts.append("</g>")
    if target is not None:
        parts.append(
            f'<line class="target" x1="{X(target):.1f}" x2="{X(target):.1f}" y1="{T}" y2="{H - B}" '
            f'stroke="{_RED}" stroke-dasharray="5,4"><title>{html.escape(target_label)}</title></line>'
        )
    parts.append("</svg>")
    return "".join(parts)


# --------------------------------------------------------------------------- page
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:32px;border-bottom:1px solid #ddd}h3{font-size:14px;margin:4px 0}
h4{font-size:13px;margin:12px 0 4px;color:#555}
table{border-collapse:collapse;font-size:12px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 6px;text-align:left}
th{background:#f0f0f0}td.num{text-align:right;font-variant-numeric:tabular-nums}
.bad{color:#d62728;font-weight:bold}.ok{color:#2ca02c}.note{color:#666;font-size:12px}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{background:#fff;border:1px solid #ddd;padding:8px;width:524px}
.card.regressed{border-color:#d62728}
svg .tick{font-size:10px;fill:#555}svg .axis{font-size:11px;fill:#333}svg .lbl,svg .val{font-size:11px;fill:#333}
code{font-size:12px}.problems li{font-size:12px}
"""

# Records each plot's rendered size and the bounding box of its drawn data, so a headless browser's
# --dump-dom can show that every plot was laid out and painted (tests/property/test_dashboard_browser.py).
_SCRIPT = """
window.addEventListener('load',function(){
  var plots=document.querySelectorAll('svg.plot');
  plots.forEach(function(svg){
    var r=svg.getBoundingClientRect(),g=svg.querySelector('g.data'),b=g?g.getBBox():{x:0,y:0,width:0,height:0};
    svg.setAttribute('data-rect',[r.left+window.scrollX,r.top+window.scrollY,r.width,r.height].map(Math.round).join(','));
    svg.setAttribute('data-bbox',[b.x,b.y,b.width,b.height].map(function(v){return v.toFixed(1);}).join(','));
  });
  document.body.setAttribute('data-plots-rendered',String(plots.length));
  document.body.setAttribute('data-page-height',String(document.documentElement.scrollHeight));
});
"""


def _esc(x: Any) -> str:
    return html.escape(str(x))


def _matrix_html(summary: dict[str, Any] | None, note: str) -> str:
    """The latest matrix summary: where and when it ran, verdict totals, cell statuses, non-passing cells."""
    if summary is None:
        return f'<p class="note" id="matrix-none">{_esc(note)}</p>'
    from harness.report import _nonpass_cells, _nonpass_counts, device_text, run_state_text, speed_text  # noqa: PLC0415

    dev = summary.get("device", {})
    report = Path(note).parent / "report.html"
    link = f' (<a href="{_esc(report.resolve().as_uri())}">full report</a>)' if report.is_file() else ""
    out = [f'<p class="note" id="matrix">from <code>{_esc(note)}</code>{link}</p><table>']
    rows = [
        ("device", device_text(summary)),
        (
            "capability / torch / CUDA",
            f"{dev.get('capability') or '–'} / {dev.get('torch') or '–'} / {dev.get('cuda') or '–'}",
        ),
        ("started", summary.get("started_at", "–")),
        (
            "duration",
            f"{summary['duration_s']:.0f} s" + (" (time budget exhausted)" if summary.get("budget_exhausted") else ""),
        ),
        ("command", summary.get("command", "–")),
    ]
    if pace := speed_text(summary):
        rows.insert(4, ("speed", pace))
    state = run_state_text(summary)
    if state:  # an interrupted or still running matrix says so first
        rows.insert(0, ("run", state))
    out += [f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows]
    out.append("</table>")
    totals = sorted(summary["totals"].items(), key=lambda kv: (kv[0] != "pass", -kv[1]))
    statuses: dict[str, int] = {}
    for c in summary["cells"]:
        statuses[c["status"]] = statuses.get(c["status"], 0) + 1
    out.append(
        '<table class="matrix-totals"><tr><th>cases by verdict</th>'
        + "".join(f"<td>{_esc(v)} <b>{n}</b></td>" for v, n in totals)
        + "</tr><tr><th>cells by status</th>"
        + "".join(f"<td>{_esc(st)} <b>{n}</b></td>" for st, n in sorted(statuses.items()))
        + "</tr></table>"
    )
    bad = _nonpass_cells(summary)
    if bad:
        out.append(
            '<table class="matrix-cells"><tr><th>op</th><th>layout class</th><th>status</th>'
            "<th>non-pass verdicts</th><th>new</th><th>worst error / allowed</th></tr>"
        )
        for c in bad[:100]:
            nonpass = ", ".join(f"{v} {n}" for v, n in _nonpass_counts(c))
            worst = c.get("worst") or {}
            ratio = worst.get("ratio")
            out.append(
                f'<tr class="{"bad" if c["status"] == "fail" else ""}"><td>{_esc(c["op"])}</td>'
                f"<td>{_esc(c['layout_class'])}</td><td>{_esc(c['status'])}</td><td>{_esc(nonpass)}</td>"
                f"<td>{_esc(', '.join(c.get('new', [])) or '–')}</td>"
                f"<td class=num>{_fmt(ratio) if finite(ratio) else '–'}</td></tr>"
            )
        out.append(
            "</table>" + (f'<p class="note">{len(bad) - 100} more non-passing cells</p>' if len(bad) > 100 else "")
        )
    else:
        out.append('<p class="ok">every cell that ran passed</p>')
    unavailable = summary.get("unavailable", [])
    if unavailable:
        out.append(
            "<p class=note>unavailable here: "
            + "; ".join(f"{_esc(u.get('op'))} ({_esc(u.get('reason'))})" for u in unavailable if isinstance(u, dict))
            + "</p>"
        )
    new = summary.get("new_failures", [])
    out.append(f'<p class="{"bad" if new else "note"}">{len(new)} new failure(s) not in the regression corpus</p>')
    return "".join(out)


def _speed_table_html(run: Run, device: str) -> str:
    """Issue 14's per-shape table of one run: fp8_linear (dynamic / static scale) vs bf16 and the bare floors."""
    rows = [r for r in speed_tables(run) if r["device"] == device]
    if not rows:
        return ""
    first = rows[0]
    o = [
        "<h3>FP8 linear on every Wan projection (latest run, interleaved medians)</h3>",
        f'<p class="note">target: >= {first["min_speedup_vs_bf16"]:g}x bf16 with a dynamic and with a static scale, '
        f"within {first['max_overhead_vs_bare']:.0%} of the matching bare cast + _scaled_mm (the dynamic floor "
        "computes amax / 448 first); graph: the same calls replayed from CUDA graphs, against bf16 replayed the "
        'same way (512-token shapes)</p><table class="speed-table"><tr><th>shape</th><th>dynamic / bf16</th>'
        "<th>static / bf16</th><th>dynamic vs bare</th><th>static vs bare</th><th>graph dynamic / bf16</th>"
        "<th>graph static / bf16</th><th>verdict</th></tr>",
    ]
    for r in rows:
        gd, gs = r.get("graph_dynamic_speedup_vs_bf16_graph"), r.get("graph_static_speedup_vs_bf16_graph")
        o.append(
            f'<tr class="{"" if r["met"] else "bad"}"><td>{_esc(r["shape_key"])}</td>'
            f"<td class=num>{_fmt(r['dynamic_speedup_vs_bf16'])}x</td><td class=num>{_fmt(r['static_speedup_vs_bf16'])}x</td>"
            f"<td class=num>{r['dynamic_overhead_vs_bare']:+.1%}</td><td class=num>{r['static_overhead_vs_bare']:+.1%}</td>"
            f"<td class=num>{_fmt(gd) + 'x' if gd is not None else '–'}</td>"
            f"<td class=num>{_fmt(gs) + 'x' if gs is not None else '–'}</td>"
            f"<td>{'met' if r['met'] else 'MISSED'}</td></tr>"
        )
    o.append("</table>")
    return "".join(o)


def _time_to_find_html(runs: Sequence[Run], device: str) -> str:
    """The time-to-find table and chart of one device: per corpus entry, latest vs previous run."""
    rows = [r for r in time_to_find(runs) if r.device == device]
    if not rows:
        return ""
    o = [
        "<h3>Time to find: cases / seconds per corpus entry</h3>",
        '<p class="note">cases and seconds a cold, seed-0 exploration needed to first reproduce each entry of the '
        "regression corpus (tests/bench/test_bench_explore.py); the latest run that measured the entry against "
        "the one before it</p>",
        _bar_svg(
            [(r.fingerprint, float(r.latest.cases), _GREEN if r.latest.found else _RED) for r in rows],
            unit="cases to the first find (latest run; red: not found within the budget)",
            css="time-to-find",
        ),
        '<table class="time-to-find"><tr><th>corpus entry</th><th>cases</th><th>seconds</th><th>run</th>'
        "<th>previous cases</th><th>previous seconds</th><th>previous run</th><th>change in cases</th>"
        "<th>status</th></tr>",
    ]
    for r in rows:
        lt, pv, ch = r.latest, r.previous, r.cases_change
        status = "found" if lt.found else f"NOT FOUND within {lt.cases} cases"
        o.append(
            f'<tr class="{"" if lt.found else "bad"}"><td>{_esc(r.fingerprint)}</td>'
            f"<td class=num>{lt.cases}</td><td class=num>{_fmt(lt.seconds)}</td><td>{_esc(runs[lt.run].label)}</td>"
            f"<td class=num>{pv.cases if pv else '–'}{'' if pv is None or pv.found else ' (not found)'}</td>"
            f"<td class=num>{_fmt(pv.seconds) if pv else '–'}</td><td>{_esc(runs[pv.run].label) if pv else '–'}</td>"
            f"<td class=num>{f'{ch:+.0%}' if ch is not None else '–'}</td><td>{_esc(status)}</td></tr>"
        )
    o.append("</table>")
    return "".join(o)


def render_html(
    runs: Sequence[Run],
    problems: Sequence[Problem],
    *,
    storage: str,
    threshold: float,
    window: int,
    matrix: dict[str, Any] | None = None,
    matrix_note: str = "no matrix report",
) -> str:
    """The whole dashboard page as one self-contained HTML string."""
    validate_rule(threshold, window)
    series, checks = analyse(runs, threshold, window)
    return render_page(
        runs,
        problems,
        series,
        checks,
        storage=storage,
        threshold=threshold,
        window=window,
        matrix=matrix,
        matrix_note=matrix_note,
    )


def render_page(
    runs: Sequence[Run],
    problems: Sequence[Problem],
    series: Sequence[Series],
    checks: Mapping[Any, list],
    *,
    storage: str,
    threshold: float,
    window: int,
    matrix: dict[str, Any] | None,
    matrix_note: str,
) -> str:
    from harness.bench import SPEED_TARGET  # noqa: PLC0415 - torch only when rendering

    flagged = [(s, checks[s.key][-1]) for s in series if checks[s.key][-1] is not None and checks[s.key][-1].regressed]
    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    rule = (
        f"a benchmark is flagged when its median is more than {threshold:.0%} slower than the median of "
        f"its previous {window} run(s) on the same device"
    )
    o: list[str] = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        "<title>Wan FP8 / quantized attention benchmarks</title>",
        f"<style>{_CSS}</style></head><body>",
        "<h1>Wan FP8 / quantized attention benchmarks</h1>",
        f'<p class="note">generated {generated} from <code>{_esc(storage)}</code>: {len(runs)} run(s), '
        f"{len(series)} benchmark series. Times are CUDA-event medians (device_ms) where recorded, "
        "else pytest-benchmark's host-timer medians.</p>",
        f'<p id="rule">Regression rule: {_esc(rule)} (threshold <b id="threshold">{threshold:.0%}</b>, '
        f'window <b id="window">{window}</b>).</p>',
    ]
    if problems:
        o.append(f'<h2>Skipped or malformed files ({len(problems)})</h2><ul class="problems" id="problems">')
        o += [f"<li>{_esc(p)}</li>" for p in problems]
        o.append("</ul>")
    o.append("<h2>Regressions in the latest run</h2>")
    if flagged:
        o.append(
            '<table id="regressions"><tr><th>benchmark</th><th>device</th><th>median ms</th>'
            "<th>baseline ms</th><th>change</th><th>limit ms</th></tr>"
        )
        for s, c in flagged:
            o.append(
                f'<tr class="bad"><td>{_esc(s.name)}</td><td>{_esc(s.device)}</td><td class=num>{_fmt(c.median)}</td>'
                f"<td class=num>{_fmt(c.baseline)}</td><td class=num>{c.change:+.1%}</td>"
                f"<td class=num>{_fmt(c.limit)}</td></tr>"
            )
        o.append("</table>")
    else:
        o.append(f'<p class="ok" id="no-regressions">No regressions (threshold {threshold:.0%}, window {window}).</p>')

    for device in dict.fromkeys(s.device for s in series):
        dev_series = [s for s in series if s.device == device]
        last_run = max(p.run for s in dev_series for p in s.points)
        o.append(f"<h2>{_esc(device)}</h2>")
        latest_entry = next((e for e in runs[last_run].benchmarks if device_of(e) == device), None)
        env = (latest_entry or {}).get("extra_info", {}).get("env")
        if isinstance(env, dict):
            o.append(
                '<p class="note">latest run '
                + _esc(runs[last_run].label)
                + ": "
                + ", ".join(f"{_esc(k)} {_esc(v)}" for k, v in env.items() if v is not None)
                + "</p>"
            )
        ceilings = (latest_entry or {}).get("extra_info", {}).get("ceilings")
        if isinstance(ceilings, dict) and ceilings:
            o.append(
                "<h3>Ceilings measured in the latest run</h3><table><tr><th>ceiling</th><th>value</th><th>how</th></tr>"
            )
            for c in ceilings.values():
                if isinstance(c, dict):
                    val = (
                        f"{_fmt(c.get('value'))} {_esc(c.get('unit', ''))}"
                        if finite(c.get("value"))
                        else _esc(c.get("reason", "–"))
                    )
                    o.append(
                        f"<tr><td>{_esc(c.get('name'))}</td><td class=num>{val}</td><td>{_esc(c.get('how', ''))}</td></tr>"
                    )
            o.append("</table>")

        o.append(
            "<h3>Latest results</h3><table><tr><th>benchmark</th><th>median ms</th><th>min–max ms</th>"
            "<th>throughput</th><th>ratio to ceiling</th><th>baseline ms</th><th>change</th><th>status</th></tr>"
        )
        for s in dev_series:
            p, c = s.points[-1], checks[s.key][-1]
            stale = p.run != last_run
            status = "REGRESSION" if c is not None and c.regressed else "ok" if c is not None else "first run"
            status += " (not in latest run)" if stale else ""
            cls = "bad" if c is not None and c.regressed else ""
            o.append(
                f'<tr class="{cls}"><td>{_esc(s.name)}</td><td class=num>{_fmt(p.median)}</td>'
                f"<td class=num>{_fmt(p.min)}–{_fmt(p.max)}</td>"
                f"<td class=num>{_fmt(p.throughput)} {_esc(p.unit or '')}</td>"
                f"<td class=num>{_fmt(p.ceiling_ratio)} {_esc(p.ceiling_name or '')}</td>"
                f"<td class=num>{_fmt(c.baseline) if c else '–'}</td><td class=num>{f'{c.change:+.1%}' if c else '–'}</td>"
                f"<td>{_esc(status)}</td></tr>"
            )
        o.append("</table>")

        rows = [r for r in speedups(dev_series, last_run)]
        o.append("<h3>FP8 over bf16 speed-up per shape (latest run)</h3>")
        if rows:
            bars = [(f"{r.shape_key} {r.op}", r.speedup, _op_colour(r.op)) for r in rows]
            o.append(
                _bar_svg(
                    bars,
                    unit=f"speed-up over {SPEEDUP_BASE_OP} (x)",
                    target=SPEED_TARGET.min_speedup_vs_bf16,
                    target_label=f"issue-4 target {SPEED_TARGET.min_speedup_vs_bf16}x (Wan-14B, 32760 tokens): "
                    + SPEED_TARGET.why,
                    css="speedup",
                )
            )
            o.append(
                f'<table class="speedups"><tr><th>shape</th><th>op</th><th>{SPEEDUP_BASE_OP} ms</th><th>op ms</th><th>speed-up</th></tr>'
            )
            o += [
                f"<tr><td>{_esc(r.shape_key)}</td><td>{_esc(r.op)}</td><td class=num>{_fmt(r.base_ms)}</td>"
                f"<td class=num>{_fmt(r.op_ms)}</td><td class=num>{_fmt(r.speedup)}x</td></tr>"
                for r in rows
            ]
            o.append("</table>")
        else:
            o.append('<p class="note">no shape has both a bf16 and an FP8 result in the latest run</p>')

        targets = [t for t in speed_targets(runs[last_run]) if t["device"] == device]
        if targets:
            o.append(
                "<h3>Issue-4 speed target (latest run, interleaved medians)</h3>"
                f'<p class="note">{_esc(targets[0].get("why", ""))}</p><table class="speed-target"><tr><th>shape</th>'
                "<th>fp8_linear / bf16 speed-up</th><th>target</th><th>overhead vs bare cast + _scaled_mm</th>"
                "<th>budget</th><th>verdict</th></tr>"
            )
            for t in targets:
                o.append(
                    f'<tr class="{"" if t["met"] else "bad"}"><td>{_esc(t["shape_key"])}</td>'
                    f"<td class=num>{_fmt(t['speedup_vs_bf16'])}x</td><td class=num>>= {t['min_speedup_vs_bf16']:g}x</td>"
                    f"<td class=num>{t['overhead_vs_bare']:+.1%}</td><td class=num><= {t['max_overhead_vs_bare']:.0%}</td>"
                    f"<td>{'met' if t['met'] else 'MISSED'}</td></tr>"
                )
            o.append("</table>")

        ratio_rows = [
            (s.name, s.points[-1].ceiling_ratio, _BLUE)
            for s in dev_series
            if s.points[-1].run == last_run and s.points[-1].ceiling_ratio is not None
        ]
        o.append("<h3>Ratio to ceiling (latest run)</h3>")
        if ratio_rows:
            o.append(
                _bar_svg(
                    ratio_rows,
                    unit="fraction of the ceiling measured in the same run",
                    target=1.0,
                    target_label="the ceiling",
                    css="ceiling",
                )
            )
        else:
            o.append('<p class="note">no result in the latest run records a ceiling ratio</p>')

        o.append(_speed_table_html(runs[last_run], device))
        o.append(_time_to_find_html(runs, device))

        o.append("<h3>Trends</h3>")
        for family in dict.fromkeys(s.family or "other" for s in dev_series):
            o.append(f'<h4>{_esc(family)}</h4><div class="grid">')
            for s in dev_series:
                if (s.family or "other") != family:
                    continue
                c = checks[s.key][-1]
                bad = c is not None and c.regressed
                o.append(
                    f'<div class="card{" regressed" if bad else ""}"><h3>{_esc(s.name)}'
                    f"{' <span class=bad>REGRESSION ' + format(c.change, '+.1%') + '</span>' if bad else ''}</h3>"
                )
                o.append(_trend_svg(s, runs, checks[s.key], threshold))
                o.append("</div>")
            o.append("</div>")

    o.append("<h2>Matrix report</h2>")
    o.append(_matrix_html(matrix, matrix_note))
    o.append(f"<script>{_SCRIPT}</script></body></html>")
    return "\n".join(o)


def latest_table(runs: Sequence[Run]) -> str:
    """A plain-text table of the latest run per device: benchmark, median, throughput, ceiling ratio, speed-up
    over bf16 on the same shape; then the speed-target verdicts of that run."""
    series = build_series(runs)
    lines = []
    for device in dict.fromkeys(s.device for s in series):
        dev = [s for s in series if s.device == device]
        last = max(p.run for s in dev for p in s.points)
        sp = {(r.shape_key, r.op): r.speedup for r in speedups(dev, last)}
        rows = [("benchmark", "median ms", "throughput", "ceiling", "vs bf16")]
        for s in dev:
            p = s.points[-1]
            if p.run != last:
                continue
            up = None if s.family in SPEEDUP_SKIP_FAMILIES else sp.get((s.shape_key, s.op))
            rows.append(
                (
                    s.name,
                    _fmt(p.median),
                    f"{_fmt(p.throughput)} {p.unit or ''}".strip(),
                    f"{_fmt(p.ceiling_ratio)} {p.ceiling_name or ''}".strip(),
                    f"{_fmt(up)}x" if up else "",
                )
            )
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines.append(f"== {device} ({runs[last].label})")
        for r in rows:
            lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
        for t in speed_targets(runs[last]):
            if t["device"] == device:
                lines.append(
                    f"speed target {t['shape_key']}: fp8_linear {_fmt(t['speedup_vs_bf16'])}x bf16 "
                    f"(>= {t['min_speedup_vs_bf16']:g}x), {t['overhead_vs_bare']:+.1%} vs bare cast + _scaled_mm "
                    f"(<= {t['max_overhead_vs_bare']:.0%}): {'met' if t['met'] else 'MISSED'}"
                )
        for t in speed_tables(runs[last]):
            if t["device"] == device:
                lines.append(
                    f"speed table {t['shape_key']}: dynamic {_fmt(t['dynamic_speedup_vs_bf16'])}x / static "
                    f"{_fmt(t['static_speedup_vs_bf16'])}x bf16 (>= {t['min_speedup_vs_bf16']:g}x), "
                    f"{t['dynamic_overhead_vs_bare']:+.1%} / {t['static_overhead_vs_bare']:+.1%} vs bare "
                    f"(<= {t['max_overhead_vs_bare']:.0%}): {'met' if t['met'] else 'MISSED'}"
                )
        for r in time_to_find(runs):
            if r.device == device:
                pv = r.previous
                lines.append(
                    f"time to find {r.fingerprint}: "
                    + (
                        f"{r.latest.cases} cases, {_fmt(r.latest.seconds)} s"
                        if r.latest.found
                        else f"NOT FOUND within {r.latest.cases} cases"
                    )
                    + (f" (previous: {pv.cases} cases, {_fmt(pv.seconds)} s)" if pv is not None and pv.found else "")
                )
    return "\n".join(lines)
