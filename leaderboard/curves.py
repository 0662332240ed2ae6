"""Robustness curves as inline SVG small multiples: one panel per norm, worst case against eps.

Lines carry their defense's style (families.py: palette colour, family marker and line style), a
``<title>`` (the browser's tooltip names the line and each point's value and interval) and a label
at their end that CSS shows on hover, when every other line fades — no script needed. A defense's
detail section draws the same panels with that defense in colour and the others in grey."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from leaderboard import svg
from leaderboard.families import NORM_ORDER, Style, norm_label

WIDTH, HEIGHT = 300, 210
LEFT, RIGHT, TOP, BOTTOM = 36, 14, 22, 34


def _points(entry: Mapping[str, Any], norm: str) -> list[Mapping[str, Any]]:
    return sorted((t for t in entry["worst_case_by_threat"] if t["norm"] == norm), key=lambda t: t["eps"])


def _domain(defenses: Sequence[Mapping[str, Any]], norm: str) -> tuple[float, float]:
    eps = [t["eps"] for d in defenses for t in _points(d, norm)]
    low, high = min(eps), max(eps)
    if high == low:
        return (low * 0.5, low * 1.5) if low > 0 else (-1.0, 1.0)
    pad = 0.06 * (high - low)
    return low - pad, high + pad


def _line(entry: Mapping[str, Any], style: Style, norm: str, x: Any, y: Any, *, context: bool = False) -> str:
    points = _points(entry, norm)
    coords = " ".join(f"{svg.num(x(t['eps']))},{svg.num(y(t['value']))}" for t in points)
    name = entry["defense"]
    out = [f'<g class="{"ctx" if context else "line"}">', svg.title(f"{name} ({style.family_label})")]
    if context:
        out.append(f'<polyline points="{coords}"/>')
        return "".join([*out, "</g>"])
    dash = f' stroke-dasharray="{style.dash}"' if style.dash else ""
    out.append(f'<polyline class="hit" points="{coords}"/>')
    out.append(f'<polyline points="{coords}" stroke="{style.colour}"{dash}/>')
    for t in points:
        interval = f"95% CI {100 * t['low']:.1f}–{100 * t['high']:.1f}%"
        tip = f"{name} at {norm} {t['eps']:g}: {100 * t['value']:.1f}% ({interval})"
        out.append(svg.marker(style, x(t["eps"]), y(t["value"]), 3.2, tip))
    last = points[-1]
    out.append(
        f'<text class="label" x="{svg.num(x(last["eps"]) - 4)}" y="{svg.num(y(last["value"]) - 7)}" '
        f'text-anchor="end">{svg.text(name)}</text>'
    )
    return "".join([*out, "</g>"])


def panel(
    defenses: Sequence[Mapping[str, Any]],
    styles: Mapping[str, Style],
    norm: str,
    dataset: str,
    highlight: str | None = None,
) -> str:
    """One norm's panel. With ``highlight``, that defense is drawn in its style and the others as grey
    context; without, every defense in its style."""
    lo, hi = _domain(defenses, norm)
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(eps: float) -> float:
        return LEFT + plot_w * (eps - lo) / (hi - lo)

    def y(value: float) -> float:
        return TOP + plot_h * (1 - value)

    out = [
        f'<svg class="curves" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" height="{HEIGHT}" '
        f'aria-label="{svg.text(f"{dataset}: worst-case robust accuracy against eps, {norm}")}">',
        f'<text class="panel-title" x="{LEFT}" y="14">{svg.text(norm_label(norm))}</text>',
    ]
    for tick in (0.0, 0.25, 0.5, 0.75, 1.0):
        ty = svg.num(y(tick))
        out.append(f'<line class="grid" x1="{LEFT}" y1="{ty}" x2="{WIDTH - RIGHT}" y2="{ty}"/>')
        out.append(f'<text class="tick" x="{LEFT - 4}" y="{svg.num(y(tick) + 3.5)}" text-anchor="end">{tick:g}</text>')
    eps_values = sorted({t["eps"] for d in defenses for t in _points(d, norm)})
    for eps in eps_values:
        out.append(
            f'<text class="tick" x="{svg.num(x(eps))}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle">{eps:g}</text>'
        )
    out.append(
        f'<text class="axis" x="{svg.num(LEFT + plot_w / 2)}" y="{HEIGHT - 6}" text-anchor="middle">'
        f"eps ({svg.text(norm)})</text>"
    )
    drawn = [d for d in defenses if _points(d, norm)]
    out.append('<g class="lines">')
    if highlight is None:
        out += [_line(d, styles[d["defense"]], norm, x, y) for d in reversed(drawn)]
    else:
        out += [_line(d, styles[d["defense"]], norm, x, y, context=True) for d in drawn if d["defense"] != highlight]
        out += [_line(d, styles[d["defense"]], norm, x, y) for d in drawn if d["defense"] == highlight]
    out += ["</g>", "</svg>"]
    return "".join(out)


def norms_of(data: Mapping[str, Any]) -> list[str]:
    """The dataset's norms, in the usual order (Linf, L2, L1, spatial, then any other)."""
    return sorted({t["norm"] for t in data["threat_models"]}, key=lambda n: (NORM_ORDER.get(n, 9), n))
