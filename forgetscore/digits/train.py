"""Training recipe for the digits model, built for exact leave-K-out retraining.

Why it looks like this
----------------------
A counterfactual evaluation retrains the model without K training images and
compares it with the original.  At this scale retraining noise (different data
order, noise, timesteps) is as large as the effect being measured, so every
random choice is *coupled* between the original run and the retrain:

* All randomness is keyed on (seed, image id, epoch) through the counter-based
  generator of :mod:`forgetscore.kernels` (Philox keyed by seed, sample id =
  image id, draw id = ``epoch * 16 + purpose``): the epoch's data order (images
  sorted by a 64-bit hash), each example's timestep, its noise, which of its
  captions it uses and whether the caption is dropped.  None of it depends on
  the batch or on which other images are present.
* Fixed batch slots: each epoch's order over the FULL data set is cut into
  ``ceil(N / batch_size)`` slots of near-equal size (slot k holds positions
  ``[k*N // S, (k+1)*N // S)``; with N = 1797 and batch 128 that is 15 slots of
  119-120 images, instead of 14 x 128 plus a runt of 5).  ``exclude_ids`` only
  removes images from their slots.  The loss of a slot is the *sum* of its
  examples' losses divided by the slot's full size, so each remaining example
  contributes exactly the gradient it contributed in the full run.  An empty slot
  still takes an optimizer step (zero gradient), keeping the schedule aligned.
* Removing nothing reproduces the model bit for bit: model init from a fixed
  seed, deterministic CPU kernels, a fixed thread count (``recipe.threads``) and
  no other randomness.  (Bits can differ across machines, thread counts or torch
  versions; the coupling itself does not.)

The optimisation itself: AdamW, linear warm-up then cosine decay, gradient norm
clipping, 10 % caption dropout (the empty caption) for classifier-free guidance,
text encoder trained jointly with the UNet.  What was measured on two CPU cores:

* The model learns to denoise first and to follow the caption late: after 150
  updates samples ignore the prompt entirely, whatever the guidance.  The number
  of *updates* matters more than the number of epochs, and a step's cost grows
  nearly in proportion to the batch, so small batches (32) win.  Measured on the
  earlier 32/64-channel model: 10 epochs at batch 32 (570 updates) followed the
  prompt better (88 % vs 84 %) than 20 epochs at batch 128 (300 updates).
* One thread per training run (``recipe.threads = 1``).  Two threads are ~1.5x
  faster on an idle machine but many times slower when anything else runs
  (OpenMP barriers spin), and a leave-K-out evaluation is better served by
  running one single-threaded retrain per core.  The thread count is part of the
  recipe because results are only bit-exact for a fixed count.
* Fused AdamW (the per-tensor optimizer was 12 % of a step) and plain attention
  while training (at 16 tokens the math path beats the CPU flash kernel).

Presets (:data:`RECIPES`), measured with one thread on a 2-core machine that
other jobs were also using heavily (load ~8; CPU seconds):

* ``default``: 12 epochs, batch 32, lr 3e-3, 684 updates, 36 CPU-s (an idle core
  takes ~23 s); 93 % of 200 samples classified as the prompted digit (guidance
  1.5, 25 DDIM steps); the attribute words move ink mass (302 vs 367 for thin vs
  thick), slant and width the right way.  Same model at 10 epochs: 86 %, the
  thickness words barely work (333 vs 338); at 8 epochs 59 %.
* ``smoke``: one epoch at batch 128; not a usable model, for end-to-end checks.

The default model is cached under ``$FORGETSCORE_CACHE`` (else
``~/.cache/forgetscore``) in ``digits-<recipe hash>``; it is trained on first
use and loaded afterwards.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

from ..cache import cache_root
from ..threads import torch_threads
from ..kernels import reference as _rng
from .data import DigitsData, NUM_CAPTIONS, load_data
from .model import DigitsModel, ModelConfig, build_model, is_model_dir, save_model
from .tokenizer import encode

RECIPE_VERSION = 2  # 2: fused AdamW, plain attention while training, uncoupled mode
DRAWS_PER_EPOCH = 16
PURPOSE_ORDER, PURPOSE_TIMESTEP, PURPOSE_NOISE, PURPOSE_CAPTION, PURPOSE_DROPOUT = range(5)


@dataclass(frozen=True)
class TrainRecipe:
    seed: int = 0
    init_seed: int = 0
    epochs: int = 12
    batch_size: int = 32
    lr: float = 3e-3
    warmup_frac: float = 0.05
    final_lr_frac: float = 0.0
    weight_decay: float = 0.01
    adam_betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0
    caption_dropout: float = 0.1
    train_text_encoder: bool = True
    threads: int = 1
    model: ModelConfig = field(default_factory=ModelConfig)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["adam_betas"] = list(self.adam_betas)
        d["model"] = self.model.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainRecipe":
        d = dict(d)
        d["model"] = ModelConfig.from_dict(d.get("model", {}))
        if "adam_betas" in d:
            d["adam_betas"] = tuple(d["adam_betas"])
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def hash(self) -> str:
        blob = json.dumps({"v": RECIPE_VERSION, "recipe": self.to_dict()}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]


RECIPES: dict[str, TrainRecipe] = {
    "default": TrainRecipe(),
    # Not a usable model: one epoch in a few seconds, for checking that a pipeline runs end to end.
    "smoke": TrainRecipe(epochs=1, batch_size=128),
}


def get_recipe(recipe: str | TrainRecipe | None) -> TrainRecipe:
    if recipe is None:
        return RECIPES["default"]
    if isinstance(recipe, TrainRecipe):
        return recipe
    try:
        return RECIPES[recipe]
    except KeyError:
        raise ValueError(f"unknown recipe {recipe!r}; known: {sorted(RECIPES)}") from None


# ----------------------------------------------------------------------------------------
# Coupled randomness


def draw_id(epoch: int, purpose: int) -> int:
    return epoch * DRAWS_PER_EPOCH + purpose


def _draws(epoch: int, purpose: int, n: int) -> torch.Tensor:
    return torch.full((n,), draw_id(epoch, purpose), dtype=torch.int64)


def epoch_order(seed: int, epoch: int, ids: torch.Tensor) -> torch.Tensor:
    """The epoch's order of ``ids`` (sorted by a 63-bit hash of (seed, epoch, id))."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    bits = _rng.random_bits(seed, ids, _draws(epoch, PURPOSE_ORDER, len(ids)), 2)
    key = (bits[:, 0] << 31) | (bits[:, 1] >> 1)
    order = torch.sort(key, stable=True).indices
    return ids[order]


