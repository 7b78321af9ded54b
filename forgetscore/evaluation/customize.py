"""Custom-Diffusion-style fine-tuning of a model on a few exemplars of a new concept.

Custom Diffusion's recipe: a new token is added to the tokenizer and only the cross-attention
key/value projections (``attn2.to_k``, ``attn2.to_v``) and the new token's embedding row move;
every other weight, including every other embedding row, stays bit-identical (the gradient
of the other rows is zeroed and Adam has no weight decay, so they cannot move; they are also
copied back before saving, as a guarantee).  Loss: the model's own diffusion loss (epsilon or
v prediction) at uniformly random timesteps, with noise, timesteps and exemplar/caption
choices drawn from one seeded ``torch.Generator`` -- the same call gives the same weights.
Regularisation (Custom Diffusion's prior preservation): with ``reg_dir`` and
``reg_per_step > 0``, every step also draws that many images of an image folder (here the
training set, with their own captions) and adds their mean loss with weight 1, so the
K/V change that teaches the token does not redraw what the old words mean.  Custom Diffusion
retrieves 200 captioned LAION images for this; our training set plays that role.
The result is saved atomically (a temporary folder renamed into place) with
``customization.json`` recording the settings, the loss curve and the time taken.
"""
from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ..attribution import params
from ..attribution.data import TrainingSet
from ..attribution.io import write_dir, write_json
from ..attribution.model import DiffusionModel, quiet_loading

Log = Callable[[str], None]

DEFAULT_TOKEN = "<new1>"
CUSTOMIZATION_FILE = "customization.json"
CARRIED_FILES = ("forgetscore.json", "model_index.json")  # model-level files that describe the architecture


def _check_exemplars(exemplars: torch.Tensor, captions: Sequence, token: str) -> list[list[str]]:
    if not isinstance(exemplars, torch.Tensor) or exemplars.dim() != 4 or len(exemplars) == 0:
        raise ValueError(f"exemplars: need a tensor [n, C, H, W] with n >= 1, got "
                         f"{tuple(exemplars.shape) if isinstance(exemplars, torch.Tensor) else type(exemplars).__name__}")
    if not bool(torch.isfinite(exemplars).all()) or float(exemplars.min()) < -1 or float(exemplars.max()) > 1:
        raise ValueError("exemplars: values must be finite and in [-1, 1] (pixels x / 127.5 - 1)")
    caps = [[c] if isinstance(c, str) else list(c) for c in captions]
    if len(caps) != len(exemplars):
        raise ValueError(f"captions: {len(caps)} for {len(exemplars)} exemplars; give one caption (or list) each")
    for i, cs in enumerate(caps):
        if not cs or not all(isinstance(c, str) and token in c for c in cs):
            raise ValueError(f"captions: exemplar {i} has {cs!r}; every caption must contain the token {token!r}")
    return caps


def _token_ids(tokenizer, texts: Sequence[str]) -> torch.Tensor:
    return tokenizer(list(texts), padding="max_length", truncation=True, max_length=tokenizer.model_max_length,
                     return_tensors="pt").input_ids


def _add_token(model: DiffusionModel, token: str, init_word: str | None) -> tuple[int, int]:
    """Add `token` to the tokenizer and a row to the text encoder's embeddings; (old vocab size, new id)."""
    tok, te = model.tokenizer, model.text_encoder
    if not token or token.strip() != token or " " in token:
        raise ValueError(f"token: {token!r} must be one non-empty word without spaces, like '<new1>'")
    if token in tok.get_vocab():
        raise ValueError(f"token: {token!r} is already in the model's vocabulary; choose a new one like '<new2>'")
    emb = te.get_input_embeddings().weight
    n_old = int(emb.shape[0])
    if len(tok) != n_old:
        raise ValueError(f"model: the tokenizer has {len(tok)} tokens but the text encoder {n_old} embeddings; "
                         "customize a model whose tokenizer and text encoder match")
    init_row = None
    if init_word is not None:
        ids = tok(init_word, add_special_tokens=False).input_ids
        if len(ids) != 1 or (tok.unk_token_id is not None and ids[0] == tok.unk_token_id):
            raise ValueError(f"init_word: {init_word!r} is not a single known token of the vocabulary "
                             f"(tokenizes to {ids}); pass one word the tokenizer knows, or None for the mean")
        init_row = emb[ids[0]].detach().clone()
    tok.add_tokens([token])
    new_id = int(tok.convert_tokens_to_ids(token))
    if new_id != n_old:
        raise ValueError(f"token: was given id {new_id}, expected {n_old} (the next free id); the tokenizer has "
                         "holes in its vocabulary, which customize does not handle")
    te.resize_token_embeddings(len(tok), mean_resizing=False)
    with torch.no_grad():
        weight = te.get_input_embeddings().weight
        weight[new_id] = init_row if init_row is not None else weight[:n_old].mean(0)
    return n_old, new_id


