"""The digits training set: scikit-learn's 1797 handwritten 8x8 digits with captions.

Why these choices
-----------------
* Native 8x8 resolution.  The images are 8x8 to begin with; upsampling adds no
  information but quadruples the UNet's work, and at this size the per-step cost
  is what bounds how often the model can be retrained (leave-K-out).  A 16x16
  (bilinear) version is available through ``resolution=16`` for experiments.
* Pixel values 0..16 map linearly to [-1, 1] (``x / 8 - 1``), the usual range for
  pixel-space diffusion.
* Captions describe *each image*, not only its class.  Unlearning the
  cross-attention keys/values of a query can only single out training images
  whose captions share something specific with the query; with class-only
  captions every image of the class looks the same to the method.  Each image
  gets five captions built from its digit word and three stroke attributes
  measured from its pixels, each cut into within-class tertiles (so every word
  is used by a third of each class and the attributes are not just proxies for
  the digit):

  - thickness: total ink relative to the class -> ``thin`` / ``regular`` / ``thick``
  - slant: the ink's shear ``-cov(x, y) / var(y)`` (top of the stroke to the
    right is positive) -> ``left slanted`` / ``upright`` / ``right slanted``
  - width: the horizontal standard deviation of the ink -> ``narrow`` /
    ``medium`` / ``wide``

  The vocabulary is fixed in code (:data:`VOCABULARY`), not derived from data.
* Image ids are the row numbers of ``load_digits`` (0..1796); every random draw
  in training is keyed on them.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..attribution.io import write_dir

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
THICKNESS_WORDS = ("thin", "regular", "thick")
SLANT_WORDS = ("left slanted", "upright", "right slanted")
WIDTH_WORDS = ("narrow", "medium", "wide")
CAPTION_TEMPLATES = (
    "a handwritten {digit}",
    "a {thickness} handwritten {digit}",
    "a {slant} handwritten {digit}",
    "a {width} handwritten {digit}",
    "a {thickness} {slant} {width} handwritten {digit}",
)
NUM_CAPTIONS = len(CAPTION_TEMPLATES)


def _vocabulary() -> tuple[str, ...]:
    words: list[str] = ["a", "an", "handwritten", "digit"]
    for group in (DIGIT_WORDS, THICKNESS_WORDS, SLANT_WORDS, WIDTH_WORDS):
        for phrase in group:
            for w in phrase.split():
                if w not in words:
                    words.append(w)
    return tuple(words)


VOCABULARY = _vocabulary()
"""Every word a caption can contain, in a fixed order (tokenizer ids follow it)."""


@dataclass(frozen=True)
class DigitsData:
    """The whole training set in memory.

    images: float32 [N, 1, R, R] in [-1, 1]; labels: int64 [N]; ids: int64 [N]
    (the image ids, 0..N-1); captions: N tuples of NUM_CAPTIONS strings;
    attributes: int64 [N, 3] tertile index (thickness, slant, width), 0..2.
    """

    images: torch.Tensor
    labels: torch.Tensor
    ids: torch.Tensor
    captions: tuple[tuple[str, ...], ...]
    attributes: torch.Tensor

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, index) -> "DigitsData":
        """The rows ``index`` (ids are kept, so random draws stay those of the full set)."""
        idx = torch.as_tensor(index, dtype=torch.int64)
        return DigitsData(images=self.images[idx], labels=self.labels[idx], ids=self.ids[idx],
                          captions=tuple(self.captions[int(i)] for i in idx), attributes=self.attributes[idx])


def _raw_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return bunch.images.astype(np.float64), bunch.target.astype(np.int64)


def measure_attributes(raw: np.ndarray) -> np.ndarray:
    """Raw stroke measurements [N, 3]: ink mass, slant (shear), horizontal spread.

    ``raw`` is [N, 8, 8] with values 0..16 (any non-negative ink map works).
    """
    n, h, w = raw.shape
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float64), np.arange(w, dtype=np.float64), indexing="ij")
    mass = raw.reshape(n, -1).sum(axis=1)
    safe = np.maximum(mass, 1e-9)
    mx = (raw * xs).reshape(n, -1).sum(axis=1) / safe
    my = (raw * ys).reshape(n, -1).sum(axis=1) / safe
    dx = xs[None] - mx[:, None, None]
    dy = ys[None] - my[:, None, None]
    cxx = (raw * dx * dx).reshape(n, -1).sum(axis=1) / safe
    cyy = (raw * dy * dy).reshape(n, -1).sum(axis=1) / safe
    cxy = (raw * dx * dy).reshape(n, -1).sum(axis=1) / safe
    # y grows downwards: a stroke whose top is to the right has cov(x, y) < 0.
    slant = -cxy / np.maximum(cyy, 1e-9)
    return np.stack([mass, slant, np.sqrt(cxx)], axis=1)


def within_class_tertiles(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0/1/2 per row: which third of its class the value falls in (ties by image id)."""
    out = np.zeros(values.shape[0], dtype=np.int64)
    for c in np.unique(labels):
        idx = np.nonzero(labels == c)[0]
        order = idx[np.lexsort((idx, values[idx]))]
        rank = np.empty(len(idx), dtype=np.int64)
        rank[np.searchsorted(idx, order)] = np.arange(len(idx))
        out[idx] = (3 * rank) // len(idx)
    return out


