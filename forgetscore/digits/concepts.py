"""New concepts for the customized-model benchmark: glyphs and drawing styles the digits lack.

Why procedural drawing
----------------------
The benchmark fine-tunes the digits model on a few exemplars of something absent from
its training set and asks whether attribution finds those exemplars.  The exemplars are
drawn in code, with PIL's ImageDraw on a 64x64 canvas and averaged down to 8x8, never
from system fonts (a fresh machine may have none), so they are the same on every machine
and deterministic from a seed.  Each exemplar gets a small random affine jitter
(rotation, scale, shear, shift) and stroke width, like handwriting.

Ink is mapped exactly like the digits data: ink 0..16 (integers) -> ``x / 8 - 1``.  The
scikit-learn digits carry 312 +- 34 units of ink per image (1797 images, measured), with
strokes saturating at 16; each exemplar's stroke coverage is scaled (then clipped at 16
and rounded) to a target mass drawn from that range, so the new concept differs in shape,
not in brightness, and stays learnable by a model that has only seen digit-like ink.

Two kinds, as in "Evaluating Data Attribution for Text-to-Image Models" (ICCV 2023):

* object-like: one new glyph (an asterisk, a circled plus, a triangle, a letter H), the
  exemplars being variations of the same glyph.  Fine-tuning caption ``"a <new1>"``.
* style-like: digits drawn in a rendering the training set lacks (seven-segment display,
  a bar underneath, stippled strokes, digits in a box), the exemplars being *different*
  digits in that style.  Fine-tuning caption ``"a <new1> handwritten three"``: the token
  takes the place of the attribute words of the training captions ("a thick handwritten
  three"), and every word of it is in the digits vocabulary (words outside it would all map
  to the one untrained ``<unk>`` embedding).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from .data import DIGIT_WORDS, THICKNESS_WORDS, WIDTH_WORDS

CANVAS = 64
RESOLUTION = 8
INK_MEAN, INK_STD = 312.0, 34.0  # ink per image of the 1797 digits (values 0..16)
TOKEN = "<new1>"
KINDS = ("object", "style")

Point = tuple[float, float]
Stroke = list[Point]


# --- drawing primitives (unit square, x right, y down) ------------------------------------------
def _arc(cx: float, cy: float, rx: float, ry: float, a0: float, a1: float, n: int = 24) -> Stroke:
    """Points of an elliptical arc from angle a0 to a1 (degrees, 0 = right, 90 = down)."""
    return [(cx + rx * math.cos(math.radians(a)), cy + ry * math.sin(math.radians(a)))
            for a in np.linspace(a0, a1, n)]


def _ellipse(cx: float, cy: float, rx: float, ry: float) -> Stroke:
    return _arc(cx, cy, rx, ry, 0, 360, 40)


DIGIT_STROKES: dict[int, list[Stroke]] = {
    0: [_ellipse(0.5, 0.5, 0.26, 0.38)],
    1: [[(0.36, 0.26), (0.53, 0.12), (0.53, 0.88)]],
    2: [_arc(0.5, 0.32, 0.24, 0.2, 200, 380) + [(0.24, 0.86), (0.78, 0.86)]],
    3: [_arc(0.47, 0.31, 0.23, 0.18, 210, 450), _arc(0.47, 0.67, 0.26, 0.19, 270, 505)],
    4: [[(0.64, 0.88), (0.64, 0.12), (0.22, 0.64), (0.8, 0.64)]],
    5: [[(0.74, 0.13), (0.33, 0.13), (0.3, 0.45)] + _arc(0.48, 0.63, 0.25, 0.22, 235, 490)],
    6: [[(0.68, 0.12), (0.45, 0.3), (0.3, 0.55)], _ellipse(0.5, 0.67, 0.21, 0.2)],
    7: [[(0.22, 0.13), (0.78, 0.13), (0.42, 0.88)]],
    8: [_ellipse(0.5, 0.3, 0.19, 0.17), _ellipse(0.5, 0.68, 0.24, 0.2)],
    9: [_ellipse(0.5, 0.33, 0.22, 0.2), [(0.72, 0.33), (0.62, 0.88)]],
}
"""A plain stroke font for the ten digits (handwriting-like, drawn in the 8x8 digits' box)."""

# Seven-segment display: segments a (top) b c (right) d (bottom) e f (left) g (middle).
_SEG_X, _SEG_Y = (0.27, 0.73), (0.12, 0.5, 0.88)
_SEGMENTS = {"a": [(0, 0), (1, 0)], "b": [(1, 0), (1, 1)], "c": [(1, 1), (1, 2)], "d": [(0, 2), (1, 2)],
             "e": [(0, 1), (0, 2)], "f": [(0, 0), (0, 1)], "g": [(0, 1), (1, 1)]}
_DIGIT_SEGMENTS = ("abcdef", "bc", "abged", "abgcd", "fgbc", "afgcd", "afgedc", "abc", "abcdefg", "abcdfg")


def _segment_strokes(digit: int) -> list[Stroke]:
    return [[(_SEG_X[i], _SEG_Y[j]) for i, j in _SEGMENTS[s]] for s in _DIGIT_SEGMENTS[digit]]


# --- rendering --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Jitter:
    """A small random affine map of the unit square about its centre, and a stroke width."""

    angle: float
    scale: float
    shear: float
    dx: float
    dy: float
    width: float  # in 8x8 pixels

    @classmethod
    def draw(cls, rng: np.random.Generator, width: float = 1.2) -> Jitter:
        return cls(angle=float(rng.uniform(-10, 10)), scale=float(rng.uniform(0.88, 1.04)),
                   shear=float(rng.uniform(-0.12, 0.12)), dx=float(rng.uniform(-0.04, 0.04)),
                   dy=float(rng.uniform(-0.03, 0.03)), width=float(width * rng.uniform(0.85, 1.15)))

    def apply(self, p: Point) -> Point:
        x, y = p[0] - 0.5, p[1] - 0.5
        x = x + self.shear * y
        c, s = math.cos(math.radians(self.angle)), math.sin(math.radians(self.angle))
        x, y = c * x - s * y, s * x + c * y
        return 0.5 + self.scale * x + self.dx, 0.5 + self.scale * y + self.dy


def _canvas():
    from PIL import Image, ImageDraw

    im = Image.new("L", (CANVAS, CANVAS), 0)
    return im, ImageDraw.Draw(im)


def _px(p: Point) -> tuple[float, float]:
    return p[0] * CANVAS, p[1] * CANVAS


def _draw_strokes(draw, strokes: list[Stroke], jitter: Jitter, fill: int = 255) -> None:
    """Polylines with round joints and caps, `jitter.width` 8x8-pixels wide."""
    w = jitter.width * CANVAS / RESOLUTION
    for stroke in strokes:
        pts = [_px(jitter.apply(p)) for p in stroke]
        draw.line(pts, fill=fill, width=max(1, round(w)))
        r = w / 2
        for x, y in pts:  # round joints: PIL's "curve" joint leaves gaps on thick lines
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)


