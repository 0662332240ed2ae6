"""The few SVG pieces the page's figures are drawn with, written as text.

Inline SVG instead of PNG: crisp at any zoom, a few kilobytes, readable by screen readers, and a
``<title>`` inside a line or point is the browser's own tooltip — hovering names a line with no
script at all. Every string that comes from the database goes through ``text`` (or ``attr``)."""

from __future__ import annotations

from html import escape

from leaderboard.families import Style


def text(value: object) -> str:
    """Text content or attribute value, escaped (quotes included)."""
    return escape(str(value), quote=True)


def num(value: float) -> str:
    """A coordinate: two decimals are sub-pixel, and keep the page small."""
    return f"{value:.2f}".rstrip("0").rstrip(".") or "0"


def title(value: object) -> str:
    return f"<title>{text(value)}</title>"


def _element(tag: str, attributes: str, tip: str | None) -> str:
    return f"<{tag} {attributes}/>" if tip is None else f"<{tag} {attributes}>{title(tip)}</{tag}>"


def marker(style: Style, x: float, y: float, size: float = 3.6, tip: str | None = None) -> str:
    """The style's marker centred on (x, y), filled with its colour (white inside when hollow), with
    ``tip`` as its tooltip."""
    fill = "#fff" if style.hollow else style.colour
    paint = f'fill="{fill}" stroke="{style.colour}" stroke-width="1.2"'
    s = size
    if style.marker == "circle":
        return _element("circle", f'cx="{num(x)}" cy="{num(y)}" r="{num(s)}" {paint}', tip)
    if style.marker == "square":
        box = f'x="{num(x - s * 0.9)}" y="{num(y - s * 0.9)}" width="{num(1.8 * s)}" height="{num(1.8 * s)}"'
        return _element("rect", f"{box} {paint}", tip)
    shapes = {
        "triangle": [(0, -1.15), (1.05, 0.75), (-1.05, 0.75)],
        "triangle-down": [(0, 1.15), (1.05, -0.75), (-1.05, -0.75)],
        "diamond": [(0, -1.25), (1.0, 0), (0, 1.25), (-1.0, 0)],
        "plus": [(-0.35, -1.1), (0.35, -1.1), (0.35, -0.35), (1.1, -0.35), (1.1, 0.35), (0.35, 0.35)]
        + [(0.35, 1.1), (-0.35, 1.1), (-0.35, 0.35), (-1.1, 0.35), (-1.1, -0.35), (-0.35, -0.35)],
        "cross": [(-0.8, -1.1), (0, -0.3), (0.8, -1.1), (1.1, -0.8), (0.3, 0), (1.1, 0.8)]
        + [(0.8, 1.1), (0, 0.3), (-0.8, 1.1), (-1.1, 0.8), (-0.3, 0), (-1.1, -0.8)],
    }
    points = " ".join(f"{num(x + dx * s)},{num(y + dy * s)}" for dx, dy in shapes.get(style.marker, shapes["diamond"]))
    return _element("polygon", f'points="{points}" {paint}', tip)


def swatch(style: Style, width: int = 26, height: int = 12) -> str:
    """A legend key: a short stretch of the style's line with its marker in the middle."""
    dash = f' stroke-dasharray="{style.dash}"' if style.dash else ""
    return (
        f'<svg class="swatch" width="{width}" height="{height}" viewBox="0 0 {width} {height}" aria-hidden="true">'
        f'<line x1="1" y1="{height / 2:g}" x2="{width - 1}" y2="{height / 2:g}" stroke="{style.colour}" '
        f'stroke-width="1.6"{dash}/>{marker(style, width / 2, height / 2, 3.4)}</svg>'
    )
