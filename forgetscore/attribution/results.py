"""Attribution results: full scores and the top-K, saved, loaded and checked (drawn by .report)."""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .io import check_writable, read_json, write_bytes, write_json, write_npy
from .report import gallery, png, report_html

RESULT_FILES = ("attribution.json", "scores.npy", "tau.npy", "query.png", "gallery.png", "report.html")


def _a(value: object) -> str:
    """`value`'s type as a phrase for an error: "an int", "a NoneType"."""
    name = type(value).__name__
    return f"{'an' if name[:1].lower() in 'aeiou' else 'a'} {name}"


def _numbers(name: str, value: object) -> np.ndarray:
    """`value` as a NumPy array of numbers, or a ValueError naming `name`."""
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"{name}: cannot be read as an array ({exc}); give a NumPy array of numbers") from None
    if arr.dtype.kind not in "iuf":
        raise ValueError(f"{name}: dtype {arr.dtype}, not numbers; give a NumPy array of floats")
    return arr


def _query_tensor(query: object) -> torch.Tensor:
    if isinstance(query, np.ndarray):
        query = torch.from_numpy(np.array(query))  # a copy: the caller's array stays theirs
    if not isinstance(query, torch.Tensor):
        raise ValueError(f"query: {_a(query)}; give the picture as a tensor (or NumPy array) [C, H, W] in [-1, 1]")
    batch = " (for a batch of one, give query[0])" if query.ndim == 4 and query.shape[0] == 1 else ""
    if query.ndim != 3 or query.shape[0] not in (1, 3) or 0 in query.shape:
        raise ValueError(f"query: shape {tuple(query.shape)}; give the picture as [C, H, W], channels first, with 1 "
                         f"or 3 channels{batch}")
    if not query.is_floating_point():
        raise ValueError(f"query: dtype {query.dtype}; give floats in [-1, 1] (8-bit pixels / 127.5 - 1)")
    return query