def make_captions(label: int, attributes: tuple[int, int, int]) -> tuple[str, ...]:
    """The NUM_CAPTIONS captions of an image with this label and attribute tertiles."""
    fields = dict(digit=DIGIT_WORDS[label], thickness=THICKNESS_WORDS[attributes[0]],
                  slant=SLANT_WORDS[attributes[1]], width=WIDTH_WORDS[attributes[2]])
    return tuple(_article(t.format(**fields)) for t in CAPTION_TEMPLATES)


def _article(caption: str) -> str:
    if caption.startswith("a ") and caption[2:3] and caption[2] in "aeiou":
        return "an " + caption[2:]
    return caption


def to_model_range(raw: np.ndarray, resolution: int = 8) -> torch.Tensor:
    """Raw 0..16 images [N, 8, 8] -> float32 [N, 1, R, R] in [-1, 1]."""
    x = torch.from_numpy(np.asarray(raw, dtype=np.float32) / 8.0 - 1.0)[:, None]
    if resolution != x.shape[-1]:
        x = torch.nn.functional.interpolate(x, size=(resolution, resolution), mode="bilinear",
                                            align_corners=False).clamp(-1.0, 1.0)
    return x.contiguous()


@lru_cache(maxsize=4)
def load_data(resolution: int = 8) -> DigitsData:
    """The 1797 digits with labels, ids, captions and attribute tertiles (cached)."""
    raw, labels = _raw_digits()
    meas = measure_attributes(raw)
    attrs = np.stack([within_class_tertiles(meas[:, k], labels) for k in range(3)], axis=1)
    captions = tuple(make_captions(int(labels[i]), tuple(int(a) for a in attrs[i])) for i in range(len(labels)))
    return DigitsData(images=to_model_range(raw, resolution), labels=torch.from_numpy(labels),
                      ids=torch.arange(len(labels), dtype=torch.int64), captions=captions,
                      attributes=torch.from_numpy(attrs))


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[N, 1, R, R] in [-1, 1] -> uint8 [N, R, R]."""
    x = ((images.detach().float().cpu().clamp(-1, 1) + 1.0) * 127.5).round()
    return x[:, 0].to(torch.uint8).numpy()


def write_image_folder(out_dir: str | os.PathLike, data: DigitsData | None = None, overwrite: bool = False) -> Path:
    """Write the set as PNG files plus ``metadata.jsonl``; atomic (temp dir, then rename).

    Each metadata line is ``{"file_name": "00000.png", "text": [captions...], "label": 3}``
    in image-id order.  Returns the folder.  An existing folder is kept unless
    ``overwrite``.
    """
    from PIL import Image

    out = Path(out_dir)
    if out.exists() and not overwrite:
        return out
    data = data if data is not None else load_data()
    out.parent.mkdir(parents=True, exist_ok=True)
    def fill(tmp: Path) -> None:
        pixels = to_uint8(data.images)
        with open(tmp / "metadata.jsonl", "w", encoding="utf-8") as f:
            for i in range(len(data)):
                name = f"{int(data.ids[i]):05d}.png"
                Image.fromarray(pixels[i]).save(tmp / name)
                f.write(json.dumps({"file_name": name, "text": list(data.captions[i]),
                                    "label": int(data.labels[i])}) + "\n")

    return write_dir(out, fill)