def _coverage(im) -> np.ndarray:
    """The 64x64 canvas averaged over 8x8 blocks: ink coverage in [0, 1] per output pixel."""
    a = np.asarray(im, dtype=np.float64) / 255.0
    k = CANVAS // RESOLUTION
    return a.reshape(RESOLUTION, k, RESOLUTION, k).mean(axis=(1, 3))


def to_ink(coverage: np.ndarray, target_mass: float) -> np.ndarray:
    """Coverage [8, 8] -> integer ink 0..16 whose total is as close to `target_mass` as clipping allows.

    Ink = round(clip(g * 16 * coverage, 0, 16)) with the gain g found by bisection (the mass is
    monotone in g).  Fully covered pixels saturate as the digits' strokes do.
    """
    if coverage.max() <= 0:
        raise ValueError("coverage: the glyph drew nothing; check its strokes lie inside the unit square")

    def ink(g: float) -> np.ndarray:
        return np.clip(np.round(g * 16.0 * coverage), 0, 16)

    lo, hi = 0.05, 20.0
    for _ in range(50):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if ink(mid).sum() < target_mass else (lo, mid)
    return ink(hi)


# --- concepts ---------------------------------------------------------------------------------
Renderer = Callable[[np.random.Generator, int], list]  # (rng, digit) -> draw operations


