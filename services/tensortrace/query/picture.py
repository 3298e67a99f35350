"""The picture of one request (`tensortrace trace --html FILE` / `--png FILE`): a Gantt-like timeline
of its stages, a heatmap of the residual stream's L2 norm per layer over token positions, and
probe scores over positions when there are any. matplotlib (Agg, no display), imported only here.

    html = render_html(story, norms, link="http://grafana/...")     # one self-contained page (str)
    png = render_png(story, norms)                                  # the same panels in one PNG (bytes)

The page loads nothing from the network: styles inline, every image a base64 data: URI.
"""

from __future__ import annotations

import base64
import html as _html
import io

import numpy as np

from tensortrace.query.text import byte_size
from tensortrace.query.timeline import TraceStory, _utc, fmt_ms

_COLORS = {"request": "#9e9e9e", "tokenize": "#8d6e63", "queue": "#ef6c00", "prefill": "#1e88e5",
           "decode": "#43a047", "capture": "#8e24aa", "export": "#00897b", "kafka": "#5e35b1", "load": "#c62828",
           "probe": "#f9a825"}


def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _png(fig) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def _draw_timeline(ax, story: TraceStory) -> None:
    t0 = story.t0_ns
    stages = story.stages
    names = [s.name for s in stages]
    y = np.arange(len(stages))[::-1]
    for yi, s in zip(y, stages):
        color = _COLORS.get(s.name, "#607d8b")
        if s.steps_ns and len(s.steps_ns) > 1:   # decode: one bar per step, alternating shades
            bars = [((a - t0) / 1e6, max((b - a) / 1e6, 1e-3)) for a, b in s.steps_ns]
            ax.broken_barh(bars[0::2], (yi - 0.35, 0.7), facecolors=color)
            ax.broken_barh(bars[1::2], (yi - 0.35, 0.7), facecolors=color, alpha=0.6)
        else:
            ax.barh(yi, max(s.duration_ns / 1e6, story.total_ns / 1e6 * 0.002), left=(s.start_ns - t0) / 1e6,
                    height=0.7, color=color)
        ax.text((s.end_ns - t0) / 1e6, yi, f"  {fmt_ms(s.duration_ns)}", va="center", ha="left", fontsize=8)
    ax.set_yticks(y, names)
    ax.set_xlabel(f"ms since {_utc(t0)} (wall clock of each producing host)")
    ax.set_xlim(0, max(story.total_ns / 1e6 * 1.18, 1e-3))
    ax.set_ylim(-0.7, len(stages) - 0.3)
    ax.grid(axis="x", alpha=0.3)
    ax.set_title(f"trace {story.trace_id}: request {story.request_id or '-'}, end to end {fmt_ms(story.total_ns)}",
                 fontsize=10, loc="left")


