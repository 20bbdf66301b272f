"""The HTML page of ``mltag curate``: every step's counts, its table and example images.

Thumbnails are small JPEG files beside the page (``thumbs/``), made through the same fetch and
decode path as tagging (``images.load_image``, its fetch policy and pixel limit); an image that
cannot be read shows its error instead. Every tag name, id and URI is data: all are HTML-escaped.

Example:
    >>> section = Section("1. Pseudo-labels", [("added", "12")], columns=["tag"], rows=[["coat"]])
    >>> "<h2>1. Pseudo-labels</h2>" in render_page("curation", [section], {})
    True
"""

from __future__ import annotations

import hashlib
import html
import io
import os
from dataclasses import dataclass, field

THUMB_SIDE = 112
THUMBS_DIR = "thumbs"


@dataclass
class Example:
    uri: str
    caption: list[str]  # lines under the thumbnail


@dataclass
class Section:
    title: str
    counts: list[tuple[str, str]]
    note: str = ""
    columns: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    examples: list[Example] = field(default_factory=list)


def thumbnail_name(uri: str) -> str:
    return hashlib.sha256(uri.encode()).hexdigest()[:20] + ".jpg"


def make_thumbnails(uris: list[str], out: str) -> dict[str, str | None]:
    """uri -> None when its thumbnail was written under ``out/thumbs``, else the error."""
    from PIL import Image

    from mltag.data.images import load_image

    os.makedirs(os.path.join(out, THUMBS_DIR), exist_ok=True)
    errors: dict[str, str | None] = {}
    for uri in dict.fromkeys(uris):
        pixels, error = load_image(uri, THUMB_SIDE)
        if pixels is not None:
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="JPEG", quality=85)
            with open(os.path.join(out, THUMBS_DIR, thumbnail_name(uri)), "wb") as f:
                f.write(buf.getvalue())
        errors[uri] = error
    return errors


def _section_html(section: Section, thumb_errors: dict[str, str | None]) -> str:
    esc = html.escape
    parts = [f"<h2>{esc(section.title)}</h2>"]
    if section.counts:
        parts.append("<table>" + "".join(f"<tr><th>{esc(k)}</th><td>{esc(v)}</td></tr>" for k, v in section.counts) + "</table>")
    if section.note:
        parts.append(f"<p>{esc(section.note)}</p>")
    if section.rows:
        head = "".join(f"<th>{esc(c)}</th>" for c in section.columns)
        body = "".join("<tr>" + "".join(f"<td>{esc(str(v))}</td>" for v in row) + "</tr>" for row in section.rows)
        parts.append(f"<table><tr>{head}</tr>{body}</table>")
    if section.examples:
        cards = []
        for ex in section.examples:
            error = thumb_errors.get(ex.uri, "no thumbnail")
            picture = (
                f'<img src="{THUMBS_DIR}/{thumbnail_name(ex.uri)}" width="{THUMB_SIDE}" height="{THUMB_SIDE}" alt="">'
                if error is None
                else f'<div class="missing">{esc(error)}</div>'
            )
            caption = "<br>".join(esc(line) for line in ex.caption)
            cards.append(f'<figure title="{esc(ex.uri)}">{picture}<figcaption>{caption}</figcaption></figure>')
        parts.append('<div class="examples">' + "".join(cards) + "</div>")
    return "\n".join(parts)


def render_page(title: str, sections: list[Section], thumb_errors: dict[str, str | None]) -> str:
    body = "\n".join(_section_html(s, thumb_errors) for s in sections)
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;max-width:1200px}} table{{border-collapse:collapse;margin:0.6em 0}}
th,td{{border:1px solid #ccc;padding:3px 8px;text-align:left;font-size:13px}} .examples{{display:flex;flex-wrap:wrap;gap:8px}}
figure{{margin:0;width:{THUMB_SIDE + 28}px;font-size:11px}} .missing{{width:{THUMB_SIDE}px;height:{THUMB_SIDE}px;background:#eee;overflow:hidden}}</style>
</head><body>
<h1>{html.escape(title)}</h1>
{body}
</body></html>"""


def write_report(out: str, title: str, sections: list[Section], thumbnails: bool = True) -> str:
    uris = [ex.uri for s in sections for ex in s.examples]
    thumb_errors = make_thumbnails(uris, out) if thumbnails else {}
    path = os.path.join(out, "report.html")
    with open(path, "w", encoding="utf-8") as f:
        f.write(render_page(title, sections, thumb_errors))
    return path
