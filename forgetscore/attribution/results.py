"""Attribution results: full scores, the top-K, a gallery picture and a self-contained HTML report."""
from __future__ import annotations

import base64
import hashlib
import html
import io
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .io import check_writable, read_json, write_bytes, write_json, write_npy

RESULT_FILES = ("attribution.json", "scores.npy", "tau.npy", "query.png", "gallery.png", "report.html")


@dataclass
class Attribution:
    """The ranking of the training set for one query."""

    scores: np.ndarray                 # [n_train] float64, higher = more responsible
    tau: np.ndarray                    # [n_train, versions] loss rise per version
    prompt: str
    query: torch.Tensor                # the query in pixel space, [C, H, W] in [-1, 1]
    file_names: list[str]
    captions: list[list[str]]
    metadata: dict = field(default_factory=dict)
    k: int = 10                        # how many top images top(), top_records() and save() give by default

    def __post_init__(self):
        self.scores = np.asarray(self.scores)
        self.tau = np.asarray(self.tau)
        n = len(self.file_names)
        if self.scores.shape != (n,):
            raise ValueError(f"scores: shape {self.scores.shape}; give one score per training image ({n} file_names)")
        if self.tau.ndim != 2 or self.tau.shape[0] != n:
            raise ValueError(f"tau: shape {self.tau.shape}; give [{n}, versions], a row per training image")
        if len(self.captions) != n:
            raise ValueError(f"captions: {len(self.captions)} entries for {n} file_names; give each image its list")

    def top(self, k: int | None = None) -> np.ndarray:
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k: {k!r} must be an int >= 1")
        order = np.argsort(-self.scores, kind="stable")
        scored = np.isfinite(self.scores[order])  # images outside a scored subset hold -inf
        return order[scored][:k]

    def top_records(self, k: int | None = None) -> list[dict]:
        return [{"rank": r + 1, "id": int(i), "file_name": self.file_names[i], "captions": self.captions[i],
                 "score": float(self.scores[i])} for r, i in enumerate(self.top(k))]

    @classmethod
    def load(cls, out: str | os.PathLike, train_dir: str | os.PathLike | None = None) -> "Attribution":
        """A result :meth:`save` wrote into `out` (its k: the top it saved); `train_dir`: the training folder where
        it is now (default: where the result says it was). The query is read back from query.png."""
        return load_result(out, train_dir)

    def save(self, out: str | os.PathLike, train_dir: str | os.PathLike | None = None, k: int | None = None,
             overwrite: bool = False) -> Path:
        """Write attribution.json (the top `k`, default the result's own k, and every setting), scores.npy,
        tau.npy (the loss rise of each version), query.png, gallery.png and report.html into `out` (each
        atomically)."""
        out = Path(out)
        k = self.k if k is None else k
        check_output_dir(out, overwrite)
        # Everything that can fail (reading the training images) happens before the first write.
        record = {"prompt": self.prompt, "top": self.top_records(k), "n_train": int(len(self.scores)),
                  **self.metadata, "file_names_id": names_id(self.file_names)}
        if train_dir is not None:
            train = _check_same_names(self, train_dir)
            # A result built by hand (not by an Attributor) records its folder as load() needs to find it.
            record.setdefault("train_dir", str(Path(train_dir).resolve()))
            record.setdefault("data_id", train.identity())
        images = _top_images(self, train_dir, k) if train_dir is not None else None
        pictures = {"query.png": _png(self.query, scale=1),  # native size: can be attributed again
                    "gallery.png": gallery(self, images, k),
                    "report.html": report_html(self, record, images, k).encode()}
        out.mkdir(parents=True, exist_ok=True)
        write_bytes(out / SAVING, b"")  # until the result is whole: what a failed save leaves is its own to replace
        (out / "attribution.json").unlink(missing_ok=True)  # an interrupted overwrite is then not a result
        write_npy(out / "scores.npy", self.scores)
        write_npy(out / "tau.npy", self.tau)
        for name, data in pictures.items():
            write_bytes(out / name, data)
        write_json(out / "attribution.json", record)  # last: its presence marks a complete result
        (out / SAVING).unlink()
        return out


# Scores whose larger values (the 90th percentile of |score|) stay within this many float32 rounding units
# of the losses are mostly rounding: on the demo model a working step moves them by ~1e5 units, and a
# step 2e6 times smaller (alpha / N with N = 4e8) by ~0.3 unit, yet with as many distinct values as images.
ROUNDING_UNITS = 100