def _nonfinite_note(scores: np.ndarray, metadata: dict) -> str | None:
    """A warning when scores of scored images are NaN or infinite: each was the loss of an overflow or a
    diverged step, and is ranked by a rule, not by its value."""
    nan, pos = int(np.isnan(scores).sum()), int(np.isposinf(scores).sum())
    neg = int(np.isneginf(scores).sum())
    n_scored = metadata.get("n_scored") if isinstance(metadata, dict) else None
    # -inf marks the images outside a scored subset; only those beyond the unscored ones are scores.
    if isinstance(n_scored, int) and not isinstance(n_scored, bool) and 0 <= n_scored <= len(scores):
        neg = max(0, neg - (len(scores) - n_scored))
    else:
        n_scored, neg = len(scores) - neg, 0
    if not nan + pos + neg:
        return None
    parts = [f"{n} {what}" for n, what in ((nan, "NaN, left out of the ranking"),
                                           (pos, "+inf, ranked first (an unbounded rise)"),
                                           (neg, "-inf, ranked last (never in the top)")) if n]
    return (f"scores: {nan + pos + neg} of the {n_scored} scored images have no finite score ({'; '.join(parts)}): "
            "their losses overflowed or the unlearning step diverged; take a smaller step (alpha, steps) or a wider "
            "precision")


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
        if not isinstance(self.prompt, str):
            raise ValueError(f"prompt: {self.prompt!r} is {_a(self.prompt)}; give the query's prompt as a string")
        if isinstance(self.file_names, (str, bytes)) or not hasattr(self.file_names, "__iter__"):
            raise ValueError(f"file_names: {_a(self.file_names)}; give a list of the training images' file names")
        self.file_names = list(self.file_names)
        wrong = next((f for f in self.file_names if not isinstance(f, str)), None)
        if wrong is not None:
            raise ValueError(f"file_names: {wrong!r} is {_a(wrong)}; give each training image's file name as a "
                             "string")
        self.query = _query_tensor(self.query)
        self.scores = _numbers("scores", self.scores).astype(np.float64, copy=False)  # unsigned ones negate wrongly
        self.tau = _numbers("tau", self.tau)
        n = len(self.file_names)
        if self.scores.shape != (n,):
            raise ValueError(f"scores: shape {self.scores.shape}; give one score per training image ({n} file_names)")
        if self.tau.ndim != 2 or self.tau.shape[0] != n:
            raise ValueError(f"tau: shape {self.tau.shape}; give [{n}, versions], a row per training image")
        if isinstance(self.captions, (str, bytes)) or not hasattr(self.captions, "__iter__"):
            raise ValueError(f"captions: {_a(self.captions)}; give a list of captions per training image")
        # One caption given as a string is that image's list of one.
        self.captions = [[c] if isinstance(c, str) else c for c in self.captions]
        if len(self.captions) != n:
            raise ValueError(f"captions: {len(self.captions)} entries for {n} file_names; give each image its list")
        wrong = next((c for c in self.captions if not isinstance(c, list) or not all(isinstance(t, str) for t in c)),
                     None)
        if wrong is not None:
            raise ValueError(f"captions: {wrong!r} is not a list of strings; give each image its list of captions")
        if not isinstance(self.metadata, dict):
            raise ValueError(f"metadata: {_a(self.metadata)}; give a dict (or leave it out)")
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
            raise ValueError(f"k: {self.k!r} must be an int >= 1")
        note = _nonfinite_note(self.scores, self.metadata)
        if note:
            warnings.warn(note, stacklevel=3)

    def top(self, k: int | None = None) -> np.ndarray:
        """The ids of the `k` highest scores: +inf first, NaN and -inf (an image outside a scored subset) never."""
        k = self.k if k is None else k
        if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
            raise ValueError(f"k: {k!r} must be an int >= 1")
        ranked = np.flatnonzero(~np.isnan(self.scores) & ~np.isneginf(self.scores))
        return ranked[np.argsort(-self.scores[ranked], kind="stable")][:k]

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
        atomically). `train_dir`: the training folder the result was made from, recorded with its identity
        (default: the one the result records)."""
        out = _path("out", out)
        k = self.k if k is None else k
        if train_dir is not None:
            train_dir = _path("train_dir", train_dir)
        check_output_dir(out, overwrite)
        # Everything that can fail (reading the training images) happens before the first write.
        record = _record(self, k)
        given = train_dir is not None
        if not given and self.metadata.get("train_dir") is not None:
            recorded = self.metadata["train_dir"]
            if not isinstance(recorded, (str, os.PathLike)) or not Path(recorded).is_dir():
                raise ValueError(f"train_dir: the result records the training folder {recorded!r}, which is not a "
                                 "folder here; pass where it is now (train_dir=...)")
            train_dir = Path(recorded)
        if train_dir is not None:
            train = _check_same_names(self, train_dir)
            # Inside the result folder it is recorded relative to it: the two move together (the demo's run).
            record["train_dir"] = _recorded_dir(train.root, out)
            if given or not isinstance(self.metadata.get("data_id"), str):
                record["data_id"] = _with_identity(self.metadata.get("data_id"), train.identity())
            images = _top_images(self, train.root, k)
        else:
            warnings.warn("train_dir: none given and the result records none, so gallery.png and report.html show "
                          "no training images and Attribution.load reads the result back only when told the folder; "
                          "pass train_dir=... (the training folder the result was made from)", stacklevel=2)
            images = None
        pictures = {"query.png": png(self.query),  # native size: can be attributed again
                    "gallery.png": gallery(self, images, k),
                    "report.html": report_html(self, record, images, k).encode()}
        out.mkdir(parents=True, exist_ok=True)
        drop_temporaries(out)
        write_bytes(out / SAVING, b"")  # until the result is whole: what a failed save leaves is its own to replace
        (out / "attribution.json").unlink(missing_ok=True)  # an interrupted overwrite is then not a result
        write_npy(out / "scores.npy", self.scores)
        write_npy(out / "tau.npy", self.tau)
        for name, data in pictures.items():
            write_bytes(out / name, data)
        write_json(out / "attribution.json", record)  # last: its presence marks a complete result
        (out / SAVING).unlink()
        return out


def _path(argument: str, value: object) -> Path:
    if isinstance(value, bool) or not isinstance(value, (str, os.PathLike)):
        raise ValueError(f"{argument}: {value!r} is {_a(value)}; give a folder as a str or path")
    if not str(value).strip():  # Path("") is the working directory
        raise ValueError(f"{argument}: the path is empty; give a folder (\".\" for the working directory)")
    return Path(value)


def _record(result: Attribution, k: int) -> dict:
    """What attribution.json holds, and report.html shows under Settings."""
    return {"prompt": result.prompt, "top": result.top_records(k), "n_train": int(len(result.scores)),
            **result.metadata, "file_names_id": names_id(result.file_names)}


def _recorded_dir(train_root: str | os.PathLike, out: Path) -> str:
    """The training folder as attribution.json records it: relative to the result folder when inside it."""
    train, folder = Path(train_root).resolve(), Path(out).resolve()
    return train.relative_to(folder).as_posix() if train.is_relative_to(folder) else str(train)


def _stored_dir(recorded: str, out: Path) -> Path:
    """The training folder a result records, relative ones read against the result folder where it is now."""
    path = Path(recorded)
    return path if path.is_absolute() else Path(out).resolve() / path


def _with_identity(data_id: object, identity: str) -> str:
    """`data_id` (the folder's identity, then how its images were read: "+f3") with the folder's identity now."""
    if not isinstance(data_id, str) or not data_id:
        return identity
    return "+".join([identity, *data_id.split("+")[1:]])


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


def drop_temporaries(out: Path) -> None:
    """Remove the temporary files that saves killed midway left in `out` (a write's ``.scores.npy.<random>.tmp``,
    a report's ``.gallery.png.<pid>.tmp`` and the write's own of that): no later save replaces them, so each save
    clears them as it starts. Only those of the result files: the folder may hold other files of the user's."""
    for name in (*RESULT_FILES, SAVING):
        for pattern in (f".{name}.*.tmp", f"..{name}.*.tmp"):
            for path in out.glob(pattern):
                path.unlink(missing_ok=True)


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


def _top_images(result: Attribution, train_dir, k: int, argument: str = "train_dir") -> list[torch.Tensor]:
    from PIL import Image

    from .data import centre_crop, upright

    c, h, w = result.query.shape
    out = []
    for i in result.top(k):
        path = Path(train_dir) / result.file_names[i]
        try:
            with Image.open(path) as im:
                im = upright(im, c, f"image {str(path)!r}", argument)
                if im.size != (w, h):  # resized for the model (--resize): shown as the model saw it
                    im = centre_crop(im, w, h)
                arr = np.asarray(im, dtype=np.float32) / 127.5 - 1
        except OSError as exc:  # includes a missing file and PIL's UnidentifiedImageError
            raise ValueError(f"{argument}: cannot read image {str(path)!r} ({exc}); it is damaged or missing: restore "
                             "it from a copy of the training folder, or pass the training folder the result was "
                             "made from") from None
        t = torch.from_numpy(arr)
        out.append(t[None] if c == 1 else t.permute(2, 0, 1))
    return out


def check_result_dir(out: object) -> Path:
    """`out` as the folder of a result, or a ValueError that says what it is instead."""
    out = _path("out", out)
    if not out.exists():
        raise ValueError(f"out: {str(out)!r} does not exist; give the folder a result was saved into (by "
                         "`forgetscore attribute`, the demo or Attribution.save)")
    if not out.is_dir():
        raise ValueError(f"out: {str(out)!r} is a file; give the folder that holds it ({str(out.parent)!r})")
    return out


def load(out: str | os.PathLike, need_train: bool = True) -> dict:
    """The attribution.json of a result directory, with its scores (checked to be the ones it ranks).
    `need_train`: the training folder must be recorded (none is given)."""
    out = check_result_dir(out)
    path = out / "attribution.json"
    if not path.is_file():
        inside = sorted(p.parent.name for p in out.glob("*/attribution.json"))
        if inside:  # the folder of a --queries run: a result a query
            shown = ", ".join(inside[:5]) + (", ..." if len(inside) > 5 else "")
            raise ValueError(f"out: {str(out)!r} holds no attribution.json, but its folders {shown} do (one result "
                             "a query); give one of them")
        raise ValueError(f"out: {str(out)!r} holds no attribution.json; run `forgetscore attribute` first")
    try:
        rec = read_json(path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ValueError(f"out: {str(path)!r} is damaged ({exc}); run attribute again") from None
    keys = ("prompt", "top") + (("train_dir", "data_id") if need_train else ())
    missing = [key for key in keys if not isinstance(rec, dict) or key not in rec]
    if missing:
        raise ValueError(f"out: {str(path)!r} lacks {', '.join(missing)}; it was not written by "
                         "`forgetscore attribute` or by Attribution.save(out, train_dir=...), or is damaged: run "
                         "attribute again (or save it with its train_dir, or pass the training folder it was made "
                         "from: train_dir=..., --train)")
    _check_fields(rec, path)
    scores = _array(out, "scores.npy")
    where = str(out / "scores.npy")
    other = "it is damaged or from another result: put back this result's own scores.npy, or run attribute again"
    if scores.dtype.kind not in "iuf":
        raise ValueError(f"out: {where!r} holds values of dtype {scores.dtype}, not scores; {other}")
    if scores.ndim != 1:
        raise ValueError(f"out: {where!r} holds an array of shape {scores.shape}, not one score per training image; "
                         f"{other}")
    if "n_train" in rec and len(scores) != rec["n_train"]:
        raise ValueError(f"out: {where!r} holds {len(scores)} scores but attribution.json records {rec['n_train']} "
                         f"training images; {other}")
    # The saved top is the ranking of these very scores: a scores.npy of another query (a copy over this one)
    # would rank other images under this prompt.
    for n, r in enumerate(rec["top"]):
        i, saved = r["id"], float(r["score"])
        here = float(scores[i]) if 0 <= i < len(scores) else None
        if here is None or not (here == saved or math.isclose(here, saved, rel_tol=1e-9)):
            now = "none" if here is None else f"{here:.6g}"
            raise ValueError(f"out: {where!r} does not hold the scores attribution.json ranks "
                             f"(#{r.get('rank', n + 1)}, {r.get('file_name', i)!r}: {saved:.6g} in attribution.json, "
                             f"{now} in scores.npy); {other}")
    rec["scores"] = scores.astype(np.float64, copy=False)
    return rec


def _check_fields(rec: dict, path: Path) -> None:
    """That the fields of attribution.json read back are of their kind (a hand edit, or another program's file)."""
    def bad(key: str, want: str, value: object) -> ValueError:
        return ValueError(f"out: {str(path)!r}: {key} is {value!r}, not {want}; the file is damaged: put back the "
                          "result's own attribution.json, or run attribute again")

    kinds = {"prompt": (str, "a string"), "train_dir": (str, "a folder path"), "data_id": (str, "an id string"),
             "file_names_id": (str, "an id string"), "n_train": (int, "a count")}
    for key, (kind, want) in kinds.items():
        if key in rec and (not isinstance(rec[key], kind) or isinstance(rec[key], bool)):
            raise bad(key, want, rec[key])
    if not isinstance(rec["top"], list):
        raise bad("top", "a list of the top images", rec["top"])
    for r in rec["top"]:
        if (not isinstance(r, dict) or isinstance(r.get("id"), bool) or not isinstance(r.get("id"), int)
                or isinstance(r.get("score"), bool) or not isinstance(r.get("score"), (int, float))):
            raise bad("an entry of top", 'an object with an "id" and a "score"', r)


def _array(out: Path, name: str) -> np.ndarray:
    try:
        return np.load(out / name, allow_pickle=False)
    except (OSError, ValueError, EOFError) as exc:
        raise ValueError(f"out: {str(out / name)!r} is missing or damaged ({exc}); run attribute again") from None


def load_result(out: str | os.PathLike, train_dir: str | os.PathLike | None = None) -> Attribution:
    """A result that :meth:`Attribution.save` wrote into `out`, with its training set's names and captions;
    `train_dir`: the training folder where it is now (default: where the result says it was), recorded in the
    result's metadata (with its identity, once its names and top captions are found unchanged)."""
    from PIL import Image

    from .data import TrainingSet, load_image

    if train_dir is not None:
        train_dir = _path("train_dir", train_dir)
    out = check_result_dir(out)
    rec = load(out, need_train=train_dir is None)
    try:
        with Image.open(out / "query.png") as im:
            channels, (w, h) = (1 if im.mode == "L" else 3), im.size
    except OSError as exc:
        raise ValueError(f"out: {str(out / 'query.png')!r} is missing or damaged ({exc}); run attribute "
                         "again") from None
    query = load_image(out / "query.png", (channels, h, w), argument="out")
    tau = _array(out, "tau.npy")
    if tau.dtype.kind not in "iuf" or tau.ndim != 2 or len(tau) != len(rec["scores"]):
        raise ValueError(f"out: {str(out / 'tau.npy')!r} holds an array of dtype {tau.dtype} and shape {tau.shape}, "
                         f"not [{len(rec['scores'])}, versions] loss rises; it is damaged or from another result: put "
                         "back this result's own tau.npy, or run attribute again")
    recorded = _stored_dir(rec["train_dir"], out) if "train_dir" in rec else None
    if train_dir is None and not recorded.is_dir():
        raise ValueError(f"train: the training folder {str(recorded)!r} of this result is gone; pass where it is "
                         "now (train_dir=..., --train)")
    train = TrainingSet.load(recorded if train_dir is None else train_dir)
    # The scores are matched to the training set by position: a folder changed since would name the wrong images.
    # (A copy of the folder has new modification times, and so another identity: its names are compared then,
    # all of them in order; results saved before their id was recorded compare the top ones.)
    if "file_names_id" in rec:
        same_names = len(train) == len(rec["scores"]) and names_id(train.file_names) == rec["file_names_id"]
    else:
        same_names = len(train) == len(rec["scores"]) and all(
            0 <= r["id"] < len(train) and train.file_names[r["id"]] == r.get("file_name") for r in rec["top"])
    identity, data_id = train.identity(), rec.get("data_id")
    edited = [r["file_name"] for r in rec["top"] if "captions" in r and 0 <= r["id"] < len(train)
              and r["captions"] != train.captions[r["id"]]]
    meta = {key: v for key, v in rec.items() if key not in ("scores", "top", "prompt", "file_names_id")}
    meta["train_dir"] = str(Path(train.root).resolve())
    if data_id is None:
        if not same_names:
            raise ValueError(f"train_dir: {str(train.root)!r} holds {len(train)} images"
                             + (" in another order or with other names than" if len(train) == len(rec["scores"])
                                else ", not the") + f" {len(rec['scores'])} this result scored; pass the training "
                             "folder it was made from")
        warnings.warn(f"train_dir: the result records no identity of the training folder it was made from, so "
                      f"{str(train.root)!r} is taken for it unchecked but for its {len(train)} images"
                      + (" and their names" if "file_names_id" in rec else "") + "; it is recorded from now on",
                      stacklevel=3)
        meta["data_id"] = identity
    elif identity != str(data_id).split("+")[0]:
        if not same_names:
            raise ValueError(f"train: {str(train.root)!r} has changed since these scores were made (its "
                             "metadata.jsonl or images), so they would be shown beside the wrong images; run "
                             "attribute again")
        # The same names in the same order; the identity also holds sizes and modification times, which a copy
        # changes as well as an edit does: said, not refused. Captions of the top images are compared.
        warnings.warn(f"train: {str(train.root)!r} is not the folder as it was when these scores were made (a copy, "
                      "or an edit of its images or captions" + (f": the captions of {edited[0]} changed" if edited
                                                               else "") + "); its pictures and captions are shown "
                      "as they are now, beside the scores made before", stacklevel=3)
        if train_dir is not None and not edited:
            # A folder named on purpose, with the names and captions of the one scored (a copy): it stands for that
            # folder from now on, and is no longer said to differ.
            meta["data_id"] = _with_identity(data_id, identity)
    return Attribution(rec["scores"], tau, rec["prompt"], query, train.file_names, train.captions, meta,
                       k=max(1, len(rec["top"])))


def redraw(out: str | os.PathLike, k: int | None = None, train_dir: str | os.PathLike | None = None,
           report_dir: str | os.PathLike | None = None) -> tuple[Attribution, int]:
    """Rebuild gallery.png and report.html of a saved result (e.g. with another k); `train_dir`: the training
    folder where it is now (default: where the result says it was), recorded in attribution.json from then on.
    `report_dir`: write the two there instead (a result on a read-only disk, which is then left as it is).

    Everything is read and drawn before the first write, and the files are replaced together: a failure leaves
    the folder as it was."""
    if report_dir is not None:
        report_dir = _path("report_dir", report_dir)
    result = load_result(out, train_dir)
    out = Path(out)
    k = result.k if k is None else k
    images = _top_images(result, result.metadata["train_dir"], k, "train" if train_dir is None else "train_dir")
    record = _record(result, k)
    files = {"gallery.png": gallery(result, images, k), "report.html": report_html(result, record, images, k).encode()}
    if train_dir is not None and report_dir is None:
        saved = read_json(out / "attribution.json")
        # It lists the images scored (load_result checked): later reports and loads find it without being told.
        now = {**saved, "train_dir": _recorded_dir(result.metadata["train_dir"], out),
               "data_id": result.metadata["data_id"]}
        if now != saved:
            files["attribution.json"] = (json.dumps(now, indent=2, sort_keys=False) + "\n").encode()
    _write_together(out if report_dir is None else report_dir, files, "out" if report_dir is None else "report_dir")
    return result, k


def _write_together(folder: Path, files: dict[str, bytes], argument: str) -> None:
    """Write `files` into `folder` so that they are replaced together: each is written whole under a temporary
    name first, and only then are they renamed, so a failed write (a full disk) leaves the old ones."""
    from .io import _naming

    temps: list[tuple[Path, Path]] = []
    try:
        folder.mkdir(parents=True, exist_ok=True)
        drop_temporaries(folder)
        for name, data in files.items():
            temps.append((folder / f".{name}.{os.getpid()}.tmp", folder / name))
            try:
                write_bytes(temps[-1][0], data)
            except OSError as exc:  # named as the file it was to become, not its temporary name
                if exc.errno is None:
                    raise
                raise _naming(OSError(exc.errno, os.strerror(exc.errno)), folder / name) from None
        for tmp, final in temps:
            try:
                os.replace(tmp, final)
            except OSError as exc:
                raise _naming(exc, final) from None
    except OSError as exc:
        for tmp, _ in temps:
            tmp.unlink(missing_ok=True)
        # The error names the argument whose folder it is, as every other error of these functions does.
        text = exc.strerror if exc.errno is not None and exc.strerror else str(exc)
        named = OSError(f"{argument}: {text}")
        named.errno = exc.errno
        raise named from None