def slot_bounds(n_total: int, batch_size: int) -> list[tuple[int, int]]:
    """Positions [start, end) of each batch slot in an epoch's order of the full set."""
    n_slots = max(1, math.ceil(n_total / batch_size))
    return [(k * n_total // n_slots, (k + 1) * n_total // n_slots) for k in range(n_slots)]


@dataclass(frozen=True)
class ExampleDraws:
    timesteps: torch.Tensor   # int64 [B] in [0, num_train_timesteps)
    noise: torch.Tensor       # float32 [B, D]
    caption_index: torch.Tensor  # int64 [B] in [0, NUM_CAPTIONS)
    dropped: torch.Tensor     # bool [B]: caption replaced by the empty caption


def example_draws(seed: int, epoch: int, ids: torch.Tensor, numel: int, num_train_timesteps: int = 1000,
                  caption_dropout: float = 0.1, num_captions: int = NUM_CAPTIONS) -> ExampleDraws:
    """Per-example random choices, functions of (seed, epoch, image id) only."""
    ids = torch.as_tensor(ids, dtype=torch.int64)
    n = len(ids)
    t_bits = _rng.random_bits(seed, ids, _draws(epoch, PURPOSE_TIMESTEP, n), 1)[:, 0]
    timesteps = (t_bits * num_train_timesteps) >> 32
    noise = _rng.normal(seed, ids, _draws(epoch, PURPOSE_NOISE, n), numel)
    c_bits = _rng.random_bits(seed, ids, _draws(epoch, PURPOSE_CAPTION, n), 1)[:, 0]
    caption_index = (c_bits * num_captions) >> 32
    d_bits = _rng.random_bits(seed, ids, _draws(epoch, PURPOSE_DROPOUT, n), 1)[:, 0]
    dropped = _rng.bits_to_uniform(d_bits) < caption_dropout
    return ExampleDraws(timesteps, noise, caption_index, dropped)


@dataclass(frozen=True)
class Slot:
    step: int
    epoch: int
    ids: torch.Tensor      # image ids present in this slot (exclusions removed), epoch order
    full_size: int         # the slot's size over the full data set (loss normaliser)


def batch_plan(recipe: TrainRecipe, ids: torch.Tensor | int, exclude_ids: Iterable[int] | None = None):
    """Yield the :class:`Slot` of every optimizer step, in order.

    ``ids``: the image ids of the full training set (or ``N``, meaning ``0..N-1``).
    """
    ids = torch.arange(ids, dtype=torch.int64) if isinstance(ids, int) else torch.as_tensor(ids, dtype=torch.int64)
    ex = torch.as_tensor(sorted({int(i) for i in exclude_ids}) if exclude_ids is not None else [],
                         dtype=torch.int64)
    if len(ex) and not bool(torch.isin(ex, ids).all()):
        raise ValueError("exclude_ids contains ids that are not in the training set")
    bounds = slot_bounds(len(ids), recipe.batch_size)
    step = 0
    for epoch in range(recipe.epochs):
        order = epoch_order(recipe.seed, epoch, ids)
        keep = ~torch.isin(order, ex)
        for start, end in bounds:
            yield Slot(step, epoch, order[start:end][keep[start:end]], end - start)
            step += 1


def num_steps(recipe: TrainRecipe, n_total: int) -> int:
    return recipe.epochs * len(slot_bounds(n_total, recipe.batch_size))


def coupled_steps(recipe: TrainRecipe, ids: torch.Tensor, exclude_ids: Iterable[int], numel: int,
                  num_train_timesteps: int):
    """(slot, draws) of every optimizer step with coupled randomness (draws None for an empty slot)."""
    for slot in batch_plan(recipe, ids, exclude_ids):
        draws = (example_draws(recipe.seed, slot.epoch, slot.ids, numel, num_train_timesteps,
                               recipe.caption_dropout) if len(slot.ids) else None)
        yield slot, draws


def uncoupled_steps(recipe: TrainRecipe, ids: torch.Tensor, exclude_ids: Iterable[int], numel: int,
                    num_train_timesteps: int):
    """(slot, draws) the usual way: one generator seeded with the seed, consumed in order.

    Shuffles the remaining images each epoch, cuts consecutive batches, draws each
    batch's timesteps, noise, captions and dropout in turn.  Removing an image shifts
    every later batch and draw, so a retrain "with the same seed" differs from the
    original run everywhere; kept to measure what coupling buys.
    """
    ids = torch.as_tensor(ids, dtype=torch.int64)
    keep = ids[~torch.isin(ids, torch.as_tensor(sorted(exclude_ids), dtype=torch.int64))]
    g = torch.Generator().manual_seed(recipe.seed)
    step = 0
    for epoch in range(recipe.epochs):
        order = keep[torch.randperm(len(keep), generator=g)]
        for lo in range(0, len(order), recipe.batch_size):
            batch = order[lo:lo + recipe.batch_size]
            n = len(batch)
            draws = ExampleDraws(torch.randint(num_train_timesteps, (n,), generator=g),
                                 torch.randn(n, numel, generator=g),
                                 torch.randint(NUM_CAPTIONS, (n,), generator=g),
                                 torch.rand(n, generator=g) < recipe.caption_dropout)
            yield Slot(step, epoch, batch, n), draws
            step += 1


def lr_factor(step: int, total: int, warmup_frac: float, final_frac: float = 0.0) -> float:
    warm = max(1, round(warmup_frac * total))
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return final_frac + (1.0 - final_frac) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))