def rounding_note(scores: np.ndarray, name: str = "the query", before: np.ndarray | None = None) -> str | None:
    """A warning when the scores of `name` are at the floating-point rounding of the losses: the unlearning
    step then moved the losses by about their rounding, and the ranking is mostly that rounding.

    Two signs, either enough: scores that stay within ``ROUNDING_UNITS`` float32 rounding units of the
    losses before (`before`, each image's), and scores that take few distinct values (losses that really
    rose differ from image to image in every digit; quantised scores, multiples of a few rounding units,
    are what a half-precision sweep leaves). Both mean a step too small for the arithmetic, e.g. alpha / N
    with N far too large.
    """
    finite = np.asarray(scores)[np.isfinite(scores)]
    if finite.size < 50:  # too few to tell a tie by chance from quantisation
        return None
    advice = ("the unlearning step moved the training losses by about their rounding, so the ranking is mostly "
              "rounding noise; take a larger step (alpha, steps) or check n_train (the N of alpha / N)")
    if before is not None:
        losses = np.abs(np.asarray(before, dtype=np.float64))
        unit = float(np.median(losses[np.isfinite(losses)])) * float(np.finfo(np.float32).eps)
        rise = float(np.quantile(np.abs(finite), 0.9))
        if unit > 0 and rise < ROUNDING_UNITS * unit:
            return (f"scores: those of {name} reach only {rise / unit:.2g} float32 rounding units of the losses "
                    f"(|score| {rise:.2g} at the 90th percentile, losses about {unit / np.finfo(np.float32).eps:.2g}): "
                    + advice)
    distinct = int(np.unique(finite).size)
    if 2 * distinct >= finite.size:
        return None
    return f"scores: those of {name} take only {distinct} distinct values over {finite.size} images: " + advice


def names_id(file_names: list[str]) -> str:
    """An id of the training images' names in their order: scores are matched to images by position."""
    return hashlib.sha256(json.dumps(list(file_names)).encode()).hexdigest()[:16]


def _check_same_names(result: Attribution, train_dir: str | os.PathLike):
    """The TrainingSet of `train_dir`, checked to list the images `result` scored in the same order (else its
    pictures would be wrong)."""
    from .data import TrainingSet

    try:
        train = TrainingSet.load(train_dir)
        names = train.file_names
    except ValueError as exc:
        raise ValueError(f"train_dir: {str(train_dir)!r} is not the training folder the result was made from, as it "
                         f"was ({str(exc).removeprefix('train: ')}); pass that folder") from None
    if names != list(result.file_names):
        raise ValueError(f"train_dir: {str(train_dir)!r} lists other images than the {len(result.file_names)} "
                         f"scored ({len(names)} in another order or with other names), so its pictures would stand "
                         "beside the wrong scores; pass the training folder the result was made from")
    return train


SAVING = ".forgetscore-saving"


