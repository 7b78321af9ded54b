"""Per-image diffusion losses under a scoring plan: the sweep every score is made of.

A batch of images is expanded into rows (image x version x caption x timestep),
noised once through the fused kernel, and run through the UNet once per model
variant (the original weights, or the unlearned weights of one or more queries),
so several queries share the loading and noising of the data.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import kernels
from . import params
from .data import PreparedData
from .model import DiffusionModel
from .plan import ScoringPlan


# UNet precision of a sweep: scores are small differences of two losses, so this matters
# (see benchmarks/RESULTS.md, "Precision").
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Rows:
    """The expanded rows of one batch of images."""
    image: torch.Tensor      # position of the row's image within the batch
    version: torch.Tensor    # 0 = as is, 1 = horizontally flipped
    text_row: torch.Tensor   # row into the batch's encoder states
    timestep: torch.Tensor
    sample_id: torch.Tensor  # the image's id in the training set: keys the noise
    draw_id: torch.Tensor

    def __len__(self) -> int:
        return self.image.shape[0]


def expand_rows(ids: np.ndarray, caption_counts: Sequence[int], plan: ScoringPlan) -> Rows:
    """Rows ordered image-major, then version, caption, timestep (vectorised: no loop per image)."""
    caps = torch.as_tensor(list(caption_counts), dtype=torch.int64)
    n_t, n_v = len(plan.timesteps), plan.versions
    per_image = n_v * caps * n_t
    image = torch.repeat_interleave(torch.arange(len(caps)), per_image)
    start = torch.cumsum(per_image, 0) - per_image
    local = torch.arange(int(per_image.sum())) - start[image]
    span = caps[image] * n_t
    version = local // span
    caption = (local // n_t) % caps[image]
    timestep = torch.tensor(plan.timesteps, dtype=torch.int64)[local % n_t]
    text_base = torch.cumsum(caps, 0) - caps
    return Rows(image, version, text_base[image] + caption, timestep,
                torch.as_tensor(np.asarray(ids, dtype=np.int64))[image],
                ScoringPlan.draw_id(version, caption, timestep))


class LossSweep:
    """Computes per-(image, version) losses under `plan` for one or more weight variants."""

    def __init__(self, model: DiffusionModel, data: PreparedData, plan: ScoringPlan, *,
                 batch_size: int = 256, backend: str = "auto", precision: str = "fp32"):
        if data.model_id != model.encoders_id():
            raise ValueError("cache: the prepared data was made with another tokenizer, text encoder or VAE "
                             "than this model's; prepare again for this model")
        if tuple(data.input_shape) != tuple(model.input_shape):
            raise ValueError(f"cache: prepared inputs have shape {data.input_shape}, the UNet takes "
                             f"{model.input_shape}; prepare again for this model")
        plan.check_model(model.num_train_timesteps)
        if batch_size < 1:
            raise ValueError(f"batch_size: {batch_size} must be >= 1")
        if precision not in PRECISIONS:
            raise ValueError(f"precision: {precision!r} is not one of {list(PRECISIONS)}")
        self.precision = precision
        self.model, self.data, self.plan = model, data, plan
        self.batch_size = batch_size
        self.backend = backend
        self.acp = model.alphas_cumprod.to(model.device)

    def _autocast(self):
        """Mixed precision for the UNet only; noising and the loss stay in float32 (the kernels)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.model.device.type, dtype=dtype)

    def rows_per_image(self, caption_count: int) -> int:
        return self.plan.versions * caption_count * len(self.plan.timesteps)

    def image_batches(self, indices: np.ndarray) -> list[np.ndarray]:
        """Split the image ids so that each batch expands to about `batch_size` rows (at least one image)."""
        caps = 1 if self.plan.captions == "first" else None
        out, cur, rows = [], [], 0
        for i in indices:
            r = self.rows_per_image(caps or self.data.n_captions(int(i)))
            if cur and rows + r > self.batch_size:
                out.append(np.asarray(cur))
                cur, rows = [], 0
            cur.append(int(i))
            rows += r
        if cur:
            out.append(np.asarray(cur))
        return out

    @torch.inference_mode()
    def batch_losses(self, ids: np.ndarray, variants: Sequence[dict[str, torch.Tensor] | None]) -> torch.Tensor:
        """[len(variants), len(ids), versions] float64 mean losses of one batch of images."""
        m, dev = self.model, self.model.device
        inputs = self.data.inputs(ids)[:, :self.plan.versions]
        text, counts = self.data.text(ids, self.plan.captions)
        rows = expand_rows(ids, counts, self.plan)
        dtype = next(m.unet.parameters()).dtype
        x0 = inputs[rows.image, rows.version].to(dev)
        ctx = text[rows.text_row].to(dev, dtype)
        ts = rows.timestep.to(dev)
        sids, dids = rows.sample_id.to(dev), rows.draw_id.to(dev)
        x_t = kernels.add_noise(x0, ts, self.acp, self.plan.seed, sids, dids, backend=self.backend).to(dtype)
        group = (rows.image * self.plan.versions + rows.version).to(dev)
        n_groups = len(ids) * self.plan.versions
        out = torch.empty(len(variants), len(ids), self.plan.versions, dtype=torch.float64)
        for v, weights in enumerate(variants):
            with params.swapped(m.unet, weights):
                losses = torch.empty(len(rows), dtype=torch.float32, device=dev)
                for lo in range(0, len(rows), self.batch_size):
                    hi = min(len(rows), lo + self.batch_size)
                    with self._autocast():
                        pred = m.unet(x_t[lo:hi], ts[lo:hi], encoder_hidden_states=ctx[lo:hi]).sample
                    losses[lo:hi] = kernels.diffusion_loss(pred, x0[lo:hi], ts[lo:hi], self.acp, self.plan.seed,
                                                           sids[lo:hi], dids[lo:hi],
                                                           prediction_type=m.prediction_type, backend=self.backend)
            sums = torch.zeros(n_groups, dtype=torch.float64, device=dev).index_add_(0, group, losses.double())
            cnt = torch.bincount(group, minlength=n_groups).double()
            out[v] = (sums / cnt).view(len(ids), self.plan.versions).cpu()
        return out

    def run(self, variants: Sequence[dict[str, torch.Tensor] | None], indices: np.ndarray | None = None, *,
            progress: bool = True, desc: str = "score") -> np.ndarray:
        """[len(variants), len(indices), versions] float64 losses."""
        from tqdm.auto import tqdm

        indices = np.arange(self.data.n) if indices is None else np.asarray(indices, dtype=np.int64)
        out = np.empty((len(variants), len(indices), self.plan.versions), dtype=np.float64)
        pos = 0
        with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress) as bar:
            for ids in self.image_batches(indices):
                out[:, pos:pos + len(ids)] = self.batch_losses(ids, variants).numpy()
                pos += len(ids)
                bar.update(len(ids))
        return out