def _noisy(model: DiffusionModel, x0: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor]:
    """(x_t, t, target) for the model's prediction type, with t and noise from `g`."""
    n = x0.shape[0]
    t = torch.randint(0, model.num_train_timesteps, (n,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    acp = model.alphas_cumprod[t].float().view(-1, *([1] * (x0.dim() - 1)))
    a, b = acp.sqrt(), (1 - acp).sqrt()
    x_t = a * x0 + b * eps
    target = eps if model.prediction_type == "epsilon" else a * eps - b * x0
    return x_t, t, target


def customize(model_dir: str | Path, exemplars: torch.Tensor, captions: Sequence[str | Sequence[str]],
              out_dir: str | Path, *, token: str = DEFAULT_TOKEN, init_word: str | None = None, steps: int = 800,
              lr: float = 1e-2, embedding_lr: float | None = None, batch_size: int = 8,
              reg_dir: str | Path | None = None, reg_per_step: int = 0, seed: int = 0,
              log: Log | None = None) -> Path:
    """Fine-tune a diffusers-layout model on `exemplars` Custom-Diffusion style; save it to `out_dir`.

    exemplars: pixels [n, C, H, W] in [-1, 1] at the model's image size; captions: one caption
    (or a list) per exemplar, each containing `token`.  init_word: the word whose embedding
    the token starts from (None: the mean of all embeddings).  Each of `steps` Adam steps
    (lr for K/V, embedding_lr (default 10 x lr) for the new row) draws `batch_size` exemplars
    with replacement and, with `reg_dir`, `reg_per_step` images of that folder (module
    docstring).  The defaults are what taught the digits model its concepts; a large model
    wants far smaller rates (Custom Diffusion: 1e-5).  Returns `out_dir`.
    """
    caps = _check_exemplars(exemplars, captions, token)
    for name, v in (("steps", steps), ("batch_size", batch_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: {v!r} must be a positive integer")
    if isinstance(reg_per_step, bool) or not isinstance(reg_per_step, int) or reg_per_step < 0:
        raise ValueError(f"reg_per_step: {reg_per_step!r} must be an integer >= 0")
    if reg_per_step and reg_dir is None:
        raise ValueError("reg_dir: None but reg_per_step > 0; give the regularisation image folder or set it to 0")
    embedding_lr = 10 * lr if embedding_lr is None else embedding_lr
    for name, v in (("lr", lr), ("embedding_lr", embedding_lr)):
        if not v > 0:
            raise ValueError(f"{name}: {v!r} must be > 0")
    started = time.perf_counter()
    reg = TrainingSet.load(reg_dir) if reg_dir is not None and reg_per_step else None
    model = DiffusionModel.load(model_dir)
    if tuple(exemplars.shape[1:]) != tuple(model.image_shape):
        raise ValueError(f"exemplars: images are {tuple(exemplars.shape[1:])}, the model makes "
                         f"{model.image_shape}; resize them to the model's size")
    n_old, new_id = _add_token(model, token, init_word)
    tok, te, unet = model.tokenizer, model.text_encoder, model.unet
    cap_ids = [_token_ids(tok, cs) for cs in caps]
    unk = tok.unk_token_id
    for i, ids in enumerate(cap_ids):
        if unk is not None and bool((ids == unk).any()):
            raise ValueError(f"captions: exemplar {i} ({caps[i]!r}) has words the tokenizer does not know; they "
                             "would all share one untrained <unk> embedding: use words of the vocabulary")
        if not bool((ids == new_id).any(dim=1).all()):
            raise ValueError(f"captions: exemplar {i} ({caps[i]!r}) loses the token to truncation; shorten it")

    weight = te.get_input_embeddings().weight
    old_rows = weight[:n_old].detach().clone()
    kv_names = params.select(unet, "kv")
    ps = dict(unet.named_parameters())
    kv = [ps[n] for n in kv_names]
    for p in kv:
        p.requires_grad_(True)
    weight.requires_grad_(True)
    row_mask = torch.zeros(weight.shape[0], 1, dtype=weight.dtype)
    row_mask[new_id] = 1
    hook = weight.register_hook(lambda g: g * row_mask.to(g.device))
    opt = torch.optim.Adam([{"params": kv, "lr": lr},
                            {"params": [weight], "lr": embedding_lr}],
                           weight_decay=0.0)
    x_ex = model.encode_images(exemplars).float()
    g = torch.Generator().manual_seed(seed)
    curve, running = [], []
    try:
        for step in range(steps):
            idx = torch.randint(0, len(x_ex), (batch_size,), generator=g)
            pick = [int(torch.randint(0, len(cap_ids[int(i)]), (1,), generator=g)) for i in idx]
            ids = torch.stack([cap_ids[int(i)][c] for i, c in zip(idx, pick)])
            losses = [_batch_loss(model, x_ex[idx], ids, g)]
            if reg is not None:
                r = torch.randint(0, len(reg), (reg_per_step,), generator=g)
                pixels = torch.stack([reg.load_pixels(int(i), model.image_shape) for i in r])
                texts = [reg.captions[int(i)][int(torch.randint(0, len(reg.captions[int(i)]), (1,), generator=g))]
                         for i in r]
                losses.append(_batch_loss(model, model.encode_images(pixels).float(), _token_ids(tok, texts), g))
            loss = sum(losses)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            running.append([float(v.detach()) for v in losses])
            if (step + 1) % 25 == 0 or step + 1 == steps:
                mean = np.mean(running, axis=0).tolist()
                curve.append({"step": step + 1, "loss": mean[0], **({"reg_loss": mean[1]} if len(mean) > 1 else {})})
                running = []
                if log is not None:
                    log(f"  customize step {step + 1}/{steps} loss {mean[0]:.4f}"
                        + (f" reg {mean[1]:.4f}" if len(mean) > 1 else ""))
    finally:
        hook.remove()
        for p in kv:
            p.requires_grad_(False)
        weight.requires_grad_(False)
    with torch.no_grad():
        weight[:n_old] = old_rows  # a guarantee on top of the zeroed gradient
    info = {"token": token, "token_id": new_id, "init_word": init_word, "steps": steps, "lr": lr,
            "embedding_lr": embedding_lr, "batch_size": batch_size, "seed": seed,
            "reg_dir": None if reg is None else str(reg.root), "reg_per_step": reg_per_step if reg else 0,
            "n_exemplars": len(exemplars), "captions": caps,
            "trained": [*kv_names, f"text_encoder embedding row {new_id}"],
            "base_model": str(model_dir), "loss_curve": curve,
            "seconds": round(time.perf_counter() - started, 2)}

    def fill(tmp: Path) -> None:
        with quiet_loading():
            model.save(tmp)
        for name in CARRIED_FILES:
            if (Path(model_dir) / name).is_file():
                shutil.copy2(Path(model_dir) / name, tmp / name)
        write_json(tmp / CUSTOMIZATION_FILE, info)

    return write_dir(Path(out_dir), fill)


def _batch_loss(model: DiffusionModel, x0: torch.Tensor, ids: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    x_t, t, target = _noisy(model, x0, g)
    ctx = model.text_encoder(ids.to(model.device))[0]
    pred = model.unet(x_t.to(model.device), t.to(model.device), encoder_hidden_states=ctx).sample.float()
    return (pred - target.to(pred.device)).square().mean()
