"""Pictures of MIG credit ([`CompletionCredit`]s from `trl_mig.inspection`): a self-contained HTML page and a PNG plot.

The HTML page has no scripts and no external assets (inline CSS, inline SVG, tooltips from `title` attributes), so it
opens anywhere, offline. Each prompt's completions stand side by side; in each, the steps of the thought are shaded by
their gain g_k and hovering a step shows l_k, h_k and g_k. The PNG plot needs matplotlib, an optional dependency
(`pip install 'trl-mig[plots]'`); the HTML page needs nothing.
"""

from __future__ import annotations

import html
import math
import os
from collections.abc import Sequence

from .inspection import CompletionCredit

_GAIN_RGB = (22, 130, 60)  # green: a step that raised the answer likelihood
_DROP_RGB = (200, 40, 40)  # red: a negative per-step reward (mig_gain="difference")
PLOTS_EXTRA_HINT = "pip install 'trl-mig[plots]'"  # how to get matplotlib, the optional dependency of the PNG plots

_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 20px; color: #1d1d1f; background: #fff; }
h1 { font-size: 20px; margin: 0 0 6px; }
h2 { font-size: 16px; margin: 0 0 6px; }
p.help { max-width: 1100px; font-size: 13px; color: #444; margin: 4px 0; }
.scale { display: inline-block; width: 160px; height: 12px; vertical-align: middle; border: 1px solid #bbb;
  background: linear-gradient(to right, #f1f1f1, rgba(22,130,60,0.85)); }
section.group { margin: 22px 0; padding-top: 10px; border-top: 2px solid #ddd; }
pre.prompt { background: #f6f6f6; padding: 6px 8px; white-space: pre-wrap; font-size: 12px; margin: 4px 0;
  max-width: 1100px; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; align-items: flex-start; padding-bottom: 8px; }
article.card { flex: 0 0 300px; border: 1px solid #ccc; border-radius: 6px; padding: 8px; font-size: 12px;
  background: #fff; }
article.card.correct { border-top: 4px solid #2e8b57; }
article.card.wrong { border-top: 4px solid #c0392b; }
article.card.unknown { border-top: 4px solid #999; }
.card header { font-weight: 600; margin-bottom: 4px; }
.card .facts { color: #333; margin-bottom: 6px; line-height: 1.45; }
.card ul.notes { margin: 4px 0 6px 16px; padding: 0; color: #8a5a00; }
.text { font-family: ui-monospace, 'DejaVu Sans Mono', Menlo, Consolas, monospace; white-space: pre-wrap;
  word-break: break-word; font-size: 12px; line-height: 1.5; border: 1px solid #eee; padding: 4px; }
.outside { color: #888; }
.step { border-left: 3px solid transparent; padding: 1px 0 1px 2px; }
.step.breakthrough { border-left-color: #0b5d2a; font-weight: 600; }
table.numbers { border-collapse: collapse; margin-top: 6px; font-size: 11px; width: 100%; }
table.numbers th, table.numbers td { border-bottom: 1px solid #eee; padding: 1px 4px; text-align: right; }
table.numbers th:first-child, table.numbers td:first-child { text-align: left; }
tr.breakthrough td { font-weight: 600; color: #0b5d2a; }
svg.plot { display: block; margin-top: 6px; }
"""


def render_html(groups: Sequence[Sequence[CompletionCredit]], title: str = "MIG credit") -> str:
    """
    A self-contained HTML page of the credit of `groups` (each a list of one prompt's completions, shown side by
    side). Steps are shaded by their gain relative to the largest gain on the page.
    """
    groups = [list(group) for group in groups if group]
    gains = [abs(step.gain) for group in groups for credit in group for step in credit.steps if _finite(step.gain)]
    scale = max(gains, default=0.0) or 1.0
    # one y range for every little plot of the page, so that their heights compare
    values = [v for group in groups for credit in group for v in (credit.loglik or []) if _finite(v)]
    y_range = (min(values, default=0.0), max(values, default=0.0))
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{_e(title)}</h1>",
        '<p class="help">Each completion\'s chain of thought is cut into steps. l<sub>k</sub> is the mean '
        "log-probability of the ground-truth answer after steps 1..k (l<sub>0</sub>: before any step), "
        "h<sub>k</sub> the watermark (best l so far) and g<sub>k</sub> the step's gain, what it lifted the watermark "
        f'by. A step\'s shade is its gain (<span class="scale"></span> 0 to {scale:.3g} nats); a dark bar marks a '
        "breakthrough (a step that lifted the watermark). Hover a step for its numbers. Grey text lies outside the "
        "thought and gets only the outcome advantage.</p>",
    ]
    for number, group in enumerate(groups, 1):
        first = group[0]
        solution = " | ".join(first.solution) if first.solution else "(none)"
        parts.append('<section class="group">')
        parts.append(f"<h2>Prompt {number} · ground truth: {_e(solution)} · {len(group)} completion(s)</h2>")
        parts.append(f'<pre class="prompt">{_e(first.prompt)}</pre>')
        parts.append('<div class="cards">')
        # identical completions (common at low temperature) share one card, which names them all
        same: dict[str, list[int]] = {}
        for index, credit in enumerate(group, 1):
            same.setdefault(credit.completion, []).append(index)
        parts += [_card(indices, group[indices[0] - 1], scale, y_range) for indices in same.values()]
        parts.append("</div></section>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


def write_html(path, groups: Sequence[Sequence[CompletionCredit]], title: str = "MIG credit") -> str:
    """Write [`render_html`] to `path` (creating its folder); returns the path."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(render_html(groups, title))
    return path


def _card(indices: list[int], credit: CompletionCredit, scale: float, y_range: tuple[float, float]) -> str:
    if credit.correct is None:
        status, verdict = "unknown", "no ground truth"
    elif credit.correct >= 1:
        status, verdict = "correct", "correct ✓"
    else:
        status, verdict = "wrong", "wrong ✗"
    facts = [
        f"answer: {_e(repr(credit.answer)) if credit.answer is not None else 'none'}",
        f"steps: {credit.num_steps}",
        f"MIG reward Σg = {_n(credit.reward)}",
        f"breakthroughs: {', '.join(map(str, credit.breakthroughs)) or 'none'}",
    ]
    if credit.outcome_advantage is not None:
        facts.append(f"outcome advantage {_n(credit.outcome_advantage)}")
    if credit.mig_advantage is not None:
        facts.append(f"MIG advantage {_n(credit.mig_advantage)}")
    if credit.sft_gate:
        facts.append("gated SFT: yes")
    names = " = ".join(f"#{i}" for i in indices) + (f" ({len(indices)} identical)" if len(indices) > 1 else "")
    out = [f'<article class="card {status}">', f"<header>{names} · {verdict}</header>"]
    out.append(f'<div class="facts">{" · ".join(facts)}</div>')
    if credit.messages:
        out.append('<ul class="notes">' + "".join(f"<li>{_e(m)}</li>" for m in credit.messages) + "</ul>")
    out.append(f'<div class="text">{_shaded_text(credit, scale)}</div>')
    if credit.loglik is not None:
        out.append(_plot(credit, y_range))
    out.append(_numbers(credit))
    out.append("</article>")
    return "\n".join(out)


def _shaded_text(credit: CompletionCredit, scale: float) -> str:
    text = credit.completion
    pieces, position = [], 0
    l0 = credit.loglik[0] if credit.loglik else None
    outside_tip = _e(_outside_tip(credit))
    for step in credit.steps:
        start, end = step.char_span
        if start > position:
            pieces.append(f'<span class="outside" title="{outside_tip}">{_e(text[position:start])}</span>')
        classes = "step breakthrough" if step.breakthrough else "step"
        style = _shade(step.gain, scale)
        tip = _step_tip(step, l0)
        pieces.append(f'<span class="{classes}" style="{style}" title="{_e(tip)}">{_e(text[start:end])}</span>')
        position = max(position, end)
    if position < len(text):
        pieces.append(f'<span class="outside" title="{outside_tip}">{_e(text[position:])}</span>')
    return "".join(pieces) or '<span class="outside">(empty completion)</span>'


def _step_tip(step, l0) -> str:
    lines = [
        f"step {step.index}" + (" · breakthrough" if step.breakthrough else ""),
        f"l_{step.index} = {_n(step.loglik)}   (l_0 = {_n(l0)})",
        f"h_{step.index} = {_n(step.watermark)}",
        f"g_{step.index} = {_n(step.gain)}",
        f"tokens {step.token_span[0]}–{step.token_span[1]}",
    ]
    if step.advantage is not None:
        lines.append(f"advantage of its tokens = {_n(step.advantage)}")
    return "\n".join(lines)


def _outside_tip(credit: CompletionCredit) -> str:
    tip = "outside the thought: no MIG credit"
    if credit.outside_advantage is not None:
        tip += f"\nadvantage of these tokens = {_n(credit.outside_advantage)}"
    return tip


def _shade(gain, scale: float) -> str:
    if not _finite(gain):
        return "background: #ffffff"
    if gain == 0:
        return "background: #f1f1f1"
    red, green, blue = _GAIN_RGB if gain > 0 else _DROP_RGB
    alpha = 0.15 + 0.7 * min(1.0, abs(gain) / scale)
    return f"background: rgba({red},{green},{blue},{alpha:.2f})" + ("; color: #fff" if alpha > 0.55 else "")


def _numbers(credit: CompletionCredit) -> str:
    with_advantage = any(step.advantage is not None for step in credit.steps)
    head = "<tr><th>k</th><th>l_k</th><th>h_k</th><th>g_k</th>" + ("<th>advantage</th>" if with_advantage else "")
    rows = [head + "</tr>"]
    l0 = credit.loglik[0] if credit.loglik else None
    h0 = credit.watermark[0] if credit.watermark else None
    rows.append(f"<tr><td>0</td><td>{_n(l0)}</td><td>{_n(h0)}</td><td></td>" + ("<td></td>" if with_advantage else "")
                + "</tr>")
    for step in credit.steps:
        cls = ' class="breakthrough"' if step.breakthrough else ""
        cells = [str(step.index), _n(step.loglik), _n(step.watermark), _n(step.gain)]
        if with_advantage:
            cells.append(_n(step.advantage))
        rows.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return '<table class="numbers">' + "".join(rows) + "</table>"


def _plot(credit: CompletionCredit, y_range: tuple[float, float], width: int = 290, height: int = 90) -> str:
    """Inline SVG: l_k (dots and line) and the watermark h_k (dashed), breakthroughs in green, on the page's y range
    `(low, high)`."""
    values = [(k, v) for k, v in enumerate(credit.loglik) if _finite(v)]
    marks = [(k, v) for k, v in enumerate(credit.watermark or []) if _finite(v)]
    if not values:
        return ""
    low, high = y_range
    span = (high - low) or 1.0
    last = max(len(credit.loglik) - 1, 1)
    pad = 14
    x = lambda k: pad + (width - 2 * pad) * k / last  # noqa: E731
    y = lambda v: pad + (height - 2 * pad) * (high - v) / span  # noqa: E731
    line = " ".join(f"{x(k):.1f},{y(v):.1f}" for k, v in values)
    water = " ".join(f"{x(k):.1f},{y(v):.1f}" for k, v in marks)
    lifted = set(credit.breakthroughs)
    dots = "".join(
        f'<circle cx="{x(k):.1f}" cy="{y(v):.1f}" r="{4 if k in lifted else 2.5}" '
        f'fill="{"#16823c" if k in lifted else "#2f5d9e"}"><title>l_{k} = {v:+.3f}</title></circle>'
        for k, v in values
    )
    label = (f'<text x="{pad}" y="10" font-size="9" fill="#555">l_k by step (green: breakthrough), h_k dashed, '
             f"{low:.1f} to {high:.1f}</text>")
    return (
        f'<svg class="plot" width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img">'
        f"{label}"
        f'<polyline points="{water}" fill="none" stroke="#999" stroke-dasharray="4 3" stroke-width="1.2"/>'
        f'<polyline points="{line}" fill="none" stroke="#2f5d9e" stroke-width="1.2"/>{dots}</svg>'
    )


def new_agg_figure(needed_by: str, **figure_kwargs):
    """
    A matplotlib `Figure` drawn by its own Agg canvas: no pyplot, so no global figure registry and no change of the
    process's backend. `figure_kwargs` go to `Figure` (figsize, dpi).

    Raises:
        ImportError: (with `name="matplotlib"`) when matplotlib is not installed: `needed_by` needs it, and the message
            says how to get it (the `plots` extra).
    """
    # matplotlib is an optional dependency (the `plots` extra): imported here, when a plot is drawn, and only here
    try:
        import matplotlib  # noqa: F401 - the package itself first: a missing (or blocked) matplotlib fails here
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(f"{needed_by} needs matplotlib: {PLOTS_EXTRA_HINT}", name="matplotlib") from err
    figure = Figure(**figure_kwargs)
    FigureCanvasAgg(figure)
    return figure


def render_png(credits: Sequence[CompletionCredit], path, title: str = "MIG credit") -> str:
    """
    A PNG plot (matplotlib, Agg canvas, no pyplot): l_k (solid) and the watermark h_k (dashed) over steps, one colour
    per completion, breakthroughs marked with a star. Completions without likelihoods are left out. Returns the path.

    Raises:
        ImportError: when matplotlib (the `plots` extra, `pip install 'trl-mig[plots]'`) is not installed.
    """
    figure = new_agg_figure("render_png", figsize=(9.5, 4.5), dpi=110)
    path = os.fspath(path)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    axes = figure.subplots()
    same: dict[str, list[int]] = {}  # identical completions are drawn once
    for index, credit in enumerate(credits, 1):
        same.setdefault(credit.completion, []).append(index)
    plotted = 0
    for number, indices in enumerate(same.values()):
        credit = credits[indices[0] - 1]
        if credit.loglik is None:
            continue
        color = f"C{number % 10}"  # the colour cycle (tab10 by default)
        steps = list(range(len(credit.loglik)))
        verdict = "n/a" if credit.correct is None else ("✓" if credit.correct >= 1 else "✗")
        names = "=".join(f"#{i}" for i in indices)
        axes.plot(steps, credit.loglik, "-o", color=color, markersize=3.5, linewidth=1.4,
                  label=f"{names} {verdict}  Σg={_n(credit.reward)}")
        axes.plot(steps, credit.watermark, linestyle="--", color=color, linewidth=1.0, alpha=0.8)
        lifted = credit.breakthroughs
        if lifted:
            axes.plot(lifted, [credit.loglik[k] for k in lifted], "*", color=color, markersize=12,
                      markeredgecolor="black", markeredgewidth=0.6)
        plotted += 1
    axes.set_xlabel("step k (0: prompt only)")
    axes.set_ylabel("l_k = mean log p(answer | prompt, steps 1..k)")
    axes.set_title(title if len(title) <= 90 else title[:87] + "...", fontsize=10)
    axes.xaxis.get_major_locator().set_params(integer=True)
    axes.grid(alpha=0.3)
    if plotted:
        axes.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), title_fontsize=8,
                    title="solid: l_k, dashed: watermark h_k\n★ breakthrough (the step lifts h)")
    else:
        axes.text(0.5, 0.5, "no likelihoods (no ground truth)", ha="center", va="center", transform=axes.transAxes)
    figure.tight_layout()
    figure.savefig(path)
    return path


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _n(value) -> str:
    return f"{value:+.3f}" if _finite(value) else "n/a"


def _e(text) -> str:
    return html.escape(str(text), quote=True)