def _draw_heatmap(fig, ax, norms, prompt_tokens: int | None) -> None:
    data = np.ma.masked_invalid(norms.norms)
    im = ax.imshow(data, aspect="auto", interpolation="nearest", origin="lower", cmap="viridis",
                   extent=(norms.start - 0.5, norms.end - 0.5, -0.5, len(norms.layers) - 0.5))
    ax.set_ylabel("layer")
    if len(norms.layers) <= 16:
        ax.set_yticks(range(len(norms.layers)), [str(layer) for layer in norms.layers])
    else:
        ticks = list(range(0, len(norms.layers), max(1, len(norms.layers) // 8)))
        ax.set_yticks(ticks, [str(norms.layers[i]) for i in ticks])
    ax.set_xlabel("token position")
    if prompt_tokens and norms.start < prompt_tokens < norms.end:
        ax.axvline(prompt_tokens - 0.5, color="white", linewidth=1, linestyle="--")
        ax.text(prompt_tokens, len(norms.layers) - 0.5, " decode ->", color="white", va="top", fontsize=8)
    ax.set_title(f"L2 norm of {norms.hook} rows per layer and position", fontsize=10, loc="left")
    fig.colorbar(im, ax=ax, label="||x||2", pad=0.01)


def _draw_probes(ax, probes: dict, verdicts: list[dict] | None = None) -> None:
    by_name = {v["name"]: v for v in verdicts or ()}
    for name, (pos, scores) in sorted(probes.items()):
        v = by_name.get(name)
        label = name if v is None else f"{name}: {v['score']:.2f} {v['label']}"
        (line,) = ax.plot(pos, scores, label=label, linewidth=1)
        if v is not None and v["threshold"] == v["threshold"]:   # not NaN
            ax.axhline(v["threshold"], color=line.get_color(), linewidth=0.8, linestyle="--")
    ax.set_xlabel("token position")
    ax.set_ylabel("score")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    ax.set_title("probe scores over tokens", fontsize=10, loc="left")


def _prompt_tokens(story: TraceStory) -> int | None:
    cap = story.captured or {}
    return cap.get("prompt_tokens") or None


def panels(story: TraceStory, norms=None) -> dict[str, bytes]:
    """Each panel as its own PNG: "timeline", "heatmap" (when norms), "probes" (when scores)."""
    out = {}
    fig = _figure(11, 0.45 * max(len(story.stages), 2) + 1.2)
    _draw_timeline(fig.add_subplot(), story)
    out["timeline"] = _png(fig)
    if norms is not None:
        fig = _figure(11, min(2.0 + 0.12 * len(norms.layers), 7.0))
        _draw_heatmap(fig, fig.add_subplot(), norms, _prompt_tokens(story))
        out["heatmap"] = _png(fig)
    if story.probes:
        fig = _figure(11, 2.6)
        _draw_probes(fig.add_subplot(), story.probes, story.probe_verdicts)
        out["probes"] = _png(fig)
    return out


def render_png(story: TraceStory, norms=None) -> bytes:
    """Timeline, heatmap and probe scores stacked in one figure."""
    heights = [0.45 * max(len(story.stages), 2) + 1.0]
    if norms is not None:
        heights.append(min(2.0 + 0.12 * len(norms.layers), 7.0))
    if story.probes:
        heights.append(2.4)
    fig = _figure(11, sum(heights) + 0.3)
    axes = fig.subplots(len(heights), 1, height_ratios=heights, squeeze=False)[:, 0]
    _draw_timeline(axes[0], story)
    i = 1
    if norms is not None:
        _draw_heatmap(fig, axes[i], norms, _prompt_tokens(story))
        i += 1
    if story.probes:
        _draw_probes(axes[i], story.probes, story.probe_verdicts)
    return _png(fig)


_CSS = """
body { font: 14px/1.4 -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; margin: 24px; color: #222; background: #fff; }
h1 { font-size: 18px; margin: 0 0 4px 0; } h2 { font-size: 15px; margin: 22px 0 6px 0; }
code, td.mono { font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 12px; }
table { border-collapse: collapse; } td, th { padding: 2px 10px 2px 0; text-align: left; vertical-align: top; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.bad { color: #c62828; font-weight: bold; } .good { color: #2e7d32; font-weight: bold; }
.muted { color: #666; font-size: 12px; } img { max-width: 100%; display: block; margin: 6px 0; }
.bar { display: inline-block; height: 10px; background: #5c6bc0; vertical-align: middle; }
"""


def _e(x) -> str:
    return _html.escape(str(x))


def render_html(story: TraceStory, norms=None, link: str = "", images: dict[str, bytes] | None = None) -> str:
    """One self-contained page: header, stage table, where the time went, what was captured, the
    timeline / heatmap / probe pictures (inline PNGs), clocks and notes."""
    images = images if images is not None else panels(story, norms)
    t0 = story.t0_ns
    c = story.completeness
    state = (f"<span class='{'good' if c['complete'] else 'bad'}'>{'complete' if c['complete'] else 'NOT complete'}"
             f"</span> ({_e(c['state'])}{'; ' + _e(c['incomplete_reason']) if c['incomplete_reason'] else ''})"
             if c else "<span class='muted'>no summary stored</span>")
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>trace {_e(story.trace_id)}</title>"
             f"<style>{_CSS}</style></head><body>",
             f"<h1>trace <code>{_e(story.trace_id)}</code></h1>",
             f"<div>request <code>{_e(story.request_id or '-')}</code> &middot; model <code>{_e(story.model or '?')}"
             f"</code> &middot; {state} &middot; end to end <b>{_e(fmt_ms(story.total_ns))}</b> from {_e(_utc(t0))}</div>"]
    if link:
        parts.append(f"<div><a href='{_e(link)}'>{_e(link)}</a></div>")
    if len(story.request_ids) > 1:
        parts.append(f"<div class='muted'>this trace holds {len(story.request_ids)} requests: "
                     f"{_e(', '.join(story.request_ids[:10]))}</div>")
    parts.append("<h2>Timeline</h2>")
    if "timeline" in images:
        parts.append(_img("timeline", images["timeline"], "timeline of the request's stages"))
    parts.append("<table><tr><th>stage</th><th>start</th><th>duration</th><th>source</th><th>detail</th></tr>")
    for s in story.stages:
        parts.append(f"<tr><td><b>{_e(s.name)}</b></td><td class='num'>+{_e(fmt_ms(s.start_ns - t0))}</td>"
                     f"<td class='num'>{_e(fmt_ms(s.duration_ns))}</td><td>{_e(s.source)}</td>"
                     f"<td class='muted'>{_e(s.detail)}</td></tr>")
    parts.append("</table>")
    if story.where:
        parts.append("<h2>Where the time went</h2><table>")
        for name, ns in story.where:
            share = ns / story.total_ns if story.total_ns else 0
            parts.append(f"<tr><td>{_e(name)}</td><td class='num'>{_e(fmt_ms(ns))}</td><td class='num'>{share * 100:.1f}%"
                         f"</td><td><span class='bar' style='width:{max(1, round(share * 300))}px'></span></td></tr>")
        parts.append("</table><div class='muted'>exclusive time: each instant counted once, for the most specific "
                     "stage running then</div>")
    parts.append("<h2>What was captured</h2>")
    cap = story.captured
    if cap and cap["hooks"]:
        parts.append("<table><tr><th>hook</th><th>layers</th><th>positions</th><th>records</th><th>raw</th>"
                     "<th>stored</th></tr>")
        for h, v in sorted(cap["hooks"].items()):
            parts.append(f"<tr><td>{_e(h)}</td><td>{_e(v['layers'])}</td><td>{v['positions'][0]}-{v['positions'][1] - 1}"
                         f"</td><td class='num'>{v['records']}</td><td class='num'>{_e(byte_size(v['raw_bytes']))}</td>"
                         f"<td class='num'>{_e(byte_size(v['stored_bytes']))}</td></tr>")
        parts.append("</table>")
        if cap.get("summaries"):
            parts.append(f"<div>tokens: {cap['prompt_tokens']} prompt + {cap['generated_tokens']} generated "
                         f"(finish {_e(cap['finish_reason'] or '?')}); records {cap['records_captured']} captured, "
                         f"{cap['records_loaded']} loaded, {cap['records_dropped']} dropped</div>")
    else:
        parts.append("<div class='muted'>no tensors stored for this trace</div>")
    if "heatmap" in images:
        parts.append("<h2>Residual stream norm</h2>")
        parts.append(_img("heatmap", images["heatmap"], "L2 norm of resid_pre per layer and token position"))
    if "probes" in images:
        parts.append("<h2>Probe scores</h2>")
        parts.append(_img("probes", images["probes"], "probe scores over token positions"))
    parts.append("<h2>Clocks</h2><ul class='muted'>" + "".join(f"<li>{_e(x)}</li>" for x in story.clocks) + "</ul>")
    if story.notes:
        parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{_e(x)}</li>" for x in story.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def _img(name: str, png: bytes, alt: str) -> str:
    return (f"<img id='{name}' alt='{_e(alt)}' src='data:image/png;base64,"
            f"{base64.b64encode(png).decode('ascii')}'>")
