"""An adapter with the shape of dattri's ``BaseAttributor``, usable without dattri installed.

    attributor = DattriAttributor(model)                     # a DiffusionModel or a model directory
    attributor.cache(full_train_loader)                      # Fisher over the full training data
    scores = attributor.attribute(train_loader, test_loader) # Tensor [n_train, n_test]

Loaders yield batches as dicts ``{"image": pixels in [-1, 1] [B, C, H, W], "text": [caption or
[captions...] per row]}`` or as ``(image, text)`` tuples; for the test loader the text is each
query's prompt. Rows are numbered in loader order, which keys their noise. Several captions per
image may also come as PyTorch's default ``collate`` lays them out: a list of tuples, the k-th tuple
holding the k-th caption of every image of the batch (tuples of the batch's length are read so).
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Iterable

import numpy as np
import torch

from .attributor import REDUCTIONS, _check_prompt
from .data import PreparedData
from .fisher import compute_fisher
from .losses import LossSweep
from .model import DiffusionModel
from .params import select
from .plan import ScoringPlan
from .unlearning import UnlearnConfig, unlearn


class ArrayData(PreparedData):
    """Prepared data held in memory (one shard), for data that comes from a loader instead of a folder."""

    def __init__(self, inputs: np.ndarray, text: np.ndarray, caption_offsets: np.ndarray, encoders_id: str):
        # As a prepared store holds them (the reads gather into float32 buffers).
        inputs, text = np.ascontiguousarray(inputs, dtype=np.float32), np.ascontiguousarray(text, dtype=np.float32)
        h = hashlib.sha256(inputs.tobytes())
        h.update(text.tobytes())
        h.update(caption_offsets.tobytes())
        self.dir = None
        self.manifest = {"encoders_id": encoders_id, "data_id": h.hexdigest()[:16], "complete": True}
        self.n = inputs.shape[0]
        self.input_shape = tuple(inputs.shape[2:])
        self.caption_offsets = caption_offsets
        self._inputs, self._text = [inputs], [text]
        self.text_dtype = "float32"
        self.shard_size = max(1, self.n)


def _check_pixels(image: torch.Tensor, name: str) -> float:
    """The batch's lowest pixel, once it is checked."""
    # The same bounds as a query tensor given to the Attributor (Attributor.query_inputs).
    if image.dtype == torch.uint8 or not image.dtype.is_floating_point:
        raise ValueError(f"{name}: images of dtype {image.dtype}; give float pixels in [-1, 1] "
                         "(from 0..255: x / 127.5 - 1)")
    if not bool(torch.isfinite(image).all()):
        raise ValueError(f"{name}: images hold NaN or inf")
    low, high = float(image.min()), float(image.max())
    if low < -1 - 1e-3 or high > 1 + 1e-3:
        raise ValueError(f"{name}: pixels must lie in [-1, 1]; a batch spans [{low:.4g}, {high:.4g}] "
                         "(from [0, 1]: 2 * x - 1; from 0..255: x / 127.5 - 1)")
    return low


def _rows(loader: Iterable, name: str = "loader") -> Iterable[tuple[torch.Tensor, list]]:
    """(pixels [B, C, H, W], one caption or list of captions per image) per batch, checked."""
    if type(getattr(loader, "sampler", None)).__name__ == "RandomSampler":
        warnings.warn(f"{name}: the loader shuffles; rows are numbered (and their noise keyed) in the order it "
                      "yields them, which the next pass changes: give shuffle=False", UserWarning, stacklevel=3)
    low = 0.0
    for batch in loader:
        if isinstance(batch, dict):
            image, text = batch.get("image"), batch.get("text")
        elif isinstance(batch, (tuple, list)) and len(batch) == 2:
            image, text = batch
        else:
            raise ValueError(f"{name}: batches must be {{'image': tensor, 'text': [...]}} dicts or (image, text) "
                             "tuples")
        if not isinstance(image, torch.Tensor) or image.dim() != 4:
            raise ValueError(f"{name}: 'image' must be a [B, C, H, W] tensor of pixels in [-1, 1]")
        low = min(low, _check_pixels(image, name))
        text = [text] if isinstance(text, str) else list(text)
        b = image.shape[0]
        if text and all(isinstance(t, tuple) and len(t) == b and all(isinstance(c, str) for c in t) for t in text):
            if len(text) == b and b > 1:
                warnings.warn(f"{name}: a batch of {b} images with {b} tuples of {b} captions is read as PyTorch's "
                              "default collate lays captions out (tuple k: caption k of every image); give each "
                              "image's captions as a list to have them read per image", UserWarning, stacklevel=3)
            # default_collate of per-image caption lists: caption k of every image; back to captions per image.
            text = [list(caps) for caps in zip(*text)]
        if len(text) != b:
            raise ValueError(f"{name}: a batch has {image.shape[0]} images but {len(text)} texts")
        for caps in text:
            if not isinstance(caps, str) and not (isinstance(caps, (list, tuple))
                                                  and all(isinstance(c, str) for c in caps)):
                raise ValueError(f"{name}: a text is {type(caps).__name__}; give each image a caption (str) or a "
                                 "list of captions")
        yield image, text
    if low >= 0:
        warnings.warn(f"{name}: no pixel is below 0: pixels are read in [-1, 1], so images in [0, 1] (2 * x - 1) "
                      "are read as grey to white", UserWarning, stacklevel=3)


