"""A self-contained HTML report of a captioning run: metric tables, loss curves, and an image grid with generated vs
reference captions. Images and plots are embedded as data URIs, so the one file can be moved or mailed."""

from __future__ import annotations

import base64
import html
import json
import math
from pathlib import Path

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 24px; color: #222; max-width: 1200px; }
h1 { font-size: 1.5em; } h2 { font-size: 1.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 8px 0; } th, td { border: 1px solid #ccc; padding: 4px 8px; }
th { background: #f2f2f2; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(260px, 1fr)); gap: 12px; }
.card { border: 1px solid #ddd; border-radius: 6px; padding: 8px; display: flex; gap: 8px; }
.card img { width: 96px; height: 96px; image-rendering: pixelated; flex: none; }
.gen { font-weight: 600; } .gen.ok { color: #176b2c; } .gen.bad { color: #b00020; }
.ref { color: #555; font-size: 0.9em; } .tag { font-size: 0.75em; color: #777; }
.why { color: #b00020; font-size: 0.85em; }
.note { color: #444; max-width: 900px; } img.plot { max-width: 100%; border: 1px solid #eee; }
"""


def data_uri(path: str | Path) -> str:
    """A file as a data: URI (PNG or JPEG by extension)."""
    path = Path(path)
    mime = "image/jpeg" if path.suffix.lower() in (".jpg", ".jpeg") else "image/png"
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode()}"


def _cell(value) -> str:
    if isinstance(value, float):
        return '<td class="num">–</td>' if math.isnan(value) else f'<td class="num">{value:.3f}</td>'
    return f"<td>{html.escape(str(value))}</td>"


def table(rows: list[dict], columns: list[str]) -> str:
    """An HTML table of `rows` (dicts) over `columns`; floats to 3 decimals, missing values as –."""
    head = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(_cell(r.get(c, float("nan"))) for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def write_report(
    path: str | Path,
    title: str,
    intro: str,
    tables: list[tuple[str, str]],
    plots: list[tuple[str, str | Path]],
    samples: list[dict],
    extra: dict | None = None,
) -> Path:
    """Write `path`. `tables`: (heading, html table); `plots`: (heading, PNG path); `samples`: dicts with `image`
    (path), `generated`, `references` (list), `correct` (bool or None), `tag` (e.g. the split) and optionally
    `error` (what is wrong with the generated caption, shown under it)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"]
    parts.append(f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>")
    parts.append(f"<p class='note'>{intro}</p>")
    for heading, content in tables:
        parts.append(f"<h2>{html.escape(heading)}</h2>{content}")
    for heading, png in plots:
        parts.append(f"<h2>{html.escape(heading)}</h2><img class='plot' alt='{html.escape(heading)}' ")
        parts.append(f"src='{data_uri(png)}'>")
    parts.append("<h2>Sample images: generated caption (bold) vs references</h2><div class='grid'>")
    for s in samples:
        verdict = "" if s.get("correct") is None else (" ok" if s["correct"] else " bad")
        refs = "".join(f"<div class='ref'>{html.escape(r)}</div>" for r in s["references"][:3])
        why = f"<div class='why'>✗ {html.escape(s['error'])}</div>" if s.get("error") else ""
        parts.append(
            f"<div class='card'><img alt='sample' src='{data_uri(s['image'])}'><div>"
            f"<div class='tag'>{html.escape(s.get('tag', ''))}</div>"
            f"<div class='gen{verdict}'>{html.escape(s['generated'])}</div>{why}{refs}</div></div>"
        )
    parts.append("</div>")
    if extra:
        parts.append(f"<h2>Details</h2><pre>{html.escape(json.dumps(extra, indent=2))}</pre>")
    parts.append("</body></html>")
    path = Path(path)
    path.write_text("".join(parts), encoding="utf-8")
    return path