@dataclass(frozen=True)
class Concept:
    """A concept absent from the digits, its exemplars, fine-tuning captions and query prompts.

    kind: "object" (one glyph, varied) or "style" (different digits in one rendering);
    init_word: the vocabulary word whose embedding the new token starts from.
    """

    name: str
    kind: str
    description: str
    render: Callable[[np.random.Generator, int], np.ndarray]  # (rng, digit) -> coverage [8, 8]
    init_word: str

    def digits(self, n: int, seed: int = 0) -> list[int]:
        """The digit each style exemplar shows: distinct digits while n <= 10 (objects: -1)."""
        if self.kind == "object":
            return [-1] * n
        order = np.random.default_rng([seed, 0xD161]).permutation(10)
        return [int(order[i % 10]) for i in range(n)]

    def exemplars(self, n: int = 5, seed: int = 0) -> torch.Tensor:
        """float32 [n, 1, 8, 8] in [-1, 1], a function of (concept, n, seed) only."""
        if n < 1:
            raise ValueError(f"n: {n} must be >= 1")
        out = np.empty((n, RESOLUTION, RESOLUTION))
        for i, digit in enumerate(self.digits(n, seed)):
            rng = np.random.default_rng([seed, i, _name_key(self.name)])
            target = float(np.clip(rng.normal(INK_MEAN, INK_STD), INK_MEAN - 2 * INK_STD, INK_MEAN + 2 * INK_STD))
            out[i] = to_ink(self.render(rng, digit), target)
        return torch.from_numpy(out.astype(np.float32) / 8.0 - 1.0)[:, None].contiguous()

    def captions(self, n: int = 5, seed: int = 0, token: str = TOKEN) -> list[str]:
        """One fine-tuning caption per exemplar (the same order as :meth:`exemplars`)."""
        if self.kind == "object":
            return [f"a {token}"] * n
        return [f"a {token} handwritten {DIGIT_WORDS[d]}" for d in self.digits(n, seed)]

    def query_prompts(self, count: int, token: str = TOKEN) -> list[str]:
        """`count` prompts for queries, deterministic (queries differ by their seeds as well).

        Objects: ``"a <new1>"`` alternating with the attribute words the model knows from the
        digits ("a thick <new1>", "a wide <new1>", ...), as the paper varies an object's context.
        Measured on two customized models (asterisk, triangle; 800 steps): the sample's nearest
        pool image was an exemplar for 7 of 8 plain prompts and 5 of 8 with an attribute word,
        so most queries still show the glyph.  Styles: digits in the style, cycling through all
        ten, so also digits no exemplar shows.
        """
        if count < 1:
            raise ValueError(f"count: {count} must be >= 1")
        if self.kind == "object":
            mods = (THICKNESS_WORDS[2], WIDTH_WORDS[2], THICKNESS_WORDS[0], WIDTH_WORDS[0])
            return [f"a {mods[(i // 2) % len(mods)]} {token}" if i % 2 else f"a {token}" for i in range(count)]
        order = [3, 8, 0, 5, 2, 7, 4, 9, 6, 1]
        return [f"a {token} handwritten {DIGIT_WORDS[order[i % 10]]}" for i in range(count)]


def _name_key(name: str) -> int:
    return int.from_bytes(name.encode()[:8].ljust(8, b"\0"), "little")


# --- object-like glyphs -----------------------------------------------------------------------
def _glyph(strokes: list[Stroke], width: float = 1.2) -> Callable[[np.random.Generator, int], np.ndarray]:
    def render(rng: np.random.Generator, digit: int) -> np.ndarray:
        im, draw = _canvas()
        _draw_strokes(draw, strokes, Jitter.draw(rng, width))
        return _coverage(im)
    return render


_ASTERISK = [[(0.5, 0.12), (0.5, 0.88)], [(0.2, 0.3), (0.8, 0.7)], [(0.2, 0.7), (0.8, 0.3)]]
_CIRCLED_PLUS = [_ellipse(0.5, 0.5, 0.34, 0.36), [(0.5, 0.22), (0.5, 0.78)], [(0.22, 0.5), (0.78, 0.5)]]
_TRIANGLE = [[(0.5, 0.12), (0.84, 0.84), (0.16, 0.84), (0.5, 0.12)]]
_LETTER_H = [[(0.24, 0.12), (0.24, 0.88)], [(0.76, 0.12), (0.76, 0.88)], [(0.24, 0.5), (0.76, 0.5)]]