# ----------------------------------------------------------------------------------------
# Training


def caption_tokens(model: DigitsModel, data: DigitsData) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids of every caption [N, NUM_CAPTIONS, L] and of the empty caption [L]."""
    flat = [c for caps in data.captions for c in caps]
    tokens = encode(model.tokenizer, flat, model.config.max_length).view(len(data), NUM_CAPTIONS, -1)
    empty = encode(model.tokenizer, [""], model.config.max_length)[0]
    return tokens, empty


def train(recipe: str | TrainRecipe | None = None, out_dir: str | os.PathLike | None = None,
          exclude_ids: Iterable[int] | None = None, data: DigitsData | None = None,
          log: Callable[[str], None] | None = None, log_every: int = 100, coupled: bool = True) -> DigitsModel:
    """Train a model with ``recipe`` on the digits, leaving out ``exclude_ids``.

    ``coupled=False`` draws the randomness the usual way (:func:`uncoupled_steps`).
    Returns the model (eval mode); also saves it to ``out_dir`` if given.
    """
    recipe = get_recipe(recipe)
    data = data if data is not None else load_data(recipe.model.resolution)
    n_total = len(data)
    exclude = sorted({int(i) for i in exclude_ids}) if exclude_ids is not None else []
    model = build_model(recipe.model, recipe.init_seed)
    unet, text_encoder = model.unet, model.text_encoder
    tokens, empty = caption_tokens(model, data)
    x_all = data.images.reshape(n_total, -1)
    row_of = torch.full((int(data.ids.max()) + 1,), -1, dtype=torch.int64)
    row_of[data.ids] = torch.arange(n_total)
    shape = data.images.shape[1:]
    alphas = model.scheduler.alphas_cumprod
    T = model.scheduler.config.num_train_timesteps

    params = list(unet.parameters())
    if recipe.train_text_encoder:
        params += list(text_encoder.parameters())
    else:
        text_encoder.requires_grad_(False)
    # Fused AdamW: one kernel instead of ~10 per tensor (the optimizer was 12 % of a step).
    opt = torch.optim.AdamW(params, lr=recipe.lr, betas=recipe.adam_betas, weight_decay=recipe.weight_decay,
                            fused=True)
    # Plain attention: at 16 tokens the math path beats the CPU flash kernel; training only.
    from diffusers.models.attention_processor import AttnProcessor

    unet.set_attn_processor(AttnProcessor())
    numel = x_all.shape[1]
    if coupled:
        total = num_steps(recipe, n_total)
        steps = coupled_steps(recipe, data.ids, exclude, numel, T)
    else:
        n_keep = n_total - len(exclude)
        total = recipe.epochs * math.ceil(n_keep / recipe.batch_size)
        steps = uncoupled_steps(recipe, data.ids, exclude, numel, T)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: lr_factor(s, total, recipe.warmup_frac, recipe.final_lr_frac))

    unet.train()
    text_encoder.train(recipe.train_text_encoder)
    t0, c0 = time.perf_counter(), time.process_time()
    running, seen = 0.0, 0
    with torch_threads(recipe.threads):
        for slot, dr in steps:
            opt.zero_grad(set_to_none=False)
            ids = slot.ids
            rows = row_of[ids]
            if len(ids):
                tok = tokens[rows, dr.caption_index]
                tok = torch.where(dr.dropped[:, None], empty[None, :], tok)
                with torch.set_grad_enabled(recipe.train_text_encoder):
                    enc = text_encoder(tok).last_hidden_state
                a, b = _rng.noise_coefficients(alphas, dr.timesteps)
                x_t = (a[:, None] * x_all[rows] + b[:, None] * dr.noise).view(len(ids), *shape)
                pred = unet(x_t, dr.timesteps, enc).sample
                per_example = (pred.reshape(len(ids), -1) - dr.noise).square().mean(dim=1)
                loss = per_example.sum() / slot.full_size
                loss.backward()
                if recipe.grad_clip:
                    torch.nn.utils.clip_grad_norm_(params, recipe.grad_clip)
                running += float(per_example.detach().sum())
                seen += len(ids)
            opt.step()
            sched.step()
            if log is not None and ((slot.step + 1) % log_every == 0 or slot.step + 1 == total):
                log(f"step {slot.step + 1}/{total} epoch {slot.epoch} loss {running / max(seen, 1):.4f} "
                    f"{time.perf_counter() - t0:.1f}s")
                running, seen = 0.0, 0
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0
    model.eval()
    model.info.update({
        "recipe": recipe.to_dict(), "recipe_hash": recipe.hash(), "excluded_ids": exclude, "coupled": coupled,
        "train_seconds": round(elapsed, 2), "train_cpu_seconds": round(cpu, 2), "steps": total, "n_train": n_total - len(exclude),
        "torch": torch.__version__, "dataset": "sklearn.datasets.load_digits",
    })
    if out_dir is not None:
        save_model(model, out_dir)
    return model


# ----------------------------------------------------------------------------------------
# Cache


def default_model_dir(recipe: str | TrainRecipe | None = None) -> Path:
    r = get_recipe(recipe)
    return cache_root() / f"digits-{r.hash()}"


def ensure_model(recipe: str | TrainRecipe | None = None, log: Callable[[str], None] | None = None) -> Path:
    """The cached model directory for ``recipe``, training it on first use."""
    path = default_model_dir(recipe)
    if not is_model_dir(path):
        if log is not None:
            log(f"training the digits model ({get_recipe(recipe).epochs} epochs) into {path}")
        train(recipe, out_dir=path, log=log)
    return path


def load_default_model(recipe: str | TrainRecipe | None = None, log: Callable[[str], None] | None = None):
    from .model import load_model

    return load_model(ensure_model(recipe, log))
