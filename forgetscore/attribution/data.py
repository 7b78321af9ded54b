"""Training data: an image folder with ``metadata.jsonl``, and its prepared cache.

The folder follows the convention of diffusers' training scripts: one JSON object
per line, ``{"file_name": "0001.png", "text": "a caption" or ["caption", ...]}``.

``prepare`` runs the model's encoders once over the whole set and writes what every
later step reuses — the UNet inputs of each image and of its horizontal flip (VAE
latents times the scaling factor, or the pixels for pixel-space models), and the
text-encoder outputs of every caption — as memory-mapped shards with a JSON manifest.
It streams shard by shard (bounded memory) and resumes from finished shards.
"""
from __future__ import annotations

import hashlib
import itertools
import mmap
import os
import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .io import json_line, read_json, write_json, write_npy, write_npy_rows
from .model import DiffusionModel

# 2: images are read upright (their EXIF orientation applied) and resized by centre crop, not stretched.
# 3: the encoders' id holds their configs (a VAE's scaling factor) and the model's input size too.
CACHE_FORMAT = 3
# How caption states may be stored: numpy's dtype on disk and the torch dtype they are read as
# (numpy has no bfloat16: its bits are stored as uint16). Half-width stores halve the largest part
# of the cache (77 x 1024 states are 315 KB per caption in float32) and the bytes every sweep reads.
TEXT_DTYPES = {"float32": (np.float32, torch.float32), "float16": (np.float16, torch.float16),
               "bfloat16": (np.uint16, torch.bfloat16)}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff")


@dataclass
class TrainingSet:
    root: Path
    file_names: list[str]
    captions: list[list[str]]
    extra: list[dict]

    @classmethod
    def load(cls, root: str | os.PathLike) -> "TrainingSet":
        root = Path(root)
        meta = root / "metadata.jsonl"
        if root.exists() and not root.is_dir():
            raise ValueError(f"train: {str(root)!r} is a file, not a folder; give the training folder that holds "
                             "the images and their metadata.jsonl")
        if not meta.is_file():
            raise ValueError(f"train: {str(meta)!r} not found; the training folder needs a metadata.jsonl with "
                             'lines like {"file_name": "0001.png", "text": ["a caption", ...]}')
        names, caps, extra, seen = [], [], [], {}
        try:
            lines = meta.read_text(encoding="utf-8-sig").split("\n")
        except UnicodeDecodeError as exc:
            raise ValueError(f"train: {str(meta)!r} is not UTF-8 text ({exc.reason} at byte {exc.start}); save it "
                             "as UTF-8") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            rec = json_line(line, f"train: metadata.jsonl line {lineno}",
                            '{"file_name": "0001.png", "text": "a caption"}')
            name, text = rec.get("file_name"), rec.get("text")
            if not isinstance(name, str) or not name:
                raise ValueError(f"train: metadata.jsonl line {lineno} has no \"file_name\"; give the name of "
                                 "its image in the folder, like \"0001.png\"")
            if text is None:
                other = next((k for k in ("caption", "captions", "prompt", "texts") if k in rec), None)
                hint = f" (this line has {other!r}: rename it to \"text\")" if other else ""
                raise ValueError(f"train: metadata.jsonl line {lineno} ({name}) has no \"text\"{hint}; give its "
                                 "caption, or a list of them, as \"text\"")
            if isinstance(text, str):
                text = [text]
            if not isinstance(text, list) or not text or not all(isinstance(t, str) for t in text):
                raise ValueError(f"train: metadata.jsonl line {lineno} ({name}) has no caption; give \"text\" "
                                 "as a non-empty string or list of strings")
            blank = next((i for i, t in enumerate(text) if not t.strip()), None)
            if blank is not None:
                which = "its caption is" if len(text) == 1 else f"caption {blank + 1} of {len(text)} is"
                raise ValueError(f"train: metadata.jsonl line {lineno} ({name}): {which} blank; write it, or "
                                 "drop it from the list")
            key = name_key(name)
            if posixpath.isabs(key):  # results name images relative to the folder, which may move
                raise ValueError(f"train: metadata.jsonl line {lineno} names {name!r}, an absolute path; give "
                                 "paths relative to the training folder, inside it")
            if key == ".." or key.startswith("../"):
                raise ValueError(f"train: metadata.jsonl line {lineno} names {name!r}, outside the training "
                                 "folder; give paths relative to the folder, inside it")
            if key in seen:
                raise ValueError(f"train: metadata.jsonl line {lineno} lists {name!r} again (first on line "
                                 f"{seen[key]}); each image must appear once: merge the captions into one "
                                 "\"text\" list")
            if "\\" in name and not (root / name).is_file() and (root / key).is_file():
                name = key  # written on Windows ("sub\\a.png"): the file is sub/a.png here
            if not (root / name).is_file():
                raise ValueError(f"train: image {name!r} (metadata.jsonl line {lineno}) is missing from "
                                 f"{str(root)!r}; add the file or remove its line")
            seen[key] = lineno
            names.append(name)
            caps.append(text)
            extra.append({k: v for k, v in rec.items() if k not in ("file_name", "text")})
        if not names:
            raise ValueError(f"train: {str(meta)!r} lists no images; add a line per image")
        return cls(root, names, caps, extra)

    def __len__(self) -> int:
        return len(self.file_names)

    def identity(self) -> str:
        """Changes when the metadata or any image file changes (name, size or modification time)."""
        h = hashlib.sha256((self.root / "metadata.jsonl").read_bytes())
        for name in self.file_names:
            st = (self.root / name).stat()
            h.update(f"{name}:{st.st_size}:{st.st_mtime_ns}".encode())
        return h.hexdigest()[:16]

    def load_pixels(self, index: int, shape: tuple[int, int, int], resize: bool = False) -> torch.Tensor:
        """Image `index` as a float tensor in [-1, 1] with the model's (C, H, W)."""
        return load_image(self.root / self.file_names[index], shape, resize, argument="train")