def check_output_dir(out: Path, overwrite: bool) -> None:
    """That results can be written into `out` (checked before the long stages that make them)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {str(out)!r} exists and is not a directory; choose another path")
    check_writable(out, "out")
    # Files an interrupted save left (its marker, and no attribution.json, which comes last) are no result: a rerun
    # replaces them without --overwrite. Anything else of those names may be the user's own (a query.png).
    interrupted = (out / SAVING).is_file() and not (out / "attribution.json").exists()
    if out.is_dir() and not overwrite and not interrupted:
        clash = [f for f in RESULT_FILES if (out / f).exists()]
        if clash:
            raise ValueError(f"out: {str(out)!r} already holds results ({', '.join(clash)}); choose a new directory "
                             "or pass overwrite=True (--overwrite)")


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    arr = ((img.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return arr[0] if arr.shape[0] == 1 else arr.transpose(1, 2, 0)


def _png(img: torch.Tensor, scale: int | None = None) -> bytes:
    from PIL import Image

    im = Image.fromarray(_to_uint8(img))
    if scale is None:
        scale = max(1, 96 // max(im.size))
    if scale > 1:
        im = im.resize((im.size[0] * scale, im.size[1] * scale), Image.NEAREST)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _top_images(result: Attribution, train_dir, k: int) -> list[torch.Tensor]:
    from PIL import Image

    from .data import centre_crop, upright

    c, h, w = result.query.shape
    out = []
    for i in result.top(k):
        path = Path(train_dir) / result.file_names[i]
        try:
            with Image.open(path) as im:
                im = upright(im, c, f"image {str(path)!r}", "train_dir")
                if im.size != (w, h):  # resized for the model (--resize): shown as the model saw it
                    im = centre_crop(im, w, h)
                arr = np.asarray(im, dtype=np.float32) / 127.5 - 1
        except OSError as exc:  # includes a missing file and PIL's UnidentifiedImageError
            raise ValueError(f"train_dir: cannot read {str(path)!r} ({exc}); pass the training folder the "
                             "result was made from") from None
        t = torch.from_numpy(arr)
        out.append(t[None] if c == 1 else t.permute(2, 0, 1))
    return out


GALLERY_ROW = 11  # the query and ten training images


def gallery(result: Attribution, images: list[torch.Tensor] | None, k: int) -> bytes:
    """The query beside its top-K training images, each captioned with rank and score."""
    from PIL import Image, ImageDraw

    tile = 96
    tiles = [(_png(result.query), "query")]
    if images:
        tiles += [(_png(img), f"#{r + 1} {result.scores[i]:.2e}") for r, (i, img) in
                  enumerate(zip(result.top(k), images))]
    # Rows of GALLERY_ROW tiles, the query first: a long top-K stays a picture one can look at.
    per_row = min(len(tiles), GALLERY_ROW)
    rows = -(-len(tiles) // per_row)
    canvas = Image.new("RGB", ((tile + 8) * per_row + 8, (tile + 30) * rows), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (png, label) in enumerate(tiles):
        im = Image.open(io.BytesIO(png)).convert("RGB").resize((tile, tile), Image.NEAREST)
        x, y = 8 + (n % per_row) * (tile + 8), (n // per_row) * (tile + 30)
        canvas.paste(im, (x, y + 8))
        draw.text((x, y + tile + 12), label, fill="black" if n else "darkred")
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def report_html(result: Attribution, record: dict, images: list[torch.Tensor] | None, k: int) -> str:
    def img(png: bytes) -> str:
        return f'<img src="data:image/png;base64,{base64.b64encode(png).decode()}" width="96" height="96">'

    rows = []
    for r, rec in enumerate(record["top"]):
        pic = img(_png(images[r])) if images else ""
        caps = "<br>".join(html.escape(c) for c in rec["captions"])
        rows.append(f"<tr><td>{rec['rank']}</td><td>{pic}</td><td>{html.escape(rec['file_name'])}</td>"
                    f"<td>{rec['score']:.4e}</td><td>{caps}</td></tr>")
    meta = html.escape(json.dumps({k_: v for k_, v in record.items() if k_ not in ("top",)}, indent=1, default=str))
    scored = result.scores[np.isfinite(result.scores)]
    hist = np.histogram(scored, bins=40)
    peak = max(1, int(hist[0].max()))
    bars = "".join(f'<div style="display:inline-block;width:6px;margin-right:1px;background:#469;'
                   f'height:{max(1, int(80 * c / peak))}px"></div>' for c in hist[0])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>forgetscore attribution</title>
<style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:4px 10px;border-bottom:1px solid #ddd;
text-align:left}}img{{image-rendering:pixelated;border:1px solid #ccc}}</style></head><body>
<h1>Attribution by unlearning</h1>
<p><b>Prompt:</b> {html.escape(result.prompt)}</p><p>{img(_png(result.query))}</p>
<h2>Top {len(record['top'])} training images</h2>
<table><tr><th>rank</th><th>image</th><th>file</th><th>score (loss rise)</th><th>captions</th></tr>
{''.join(rows)}</table>
<h2>Score distribution over {len(scored)} scored training images</h2>
<div style="display:flex;align-items:flex-end;height:84px">{bars}</div>
<p>min {scored.min():.3e} &middot; median {np.median(scored):.3e} &middot;
max {scored.max():.3e}</p>
<h2>Settings</h2><pre style="white-space:pre-wrap">{meta}</pre>
</body></html>
"""


def load(out: str | os.PathLike) -> dict:
    """The attribution.json of a result directory, with its scores."""
    out = Path(out)
    if not (out / "attribution.json").is_file():
        inside = sorted(p.parent.name for p in out.glob("*/attribution.json")) if out.is_dir() else []
        if inside:  # the folder of a --queries run: a result a query
            shown = ", ".join(inside[:5]) + (", ..." if len(inside) > 5 else "")
            raise ValueError(f"out: {str(out)!r} holds no attribution.json, but its folders {shown} do (one result "
                             "a query); give one of them")
        raise ValueError(f"out: {str(out)!r} holds no attribution.json; run `forgetscore attribute` first")
    try:
        rec = read_json(out / "attribution.json")
    except ValueError as exc:
        raise ValueError(f"out: {str(out / 'attribution.json')!r} is damaged ({exc}); run attribute again") from None
    missing = [key for key in ("prompt", "top", "train_dir", "data_id") if not isinstance(rec, dict) or key not in rec]
    if missing:
        raise ValueError(f"out: {str(out / 'attribution.json')!r} lacks {', '.join(missing)}; it was not written by "
                         "`forgetscore attribute` or by Attribution.save(out, train_dir=...), or is damaged: run "
                         "attribute again (or save it with its train_dir)")
    rec["scores"] = _array(out, "scores.npy")
    return rec