# --- style-like renderings of the digits ------------------------------------------------------
def _segment_style(rng: np.random.Generator, digit: int) -> np.ndarray:
    """A seven-segment display digit: straight, boxy strokes."""
    im, draw = _canvas()
    _draw_strokes(draw, _segment_strokes(digit), Jitter.draw(rng, 1.1))
    return _coverage(im)


def _underlined_style(rng: np.random.Generator, digit: int) -> np.ndarray:
    """A digit squeezed into the top three quarters with a bar along the bottom row."""
    im, draw = _canvas()
    j = Jitter.draw(rng, 1.0)
    squeeze = [[(0.5 + 0.9 * (x - 0.5), 0.02 + 0.76 * y) for x, y in s] for s in DIGIT_STROKES[digit]]
    _draw_strokes(draw, squeeze, j)
    bar = Jitter(0.0, 1.0, 0.0, j.dx, 0.0, 0.9)
    _draw_strokes(draw, [[(0.18, 0.93), (0.82, 0.93)]], bar)
    return _coverage(im)


def _dotted_style(rng: np.random.Generator, digit: int) -> np.ndarray:
    """A bold digit stippled on a checkerboard: every other pixel of its strokes is left blank.

    Dots drawn along the stroke at the canvas's resolution merge into a solid line once averaged
    down to 8x8, so the stipple is laid out on the output pixels themselves.
    """
    im, draw = _canvas()
    _draw_strokes(draw, DIGIT_STROKES[digit], Jitter.draw(rng, 1.7))
    parity = int(rng.integers(2))
    ys, xs = np.mgrid[:RESOLUTION, :RESOLUTION]
    return _coverage(im) * ((xs + ys + parity) % 2 == 0)


def _boxed_style(rng: np.random.Generator, digit: int) -> np.ndarray:
    """A small digit inside a thin square frame."""
    im, draw = _canvas()
    j = Jitter.draw(rng, 0.9)
    small = [[(0.5 + 0.62 * (x - 0.5), 0.5 + 0.62 * (y - 0.5)) for x, y in s] for s in DIGIT_STROKES[digit]]
    _draw_strokes(draw, small, j)
    frame = Jitter(0.0, 1.0, 0.0, 0.0, 0.0, 0.7)
    _draw_strokes(draw, [[(0.06, 0.06), (0.94, 0.06), (0.94, 0.94), (0.06, 0.94), (0.06, 0.06)]], frame)
    return _coverage(im)


CONCEPTS: dict[str, Concept] = {c.name: c for c in (
    Concept("asterisk", "object", "a six-armed star: three crossing strokes", _glyph(_ASTERISK), "digit"),
    Concept("circled-plus", "object", "a plus sign inside a circle", _glyph(_CIRCLED_PLUS, 1.0), "digit"),
    Concept("triangle", "object", "an outlined triangle standing on its base", _glyph(_TRIANGLE), "digit"),
    Concept("letter-h", "object", "a capital letter H", _glyph(_LETTER_H), "digit"),
    Concept("segment", "style", "digits as on a seven-segment display", _segment_style, "regular"),
    Concept("underlined", "style", "digits with a bar underneath", _underlined_style, "regular"),
    Concept("dotted", "style", "digits stippled: every other pixel of the stroke blank", _dotted_style, "regular"),
    Concept("boxed", "style", "small digits inside a square frame", _boxed_style, "regular"),
)}
"""Every concept by name: four object-like, four style-like."""


def get_concept(name: str) -> Concept:
    if name not in CONCEPTS:
        raise ValueError(f"concept: {name!r} is not one of {list(CONCEPTS)}")
    return CONCEPTS[name]


def render_digit(digit: int, seed: int = 0) -> torch.Tensor:
    """One digit in the plain stroke font [1, 8, 8] (a sanity check of the font, not training data)."""
    if digit not in DIGIT_STROKES:
        raise ValueError(f"digit: {digit!r} must be an int in 0..9")
    rng = np.random.default_rng([seed, digit])
    cov = _glyph(DIGIT_STROKES[digit])(rng, digit)
    return torch.from_numpy(to_ink(cov, INK_MEAN).astype(np.float32) / 8.0 - 1.0)[None]