def collect(model: DiffusionModel, loader: Iterable, name: str = "loader") -> ArrayData:
    """Encode a loader's images (and flips) and captions, in memory."""
    inputs, states, counts = [], [], []
    for image, text in _rows(loader, name):
        if tuple(image.shape[1:]) != tuple(model.image_shape):
            raise ValueError(f"{name}: images are {tuple(image.shape[1:])}, the model makes {model.image_shape}")
        enc = model.encode_images(torch.cat([image, image.flip(-1)])).float().cpu()
        n = image.shape[0]
        inputs.append(torch.stack([enc[:n], enc[n:]], dim=1).numpy())
        for caps in text:
            caps = [caps] if isinstance(caps, str) else list(caps)
            if not caps:
                raise ValueError(f"{name}: an image has no caption")
            states.append(model.encode_text(caps).float().cpu().numpy())
            counts.append(len(caps))
    if not inputs:
        raise ValueError(f"{name}: yielded no data")
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return ArrayData(np.concatenate(inputs), np.concatenate(states), offsets, model.encoders_id())


class DattriAttributor:
    """Attribution by unlearning behind dattri's ``cache`` / ``attribute`` interface."""

    def __init__(self, model: DiffusionModel | str | os.PathLike, *, plan: ScoringPlan | None = None,
                 config: UnlearnConfig | None = None, weights: str = "kv", fisher_samples: int | None = None,
                 reduce: str = "max", batch_size: int = 256, backend: str = "auto", progress: bool = False):
        self.model = model if isinstance(model, DiffusionModel) else DiffusionModel.load(model)
        self.plan = plan or ScoringPlan()
        self.config = config or UnlearnConfig()
        self.names = select(self.model.unet, weights)
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce: {reduce!r} is not one of {list(REDUCTIONS)}")
        if fisher_samples is not None and (isinstance(fisher_samples, bool) or not isinstance(fisher_samples, int)
                                           or fisher_samples < 1):
            raise ValueError(f"fisher_samples: {fisher_samples!r} must be an int >= 1 (or None: five epochs)")
        self.fisher_samples, self.reduce = fisher_samples, reduce
        self.batch_size, self.backend, self.progress = batch_size, backend, progress
        self.fisher: dict[str, torch.Tensor] | None = None
        self.n_train: int | None = None

    def cache(self, full_train_dataloader: Iterable) -> None:
        """The Fisher of the full training data (the unlearning's regulariser)."""
        data = collect(self.model, full_train_dataloader, "full_train_dataloader")
        self.n_train = data.n
        samples = 5 * data.n if self.fisher_samples is None else self.fisher_samples
        self.fisher = compute_fisher(self.model, data, self.names, samples=samples, flips=self.plan.flips,
                                     captions=self.plan.captions, backend=self.backend, progress=self.progress)

    def attribute(self, train_dataloader: Iterable, test_dataloader: Iterable) -> torch.Tensor:
        """Scores [n_train, n_test]: the rise of each training row's loss when each test row is unlearned."""
        if self.config.method == "newton" and self.fisher is None:
            raise ValueError("cache: call cache(full_train_dataloader) first; the Newton step needs the Fisher")
        train = collect(self.model, train_dataloader, "train_dataloader")
        variants = []
        for image, prompts in _rows(test_dataloader, "test_dataloader"):
            if tuple(image.shape[1:]) != tuple(self.model.image_shape):
                raise ValueError(f"test_dataloader: images are {tuple(image.shape[1:])}, the model makes "
                                 f"{self.model.image_shape}")
            for img, prompt in zip(image, prompts):
                if not isinstance(prompt, str):
                    raise ValueError(f"test_dataloader: a test row has {len(prompt)} texts; give each query its one "
                                     "prompt (a str)")
                _check_prompt(prompt)
                x0 = self.model.encode_images(img[None])[0].float()
                ctx = self.model.encode_text([prompt])[0]
                variants.append(unlearn(self.model, self.names, self.fisher, x0, ctx, self.config,
                                        self.n_train or train.n, backend=self.backend))
        sweep = LossSweep(self.model, train, self.plan, batch_size=self.batch_size, backend=self.backend)
        losses = sweep.run([None] + variants, progress=self.progress)
        tau = losses[1:] - losses[0][None]
        scores = tau.max(axis=2) if self.reduce == "max" else tau.mean(axis=2)
        return torch.from_numpy(scores.T.copy())
