"""Drawing a result: the gallery picture and the self-contained HTML report."""
from __future__ import annotations

import base64
import html
import io
import json
from typing import TYPE_CHECKING

import numpy as np
import torch

if TYPE_CHECKING:
    from .results import Attribution


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    arr = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def png(img: torch.Tensor) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(_to_uint8(img)).save(buf, format="PNG")
    return buf.getvalue()


def _fitted(img: torch.Tensor, box: int):
    """`img` as a PIL image scaled to fit a `box` x `box` square, its proportions kept, and the factor it took.
    Pictures larger than the box are filtered down; smaller ones are enlarged pixel for pixel (their pixels are
    what the model saw)."""
    from PIL import Image

    im = Image.fromarray(_to_uint8(img))
    w, h = im.size
    scale = box / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    return im.resize(size, Image.NEAREST if scale >= 1 else Image.LANCZOS), scale


GALLERY_ROW = 11  # the query and ten training images
GALLERY_TILE = 96  # each picture fits a square of this many pixels
# The longer side of a picture in report.html: a report of thirty 512-pixel photographs stays a page of a
# megabyte or two, not of their full-size files.
REPORT_THUMB = 128


def gallery(result: Attribution, images: list[torch.Tensor] | None, k: int) -> bytes:
    """The query beside its top-K training images, each captioned with rank and score."""
    from PIL import Image, ImageDraw

    tile = GALLERY_TILE
    tiles = [(result.query, "query")]
    if images:
        tiles += [(img, f"#{r + 1} {result.scores[i]:.2e}") for r, (i, img) in enumerate(zip(result.top(k), images))]
    # Rows of GALLERY_ROW tiles, the query first: a long top-K stays a picture one can look at.
    per_row = min(len(tiles), GALLERY_ROW)
    rows = -(-len(tiles) // per_row)
    canvas = Image.new("RGB", ((tile + 8) * per_row + 8, (tile + 30) * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (img, label) in enumerate(tiles):
        im = _fitted(img, tile)[0].convert("RGB")
        x, y = 8 + (n % per_row) * (tile + 8), (n // per_row) * (tile + 30)
        canvas.paste(im, (x + (tile - im.size[0]) // 2, y + 8 + (tile - im.size[1]) // 2))
        draw.text((x, y + tile + 12), label, fill="black" if n else "darkred")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def _html_img(img: torch.Tensor) -> str:
    """An <img> of `img` at most REPORT_THUMB pixels long, in its proportions: a small picture is stored at its own
    size and enlarged by the browser by a whole factor, its pixels kept sharp; a large one is stored shrunk."""
    from PIL import Image

    im = Image.fromarray(_to_uint8(img))
    w, h = im.size
    buf = io.BytesIO()
    if max(w, h) > REPORT_THUMB:
        im, _ = _fitted(img, REPORT_THUMB)
        w, h = im.size
        im.save(buf, format="JPEG", quality=90)  # a photograph's thumbnail: a tenth of its PNG
        kind, pixelated = "jpeg", False
    else:
        factor = REPORT_THUMB // max(w, h)
        w, h = w * factor, h * factor
        im.save(buf, format="PNG")
        kind, pixelated = "png", factor > 1
    return (f'<img src="data:image/{kind};base64,{base64.b64encode(buf.getvalue()).decode()}" width="{w}" '
            f'height="{h}"{" class=px" if pixelated else ""}>')


def report_html(result: Attribution, record: dict, images: list[torch.Tensor] | None, k: int) -> str:
    rows = []
    for r, rec in enumerate(record["top"]):
        pic = _html_img(images[r]) if images else ""
        caps = "<br>".join(html.escape(c) for c in rec["captions"])
        rows.append(f"<tr><td>{rec['rank']}</td><td>{pic}</td><td>{html.escape(rec['file_name'])}</td>"
                    f"<td>{rec['score']:.4e}</td><td>{caps}</td></tr>")
    meta = html.escape(json.dumps({k_: v for k_, v in record.items() if k_ not in ("top",)}, indent=1, default=str))
    scores = result.scores
    finite = scores[np.isfinite(scores)]
    # Every image is counted in one class, so the counts add up to the training set (and to n_scored with the
    # images a subset left out).
    others = [f"{n} {what}" for n, what in ((int(np.isnan(scores).sum()), "NaN (left out of the ranking)"),
                                            (int(np.isposinf(scores).sum()), "+inf (ranked first)"),
                                            (int(np.isneginf(scores).sum()), "-inf (not scored, or ranked last)"))
              if n]
    counts = (f"<p>{finite.size} of the {scores.size} training images have a finite score"
              + (f"; {', '.join(others)}" if others else "") + ".</p>")
    if finite.size:
        hist = np.histogram(finite, bins=40)
        peak = max(1, int(hist[0].max()))
        bars = "".join(f'<div style="display:inline-block;width:6px;margin-right:1px;background:#469;'
                       f'height:{max(1, int(80 * c / peak))}px"></div>' for c in hist[0])
        spread = (f'<div style="display:flex;align-items:flex-end;height:84px">{bars}</div>\n'
                  f"<p>min {finite.min():.3e} &middot; median {np.median(finite):.3e} &middot; "
                  f"max {finite.max():.3e}</p>")
    else:
        spread = "<p>No finite score to show.</p>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>forgetscore attribution</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;
text-align:left}}img{{border:1px solid #ccc}}img.px{{image-rendering:pixelated}}</style></head><body>
<h1>Attribution by unlearning</h1>
<p><b>Prompt:</b> {html.escape(result.prompt)}</p><p>{_html_img(result.query)}</p>
<h2>Top {len(record['top'])} training images</h2>
<table><tr><th>rank</th><th>image</th><th>file</th><th>score (loss rise)</th><th>captions</th></tr>
{''.join(rows)}</table>
<h2>Score distribution over the {finite.size} training images with a finite score</h2>
{counts}
{spread}
<h2>Settings</h2><pre style="white-space:pre-wrap">{meta}</pre>
</body></html>
"""