def name_key(name: str) -> str:
    """What identifies a training image's file name: "./a.png" and "a.png" name one file, as do
    "sub\\a.png" and "sub/a.png"."""
    return posixpath.normpath(name.replace("\\", "/"))


def load_image(path: str | os.PathLike, shape: tuple[int, int, int], resize: bool = False,
               argument: str = "query") -> torch.Tensor:
    """An image file as a float tensor in [-1, 1] of shape (C, H, W); a size mismatch is an error unless `resize`."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as im:
            return image_pixels(im, shape, resize, argument, name=f"image {str(path)!r}")
    except (UnidentifiedImageError, OSError) as exc:
        raise _unreadable(argument, path, exc) from None


def _unreadable(argument: str, path: str | os.PathLike, exc: Exception) -> ValueError:
    return ValueError(f"{argument}: cannot read image {str(path)!r} ({exc}); give a path to a valid image file "
                      "(PNG, JPEG, ...)")


def _check_size(size: tuple[int, int], shape: tuple[int, int, int], resize: bool, argument: str, name: str) -> None:
    _, h, w = shape
    if size != (w, h) and not resize:
        raise ValueError(f"{argument}: {name} is {size[0]}x{size[1]} but the model takes {w}x{h}; resize the images "
                         "or pass resize=True (--resize)")


# EXIF orientations that turn the stored image by a quarter: shown, its width and height swap.
_QUARTER_TURNS = (5, 6, 7, 8)


def _upright_size(im) -> tuple[int, int]:
    """The size of `im` as a viewer shows it, from its header alone. PNG keeps EXIF in a chunk that
    Pillow reads at open only when it comes before the pixels; a later one is found when decoding."""
    from PIL import Image

    if im.format == "PNG":
        exif = Image.Exif()
        if im.info.get("exif"):
            exif.load(im.info["exif"])
    else:
        exif = im.getexif()
    w, h = im.size
    return (h, w) if exif.get(0x0112, 1) in _QUARTER_TURNS else (w, h)


def check_image_headers(data: TrainingSet, indices: Iterable[int], shape: tuple[int, int, int],
                        resize: bool = False) -> None:
    """Open the header of each image in `indices` (nothing is decoded): a file that is no image, or one of the
    wrong size, fails before the encoding, not hours into it. A damaged image body is found only by decoding."""
    from PIL import Image, UnidentifiedImageError

    for i in indices:
        path = data.root / data.file_names[i]
        try:
            with Image.open(path) as im:
                size = _upright_size(im)
        except (UnidentifiedImageError, OSError) as exc:
            raise _unreadable("train", path, exc) from None
        _check_size(size, shape, resize, "train", f"image {str(path)!r}")


def image_pixels(im, shape: tuple[int, int, int], resize: bool = False, argument: str = "query",
                 name: str = "the image") -> torch.Tensor:
    """A PIL image as a float tensor in [-1, 1] of shape (C, H, W), as :func:`load_image` reads a file.

    The image is read as a viewer shows it: a photo's EXIF orientation is applied. With `resize`, an
    image of another size is scaled so that it covers the model's size, then its centre is cut out,
    as diffusers' training scripts prepare images (Resize, then CenterCrop): a non-square photo keeps
    its proportions. Without `resize` another size is an error."""
    c, h, w = shape
    im = upright(im, c, name, argument)
    if im.size != (w, h):
        _check_size(im.size, shape, resize, argument, name)
        im = centre_crop(im, w, h)
    t = torch.from_numpy(np.asarray(im, dtype=np.float32) / 127.5 - 1.0)
    return t[None] if c == 1 else t.permute(2, 0, 1)


def upright(im, channels: int, name: str, argument: str):
    """`im` as a viewer shows it (its EXIF orientation applied), in 8-bit grey (1 channel) or RGB."""
    from PIL import ImageOps

    return eight_bit(ImageOps.exif_transpose(im), name, argument).convert("L" if channels == 1 else "RGB")


def centre_crop(im, w: int, h: int):
    """`im` scaled (bicubic) by the smaller factor that makes it at least w x h, then its centre w x h."""
    from PIL import Image

    iw, ih = im.size
    scale = max(w / iw, h / ih)
    sw, sh = max(w, round(iw * scale)), max(h, round(ih * scale))
    if (sw, sh) != (iw, ih):
        im = im.resize((sw, sh), Image.BICUBIC)
    # The offsets torchvision's CenterCrop takes, so a model trained on its crops sees the same pixels.
    left, top = int(round((sw - w) / 2.0)), int(round((sh - h) / 2.0))
    return im.crop((left, top, left + w, top + h))


def eight_bit(im, name: str, argument: str):
    """`im` with 8-bit channels (Pillow's own conversion clips wider greys at 255); `name` says which image in errors.

    The scale of integer images comes from the format, never from the pixels: 16-bit greys (mode
    I;16, and mode I of a PNG, whose integers have at most 16 bits) are divided by 257; other 32-bit
    integer images are refused. Float greys carry no scale, so theirs is read from the pixels: [0, 1],
    or [0, 255] when any exceeds 1 (a float image of another range, e.g. HDR in [0, 3], reads dark).
    """
    from PIL import Image

    if im.mode.startswith("I;16") or (im.mode == "I" and im.format == "PNG"):
        arr = np.asarray(im, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8))
    if im.mode == "I":
        raise ValueError(f"{argument}: {name} has 32-bit integer pixels, whose range is unknown; save "
                         "it as an 8-bit or 16-bit image")
    if im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        top = 1.0 if arr.max(initial=0) <= 1 else 255.0
        if not (np.isfinite(arr).all() and arr.min(initial=0) >= 0 and arr.max(initial=0) <= top):
            raise ValueError(f"{argument}: {name} holds floating-point values outside [0, 1] and "
                             "[0, 255]; save it as an 8-bit (or 16-bit) image")
        return Image.fromarray(np.round(arr * (255.0 / top)).astype(np.uint8))
    return im


class PreparedData:
    """Read side of the cache written by :func:`prepare`."""

    def __init__(self, cache: str | os.PathLike):
        self.dir = Path(cache)
        path = self.dir / "manifest.json"
        if not path.is_file():
            raise ValueError(f"cache: {str(self.dir)!r} holds no prepared data; run prepare first")
        self.manifest = read_json(path)
        if not self.manifest.get("complete"):
            raise ValueError(f"cache: {str(self.dir)!r} holds an unfinished prepare; run prepare again to resume it")
        if self.manifest.get("format") != CACHE_FORMAT:
            raise ValueError(f"cache: {str(self.dir)!r} was prepared by {_PREPARED_DIFFERS['format']}; prepare "
                             "it again in a fresh cache directory")
        m = self.manifest
        self.n = m["n_images"]
        self.input_shape = tuple(m["input_shape"])
        self.caption_offsets = self._array("caption_offsets.npy")
        self._inputs = [self._array(s["inputs"], mmap_mode="r") for s in m["shards"]]
        self._text = [self._array(s["text"], mmap_mode="r") for s in m["shards"]]
        self.shard_size = m["shard_size"]
        self.text_dtype = m.get("text_dtype", "float32")

    def _array(self, name: str, mmap_mode: str | None = None) -> np.ndarray:
        try:
            return np.load(self.dir / name, mmap_mode=mmap_mode, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"cache: {str(self.dir / name)!r} is missing or damaged ({exc}); run prepare again "
                             "(it makes lost or damaged shards anew)") from None

    @property
    def model_id(self) -> str:
        return self.manifest["encoders_id"]

    @property
    def data_id(self) -> str:
        """The training set's identity, how its images were read (the cache format: caches of the same
        folder made by earlier versions hold other inputs), and the caption store's dtype where it rounds
        the states."""
        return (f"{self.manifest['data_id']}+f{self.manifest['format']}"
                + ("" if self.text_dtype == "float32" else f"+{self.text_dtype}"))

    def n_captions(self, index: int) -> int:
        return int(self.caption_offsets[index + 1] - self.caption_offsets[index])

    def _ids(self, indices: np.ndarray) -> np.ndarray:
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and (idx.min() < 0 or idx.max() >= self.n):
            raise ValueError(f"indices: ids must lie in [0, {self.n}) for this prepared set; got "
                             f"{int(idx.min())}..{int(idx.max())}")
        return idx

    def inputs(self, indices: np.ndarray) -> torch.Tensor:
        """[len(indices), 2, C, H, W] float32: each image and its horizontal flip."""
        idx = self._ids(indices)
        shard, local = np.divmod(idx, self.shard_size)
        out = np.empty((len(idx), 2, *self.input_shape), dtype=np.float32)
        return torch.from_numpy(_gather(self._inputs, shard, local, out))

    def text(self, indices: np.ndarray, captions: str, *, stored: bool = False) -> tuple[torch.Tensor, list[int]]:
        """Encoder states of the captions of `indices` ([sum n_caps, L, D]) and the count per image.

        float32 (exact), or with `stored` in the store's own dtype (half the bytes to move for a
        float16 or bfloat16 store; the same values).
        """
        idx = self._ids(indices)
        offsets = np.asarray(self.caption_offsets, dtype=np.int64)
        counts = np.ones_like(idx) if captions == "first" else offsets[idx + 1] - offsets[idx]
        # Row r of the result is caption (r - first row of its image) of its image.
        image = np.repeat(np.arange(len(idx)), counts)
        within = np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts)
        return self._captions(idx[image], within, stored), counts.tolist()

    def caption_states(self, indices: np.ndarray, captions: np.ndarray, *, stored: bool = False) -> torch.Tensor:
        """Encoder states of caption ``captions[k]`` of image ``indices[k]``: [len(indices), L, D].

        Reads only those captions (the Fisher's samples need one caption of each image, not all of them).
        """
        idx = self._ids(indices)
        within = np.asarray(captions).reshape(-1)
        if within.shape != idx.shape or not np.issubdtype(within.dtype, np.integer):
            raise ValueError(f"captions: expected one integer caption index per image ({idx.shape[0]}), got "
                             f"{within.shape[0]} of dtype {within.dtype}")
        within = within.astype(np.int64)
        offsets = np.asarray(self.caption_offsets, dtype=np.int64)
        bad = (within < 0) | (within >= offsets[idx + 1] - offsets[idx])
        if bad.any():
            k = int(np.flatnonzero(bad)[0])
            raise ValueError(f"captions: image {int(idx[k])} has {self.n_captions(int(idx[k]))} caption(s), so "
                             f"caption {int(within[k])} does not exist; give indices in [0, its count)")
        return self._captions(idx, within, stored)

    def _captions(self, image: np.ndarray, within: np.ndarray, stored: bool) -> torch.Tensor:
        """States of caption ``within[k]`` of image ``image[k]`` for every k (checked ids), one gather."""
        offsets = np.asarray(self.caption_offsets, dtype=np.int64)
        shard = image // self.shard_size
        row = offsets[image] - offsets[shard * self.shard_size] + within  # the caption's row in its shard's file
        np_dtype, torch_dtype = TEXT_DTYPES[self.text_dtype]
        out = np.empty((len(row), *self._text[0].shape[1:]), dtype=np_dtype)
        states = torch.from_numpy(_gather(self._text, shard, row, out))
        if torch_dtype == torch.bfloat16:
            states = states.view(torch.bfloat16)  # the stored bits, reinterpreted
        return states if stored else states.float()


def _gather(files: list[np.ndarray], shard: np.ndarray, local: np.ndarray, out: np.ndarray) -> np.ndarray:
    """out[k] = files[shard[k]][local[k]], copied once, straight into `out`.

    A sweep's batches are runs of consecutive images, whose rows are consecutive in their shard
    file: each such run is one block copy (faster than a row gather). Scattered rows are
    gathered in C, one call per shard they come from, whatever their order; no Python step per
    image. Each shard is unmapped again as soon as its rows are copied (:func:`_unmap`).
    """
    if len(shard) == 0:
        return out
    breaks = np.flatnonzero((np.diff(shard) != 0) | (np.diff(local) != 1)) + 1
    if len(breaks) <= len(shard) // 8:  # mostly consecutive: block copies
        starts, ends = np.r_[0, breaks], np.r_[breaks, len(shard)]
        for a, b in zip(starts.tolist(), ends.tolist()):
            lo = int(local[a])
            src = files[int(shard[a])]
            out[a:b] = src[lo:lo + b - a]
            _unmap(src)
    else:
        # Rows grouped by shard (stable, so rows already grouped keep their places).
        order = None if np.all(np.diff(shard) >= 0) else np.argsort(shard, kind="stable")
        by_shard = shard if order is None else shard[order]
        cut = np.flatnonzero(np.diff(by_shard)) + 1
        for a, b in zip(np.r_[0, cut].tolist(), np.r_[cut, len(shard)].tolist()):
            src = files[int(by_shard[a])]
            if order is not None:
                pos = order[a:b]
                out[pos] = src[local[pos]]
            else:
                # mode="clip" (the ids are in range): with "raise" and `out`, numpy gathers into a buffer first.
                np.take(src, local[a:b], axis=0, out=out[a:b], mode="clip")
            _unmap(src)
    return out


def _unmap(src: np.ndarray) -> None:
    """Take a memory-mapped shard's pages out of this process once its rows have been copied.

    Left mapped, every page a sweep touches stays in the process's resident set, and so do its
    neighbours: the kernel maps in pages around each fault, whole large folios of the page cache
    at a time (megabytes for a few scattered rows). Over a full pass the resident set would grow
    to the size of the store, and a batch of rows scattered over many shards alone can map much
    of it; unmapped shard by shard, at most one shard's pages are mapped at a time. The pages
    stay in the page cache: reading them again costs a minor fault, not a disk read.
    """
    mm = getattr(src, "_mmap", None)
    if mm is not None and hasattr(mm, "madvise"):  # not for in-memory arrays, nor where there is no madvise
        mm.madvise(mmap.MADV_DONTNEED)


def _stored_text(states: torch.Tensor, text_dtype: str) -> np.ndarray:
    """float32 caption states as the store keeps them (rounded to nearest even in a half-width dtype)."""
    if text_dtype == "bfloat16":
        return states.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    return states.numpy().astype(TEXT_DTYPES[text_dtype][0])


def made_by_earlier_format(data_id: object) -> bool:
    """Whether a data id recorded beside a cached product (before-losses, a Fisher) is of prepared data made
    in an earlier cache format (:attr:`PreparedData.data_id` names it; before format 2 it named none), which
    no run reads any more."""
    if not isinstance(data_id, str):
        return False
    formats = [int(part[1:]) for part in data_id.split("+")[1:] if part[:1] == "f" and part[1:].isdigit()]
    return not formats or formats[0] < CACHE_FORMAT


# What a finished prepare that differs in a key was made from, said in words.
_PREPARED_DIFFERS = {
    "format": "an earlier version of forgetscore (it read images differently, or named the encoders by their "
              "weights alone)",
    "data_id": "another training set: the folder's list of images, their captions, or an image's size or "
               "modification time changed since",
    "encoders_id": "another model's tokenizer, text encoder or VAE",
}
PREPARE_KEYS = ("format", "encoders_id", "data_id", "n_images", "input_shape", "shard_size", "text_dtype")


def _shard_entry(s: int, shard_size: int, n: int) -> dict:
    return {"inputs": f"inputs-{s:05d}.npy", "text": f"text-{s:05d}.npy",
            "images": [s * shard_size, min(n, (s + 1) * shard_size)]}


def _shard_ok(cache: Path, entry: dict, input_shape: tuple[int, ...], n_text: int, text_dtype: str) -> bool:
    """Whether both files of a shard are finished (atomic writes: present means whole) with the expected shapes."""
    lo, hi = entry["images"]
    try:
        inputs = np.load(cache / entry["inputs"], mmap_mode="r", allow_pickle=False)
        text = np.load(cache / entry["text"], mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return (inputs.shape == (hi - lo, 2, *input_shape) and inputs.dtype == np.float32
            and text.ndim == 3 and text.shape[0] == n_text and text.dtype == TEXT_DTYPES[text_dtype][0])


def prepare(model: DiffusionModel, data: TrainingSet, cache: str | os.PathLike, *, shard_size: int = 4096,
            batch_size: int = 64, resize: bool = False, text_dtype: str = "float32",
            progress: bool = True, untrusted: str = "refuse") -> PreparedData:
    """Encode every image (and its flip) and every caption once; resumable shard by shard.

    Under torchrun the unfinished shards are dealt to the ranks (each encodes on its own device),
    which must all call it alike with `cache` on a filesystem they share; rank 0 writes the
    finished manifest. Every rank returns the prepared data. Shard files in `cache` that no
    matching manifest vouches for (an unfinished prepare of other data or settings, or none) are
    refused, or with ``untrusted="remove"`` deleted and made afresh (for a folder the caller owns).
    """
    from tqdm.auto import tqdm

    from .ranks import barrier, deal_chunks, init_distributed, on_rank0

    if text_dtype not in TEXT_DTYPES:
        raise ValueError(f"text_dtype: {text_dtype!r} is not one of {list(TEXT_DTYPES)}")
    cache = Path(cache)
    manifest_path = cache / "manifest.json"
    header = {"format": CACHE_FORMAT, "encoders_id": model.encoders_id(), "data_id": data.identity(),
              "n_images": len(data), "input_shape": list(model.input_shape), "shard_size": shard_size,
              # Absolute paths: `forgetscore cache`, run from anywhere, says where they are.
              "text_dtype": text_dtype, "train_dir": str(Path(data.root).resolve()),
              "model": str(Path(model.source).resolve()) if Path(model.source).is_dir() else model.source,
              "resize": bool(resize),
              "complete": False}

    counts = np.array([len(c) for c in data.captions], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(counts)])
    n_shards = (len(data) + shard_size - 1) // shard_size
    entries = [_shard_entry(s, shard_size, len(data)) for s in range(n_shards)]

    def n_text(s: int) -> int:
        lo, hi = entries[s]["images"]
        return int(offsets[hi] - offsets[lo])

    def intact() -> bool:
        try:
            stored = np.load(cache / "caption_offsets.npy", allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return False
        return np.array_equal(stored, offsets) and all(
            _shard_ok(cache, e, model.input_shape, n_text(s), text_dtype) for s, e in enumerate(entries))

    def finished() -> bool:
        try:
            old = read_json(manifest_path) if manifest_path.is_file() else {}
        except ValueError:  # not JSON: an unfinished prepare's manifest at worst, which starts afresh below
            old = {}
        # Resized images (finished, or in an unfinished prepare's shards) are not what a run without resizing
        # reads: its images must have the model's size already. The other way round, nothing needed resizing.
        if old.get("format") != CACHE_FORMAT and untrusted == "remove":
            return False  # made by an earlier version in a folder this caller owns: made afresh below
        if old.get("resize", False) and not resize:
            raise ValueError(f"resize: {str(cache)!r} holds training images resized to the model's size; pass "
                             "resize=True (--resize) as when it was prepared, or use a fresh cache directory")
        if old.get("complete"):  # finished: reused if it matches; never overwritten
            for key in PREPARE_KEYS:
                if old.get(key) != header[key]:
                    why = _PREPARED_DIFFERS.get(key, f"another {key} ({old.get(key)!r} vs {header[key]!r})")
                    raise ValueError(f"cache: {str(cache)!r} was prepared with {why}; use a fresh cache directory, "
                                     "or delete that folder to prepare there again")
            # Files lost or damaged since: the same settings, so only the bad shards are made again below.
            return intact()
        return False

    init_distributed(model.device)
    if on_rank0(finished):  # rank 0 looks, every rank follows (their views of a network filesystem may differ)
        return PreparedData(cache)
    rank, world, mine = deal_chunks(
        cache, header, device=model.device, manifest="manifest.json", keys=PREPARE_KEYS, n_chunks=n_shards,
        done=lambda s: _shard_ok(cache, entries[s], model.input_shape, n_text(s), text_dtype),
        chunk_glob=("inputs-[0-9]*.npy", "text-[0-9]*.npy"), caller="prepare",
        same_hint="every rank must prepare the same training set with the same model and settings",
        untrusted=untrusted)
    check_image_headers(data, (i for s in mine for i in range(*entries[s]["images"])), model.image_shape, resize)
    bar = tqdm(total=sum(entries[s]["images"][1] - entries[s]["images"][0] for s in mine),
               desc="prepare" if world == 1 else f"prepare (rank 0 of {world})", unit="img",
               disable=not progress or rank != 0)
    for s in mine:
        lo, hi = entries[s]["images"]
        inputs = np.empty((hi - lo, 2, *model.input_shape), dtype=np.float32)
        for b in range(lo, hi, batch_size):
            idx = range(b, min(hi, b + batch_size))
            pixels = torch.stack([data.load_pixels(i, model.image_shape, resize) for i in idx])
            both = torch.cat([pixels, pixels.flip(-1)])
            enc = model.encode_images(both).float().cpu().numpy()
            n = len(idx)
            inputs[b - lo:b - lo + n, 0] = enc[:n]
            inputs[b - lo:b - lo + n, 1] = enc[n:]
            bar.update(n)
        prompts = [c for caps in data.captions[lo:hi] for c in caps]
        # Streamed to the file 256 captions at a time: a shard's states can be gigabytes (77 x 1024 per caption).
        parts = (_stored_text(model.encode_text(prompts[k:k + 256]).float().cpu(), text_dtype)
                 for k in range(0, len(prompts), 256))
        first = next(parts)
        write_npy_rows(cache / entries[s]["text"], (len(prompts), *first.shape[1:]), first.dtype,
                       itertools.chain([first], parts))
        write_npy(cache / entries[s]["inputs"], inputs)
    bar.close()
    barrier()

    def finish() -> None:
        missing = [e["inputs"] for s, e in enumerate(entries)
                   if not _shard_ok(cache, e, model.input_shape, n_text(s), text_dtype)]
        if missing:
            raise ValueError(f"cache: shard {missing[0]} of {str(cache)!r} is missing or damaged after prepare"
                             + ("; with several ranks the cache must be on a filesystem all of them share"
                                if world > 1 else "; run prepare again"))
        write_npy(cache / "caption_offsets.npy", offsets)
        text_shape = list(np.load(cache / entries[0]["text"], mmap_mode="r").shape[1:])
        write_json(manifest_path, {**header, "shards": entries, "complete": True, "text_shape": text_shape})

    on_rank0(finish)
    return PreparedData(cache)
