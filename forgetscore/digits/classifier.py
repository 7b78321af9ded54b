"""A digit classifier for judging generated samples, and sample-quality checks.

Why: "does the model draw the digit it was asked for" is the quality number that
matters for the demo, and a classifier trained on the real digits answers it in
milliseconds.  A one-hidden-layer MLP (scikit-learn, L-BFGS, fixed seed, 97 % held-out
accuracy on the real digits) is accurate enough at 8x8 and exposes its hidden
layer as image features (:meth:`DigitClassifier.features`) for feature-similarity
baselines.  :func:`attribute_effect` checks that the attribute words steer the
samples, by measuring ink mass, slant and width of generated images.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from .data import DIGIT_WORDS, measure_attributes, _raw_digits, to_model_range
from .model import SAMPLE_GUIDANCE, SAMPLE_STEPS


@dataclass
class DigitClassifier:
    mlp: object
    resolution: int

    def _x(self, images: torch.Tensor) -> np.ndarray:
        x = torch.as_tensor(images, dtype=torch.float32)
        if x.dim() == 3:
            x = x[:, None]
        if x.shape[-1] != self.resolution:
            x = torch.nn.functional.interpolate(x, size=(self.resolution,) * 2, mode="bilinear",
                                                align_corners=False)
        return x.reshape(len(x), -1).numpy().astype(np.float64)

    def predict(self, images: torch.Tensor) -> np.ndarray:
        """Digit labels for images [N, 1, R, R] in [-1, 1]."""
        return self.mlp.predict(self._x(images))

    def predict_proba(self, images: torch.Tensor) -> np.ndarray:
        return self.mlp.predict_proba(self._x(images))

    def features(self, images: torch.Tensor) -> np.ndarray:
        """Hidden-layer (penultimate) activations [N, hidden]."""
        h = self._x(images)
        for w, b in zip(self.mlp.coefs_[:-1], self.mlp.intercepts_[:-1]):
            h = np.maximum(h @ w + b, 0.0)
        return h


def _fit(x: np.ndarray, y: np.ndarray):
    import warnings

    from sklearn.neural_network import MLPClassifier

    mlp = MLPClassifier(hidden_layer_sizes=(128,), alpha=1e-2, solver="lbfgs", max_iter=300, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mlp.fit(x, y)
    return mlp


@lru_cache(maxsize=4)
def get_classifier(resolution: int = 8) -> DigitClassifier:
    """The classifier trained on all 1797 real digits at ``resolution`` (cached)."""
    raw, labels = _raw_digits()
    x = to_model_range(raw, resolution).reshape(len(labels), -1).numpy().astype(np.float64)
    return DigitClassifier(_fit(x, labels), resolution)


def heldout_accuracy(resolution: int = 8) -> float:
    """Accuracy on a fixed 30 % split when trained on the other 70 % (a sanity number)."""
    raw, labels = _raw_digits()
    x = to_model_range(raw, resolution).reshape(len(labels), -1).numpy().astype(np.float64)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(labels))
    cut = int(0.7 * len(labels))
    mlp = _fit(x[perm[:cut]], labels[perm[:cut]])
    return float((mlp.predict(x[perm[cut:]]) == labels[perm[cut:]]).mean())


def _samples(model_or_dir, prompts: list[str], seeds: list[int], steps: int, guidance_scale: float,
             desc: str | None = None) -> torch.Tensor:
    """Pixels [n, 1, R, R] in [-1, 1], made as the queries are (``attribution.generate``); ``desc``: the label of
    a progress bar (none without)."""
    from tqdm.auto import tqdm

    from ..attribution.generate import generate
    from ..attribution.model import DiffusionModel, quiet_loading

    if isinstance(model_or_dir, DiffusionModel):
        model = model_or_dir
    else:
        with quiet_loading():
            model = DiffusionModel.load(model_or_dir)
    # In parts, for the bar to move: each sample's noise is keyed on its own seed, so the parts draw the same
    # samples as one call would.
    part, out = 20, []
    with tqdm(total=len(prompts), desc=desc, unit="img", disable=desc is None) as bar:
        for lo in range(0, len(prompts), part):
            x = generate(model, prompts[lo:lo + part], seeds[lo:lo + part], steps=steps,
                         guidance_scale=guidance_scale)
            out.append(model.decode(x).float().cpu())
            bar.update(len(x))
    return torch.cat(out)


def digit_accuracy(model_or_dir, n_per_digit: int = 20, seed: int = 0, template: str = "a handwritten {digit}", *,
                   steps: int = SAMPLE_STEPS, guidance_scale: float = SAMPLE_GUIDANCE, progress: bool = False) -> dict:
    """Generate ``n_per_digit`` samples per digit and classify them (with a progress bar if ``progress``).

    ``model_or_dir``: a model directory or a loaded ``DiffusionModel``.  Returns
    ``{"accuracy": float, "per_digit": {word: float}, "predictions": int array [10, n_per_digit],
    "images": tensor [10 * n_per_digit, 1, R, R]}``; sample ``(d, i)`` uses seed ``seed + i``
    (the same noise for every digit).
    """
    prompts = [template.format(digit=w) for w in DIGIT_WORDS for _ in range(n_per_digit)]
    seeds = [seed + i for _ in DIGIT_WORDS for i in range(n_per_digit)]
    images = _samples(model_or_dir, prompts, seeds, steps, guidance_scale, "digit accuracy" if progress else None)
    pred = get_classifier(images.shape[-1]).predict(images).reshape(10, n_per_digit)
    hit = pred == np.arange(10)[:, None]
    return {"accuracy": float(hit.mean()),
            "per_digit": {w: float(hit[d].mean()) for d, w in enumerate(DIGIT_WORDS)},
            "predictions": pred, "images": images}


def image_attributes(images: torch.Tensor) -> np.ndarray:
    """Ink mass, slant, horizontal spread [N, 3] of images in [-1, 1] (ink = (x + 1) * 8)."""
    x = ((torch.as_tensor(images).float().clamp(-1, 1) + 1.0) * 8.0)[:, 0].numpy().astype(np.float64)
    return measure_attributes(x)


def attribute_effect(model_or_dir, n_per_digit: int = 10, seed: int = 0, *, steps: int = SAMPLE_STEPS,
                     guidance_scale: float = SAMPLE_GUIDANCE) -> dict:
    """Mean measured attribute per prompted attribute word, over all digits, same seeds.

    Returns ``{"thickness": {"thin": mass, "thick": mass}, "slant": {...}, "width": {...}}``:
    if the words work, ``thick`` > ``thin``, ``right slanted`` > ``left slanted``,
    ``wide`` > ``narrow``.
    """
    pairs = {"thickness": (0, ("thin", "thick")), "slant": (1, ("left slanted", "right slanted")),
             "width": (2, ("narrow", "wide"))}
    prompts, seeds, keys = [], [], []
    for name, (_, words) in pairs.items():
        for word in words:
            for d in DIGIT_WORDS:
                for i in range(n_per_digit):
                    art = "an" if word[0] in "aeiou" else "a"
                    prompts.append(f"{art} {word} handwritten {d}")
                    seeds.append(seed + i)
                    keys.append((name, word))
    meas = image_attributes(_samples(model_or_dir, prompts, seeds, steps, guidance_scale))
    out: dict = {}
    for name, (col, words) in pairs.items():
        out[name] = {}
        for word in words:
            rows = [k for k, key in enumerate(keys) if key == (name, word)]
            out[name][word] = float(meas[rows, col].mean())
    return out