def _array(out: Path, name: str) -> np.ndarray:
    try:
        return np.load(out / name, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"out: {str(out / name)!r} is missing or damaged ({exc}); run attribute again") from None


def load_result(out: str | os.PathLike, train_dir: str | os.PathLike | None = None) -> Attribution:
    """A result that :meth:`Attribution.save` wrote into `out`, with its training set's names and captions;
    `train_dir`: the training folder where it is now (default: where the result says it was)."""
    from PIL import Image

    from .data import TrainingSet, load_image

    out = Path(out)
    rec = load(out)
    try:
        with Image.open(out / "query.png") as im:
            channels, (w, h) = (1 if im.mode == "L" else 3), im.size
    except OSError as exc:
        raise ValueError(f"out: {str(out / 'query.png')!r} is missing or damaged ({exc}); run attribute again") from None
    query = load_image(out / "query.png", (channels, h, w), argument="out")
    if train_dir is None and not Path(rec["train_dir"]).is_dir():
        raise ValueError(f"train: the training folder {rec['train_dir']!r} of this result is gone; pass where it is "
                         "now (train_dir=..., --train)")
    train = TrainingSet.load(rec["train_dir"] if train_dir is None else train_dir)
    # The scores are matched to the training set by position: a folder changed since would name the wrong images.
    # (A copy of the folder has new modification times, and so another identity: its names are compared then,
    # all of them in order; results saved before their id was recorded compare the top ones.)
    if "file_names_id" in rec:
        same_names = len(train) == len(rec["scores"]) and names_id(train.file_names) == rec["file_names_id"]
    else:
        same_names = len(train) == len(rec["scores"]) and all(
            isinstance(r, dict) and 0 <= r.get("id", -1) < len(train)
            and train.file_names[r["id"]] == r.get("file_name") for r in rec["top"])
    if train.identity() != str(rec["data_id"]).split("+")[0]:
        if not same_names:
            raise ValueError(f"train: {str(train.root)!r} has changed since these scores were made (its "
                             "metadata.jsonl or images), so they would be shown beside the wrong images; run "
                             "attribute again")
        # The same names in the same order; the identity also holds sizes and modification times, which a copy
        # changes as well as an edit does: said, not refused. Captions of the top images are compared.
        edited = [r["file_name"] for r in rec["top"] if isinstance(r, dict) and "captions" in r
                  and 0 <= r.get("id", -1) < len(train) and r["captions"] != train.captions[r["id"]]]
        warnings.warn(f"train: {str(train.root)!r} is not the folder as it was when these scores were made (a copy, "
                      "or an edit of its images or captions" + (f": the captions of {edited[0]} changed" if edited
                                                               else "") + "); its pictures and captions are shown "
                      "as they are now, beside the scores made before", stacklevel=2)
    meta = {key: v for key, v in rec.items() if key not in ("scores", "top", "prompt", "file_names_id")}
    return Attribution(rec["scores"], _array(out, "tau.npy"), rec["prompt"], query, train.file_names,
                       train.captions, meta, k=max(1, len(rec["top"])))


def redraw(out: str | os.PathLike, k: int | None = None,
           train_dir: str | os.PathLike | None = None) -> tuple[Attribution, int]:
    """Rebuild gallery.png and report.html of a saved result (e.g. with another k); `train_dir`: the training
    folder where it is now (default: where the result says it was), recorded in attribution.json from then on."""
    out = Path(out)
    result = load_result(out, train_dir)
    k = result.k if k is None else k
    train = Path(result.metadata["train_dir"]) if train_dir is None else Path(train_dir)
    if train_dir is not None and str(train.resolve()) != result.metadata["train_dir"]:
        # It lists the images scored (load_result checked): later reports and loads find it without being told.
        result.metadata["train_dir"] = str(train.resolve())
        write_json(out / "attribution.json",
                   {**read_json(out / "attribution.json"), "train_dir": result.metadata["train_dir"]})
    images = _top_images(result, train, k)
    record = {"prompt": result.prompt, "top": result.top_records(k), **result.metadata}  # as save() lays it out
    picture, page = gallery(result, images, k), report_html(result, record, images, k).encode()
    write_bytes(out / "gallery.png", picture)
    write_bytes(out / "report.html", page)
    return result, k
