"""Gradient baselines over the engine's selected weights: D-TRAK and first-order influence.

Both need, for every training row (image, caption, timestep, noise), the gradient of a
scalar w.r.t. the selected weights. Forming it per row would cost rows x weights
memory, so neither method does: for a linear layer y = x W^T applied to the L tokens
of a row, the row's gradient is G^T X (G: the L output gradients, X: the L inputs),
and both methods only ever need a *linear function* of it, which is computed from X
and G directly:

* D-TRAK projects it with a Kronecker matrix A (x) B, and (A (x) B) vec(G^T X) = vec((G A^T)^T (X B^T));
* influence dots it with a direction V, and <V, G^T X> = sum((X V^T) * G).

X comes from forward hooks, G from one ``autograd.grad`` of the summed row scalars
w.r.t. the hooked outputs (each row's scalar depends on its own row only, so this is
each row's own output gradient). Convolutions take their unfolded input patches as X; biases
and the weights of group and layer norms have gradients that are sums of a per-position term
over positions instead (``attribution.per_sample.gradient_terms``), so every weight preset
works, ``all`` included.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .. import kernels
from ..attribution import per_sample
from ..attribution.losses import expand_rows
from ..attribution.model import DiffusionModel
from ..attribution.plan import CAPTION_CHOICES, ScoringPlan
from ..attribution.train_loss import row_losses
from ..attribution.unlearning import UnlearnConfig, check_fisher, query_gradient
from .base import EvalContext, Query

DTRAK_STREAM = 0x4454524B        # noise of the training rows' D-TRAK features
DTRAK_QUERY_STREAM = 0x4454514B  # noise of the queries' D-TRAK features (sample id 0 for every query)
OUTPUTS = ("square", "loss")
_BUDGET = 2 ** 26  # elements of the largest temporary in the influence contraction


# --- per-row terms of each selected parameter ----------------------------------------------
def rule_layers(unet: nn.Module, names: Sequence[str]) -> dict[str, nn.Module]:
    """{module name: module} of the selected weights' layers; a ValueError if any has no per-sample rule."""
    modules = dict(unet.named_modules())
    out: dict[str, nn.Module] = {}
    bad = []
    for n in names:
        owner, _, kind = n.rpartition(".")
        mod = modules.get(owner)
        if mod is not None and kind in ("weight", "bias") and per_sample.supported(mod):
            out[owner] = mod
        else:
            bad.append(n)
    if bad:
        raise ValueError(f"weights: {bad[:3]}{'...' if len(bad) > 3 else ''} are not weights or biases of linear or "
                         "convolution layers (one group, zero padding) or of group or layer norms, the layers "
                         "the gradient baselines handle; select others")
    return out


def _matrix(unet: nn.Module, name: str) -> bool:
    """Whether the parameter's per-row gradient has the form G^T X (a linear or convolution weight)."""
    owner, _, kind = name.rpartition(".")
    return kind == "weight" and per_sample.layer_kind(unet.get_submodule(owner)) in (nn.Linear, nn.Conv2d)


class _Taps:
    """Forward hooks keeping each call's input (detached) and output (to differentiate) of some layers."""

    def __init__(self, modules: dict[str, nn.Module]):
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in modules}
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.calls[name].append((args[0].detach(), output))
        return hook

    def close(self) -> None:
        for h in self._handles:
            h.remove()


@contextmanager
def _tracking(unet: nn.Module, names: Sequence[str]) -> Iterator[None]:
    """Let the selected weights require grad (so the hooked outputs join the graph) for a while."""
    ps = dict(unet.named_parameters())
    sel = [ps[n] for n in names]
    before = [p.requires_grad for p in sel]
    for p in sel:
        p.requires_grad_(True)
    try:
        with torch.enable_grad():
            yield
    finally:
        for p, r in zip(sel, before):
            p.requires_grad_(r)


def row_output(model: DiffusionModel, x0: torch.Tensor, ctx: torch.Tensor, timesteps: torch.Tensor, seed: int,
               sample_ids: torch.Tensor, draw_ids: torch.Tensor, output: str, backend: str = "auto") -> torch.Tensor:
    """Per-row scalar [B] whose gradient is taken: the diffusion loss, or the mean of the squared output."""
    if output == "loss":
        return row_losses(model, x0, ctx, timesteps, seed, sample_ids, draw_ids, backend=backend)
    acp = model.alphas_cumprod.to(x0.device)
    dtype = next(model.unet.parameters()).dtype
    x_t = kernels.add_noise(x0, timesteps, acp, seed, sample_ids, draw_ids, backend=backend)
    pred = model.unet(x_t.to(dtype), timesteps, encoder_hidden_states=ctx.to(dtype)).sample.float()
    return pred.square().flatten(1).mean(1)


def _row_terms(model: DiffusionModel, modules: dict[str, nn.Module], names: Sequence[str], x0: torch.Tensor,
               ctx: torch.Tensor, timesteps: torch.Tensor, seed: int, sample_ids: torch.Tensor,
               draw_ids: torch.Tensor, output: str, backend: str
               ) -> Iterator[tuple[str, torch.Tensor | None, torch.Tensor, slice]]:
    """(parameter name, X, G, rows) for each call of each selected parameter's layer, for the `rows` of a
    batch of R rows (float32), in the forms of ``per_sample.gradient_terms``: a row's gradient is G^T X, or
    with X None the sum of G over positions (a parameter's gradient sums its layer's calls). Made one layer
    call at a time, and a convolution's for a few rows at a time (``per_sample.rows_per_slice``), so that
    unfolded patches live only while their consumer uses them and stay under ``per_sample.PATCH_BYTES``."""
    taps = _Taps(modules)
    try:
        f = row_output(model, x0, ctx, timesteps, seed, sample_ids, draw_ids, output, backend)
    finally:
        taps.close()
    flat = [(n, x, y) for n, calls in taps.calls.items() for x, y in calls]
    grads = torch.autograd.grad(f.sum(), [y for _, _, y in flat], allow_unused=True)
    r, wanted = x0.shape[0], set(names)
    for (owner, x, _), g in zip(flat, grads):
        if g is None:
            continue
        mod = modules[owner]
        # float32 patches: the terms are made in float32 whatever the UNet's dtype.
        step = per_sample.rows_per_slice(mod, [(x, g)], r, 4) if f"{owner}.weight" in wanted else r
        for lo in range(0, r, step):
            rows = slice(lo, min(r, lo + step))
            # (Sliced only when needed: a linear layer's input may be [R * L, d] rather than [R, L, d].)
            xr, gr_ = (x, g) if step >= r else (x[rows], g[rows])
            for kind, (xs, gs) in per_sample.gradient_terms(mod, xr, gr_, rows.stop - rows.start).items():
                if f"{owner}.{kind}" in wanted:
                    yield f"{owner}.{kind}", (None if xs is None else xs.float()), gs.float(), rows


def _image_groups(n: int, per_group: int) -> Iterator[np.ndarray]:
    for lo in range(0, n, per_group):
        yield np.arange(lo, min(n, lo + per_group))


def _check_queries(queries: Sequence[Query]) -> None:
    if len(queries) == 0:
        raise ValueError("queries: empty; pass at least one Query")


# --- D-TRAK --------------------------------------------------------------------------------
def trak_scores(train: torch.Tensor, queries: torch.Tensor, damping: float) -> np.ndarray:
    """float64 [Q, N]: phi_q^T (Phi^T Phi + lambda I)^-1 phi_z, lambda = damping * mean(diag(Phi^T Phi)).

    damping 0 uses the pseudo-inverse, since Phi^T Phi is singular whenever features outnumber images.
    """
    phi, q = train.double(), queries.double()
    gram = phi.T @ phi
    lam = damping * float(gram.diagonal().mean())
    if lam > 0:
        sol = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), q.T)
    else:
        sol = torch.linalg.pinv(gram, hermitian=True) @ q.T
    return (sol.T @ phi.T).numpy()


def _generator_seed(seed: int, name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") % 2 ** 63


@dataclass
class DTrak:
    """D-TRAK (Zheng et al., 2024): TRAK on randomly projected gradients of a diffusion model.

    A row's function is ``output``: ``"square"``, the mean of ||eps_theta(x_t, c, t)||^2
    (D-TRAK's choice, which attributes better than the loss), or ``"loss"``. An image's
    feature sums the projected gradient over ``timesteps`` evenly spaced timesteps (0,
    T/k, 2T/k, ...), with fixed noise keyed on (seed, image id, draw id), unflipped. Only
    each image's first caption is used by default (D-TRAK's one-caption setting; cost one
    row per timestep); ``captions="all"`` averages the feature over the captions.

    The projection of a linear or convolution weight is A (x) B (A: k x d_out, B: k x d_in,
    Gaussian/sqrt(k), fixed per weight from `seed` and its name; a convolution's d_in is
    C_in * kh * kw), giving k^2 features; a bias or a norm's weight gets A alone (k x its size,
    k features). Scores are TRAK's, see :func:`trak_scores`. Training features are kept
    in memory between calls for the same model, data and settings.
    """

    dim_per_side: int = 8
    timesteps: int = 10
    output: str = "square"
    damping: float = 0.1
    seed: int = 0
    batch_size: int = 64
    captions: str = "first"
    name: str = "dtrak"
    _cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)
    _proj_cache: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        for arg in ("dim_per_side", "timesteps", "batch_size"):
            v = getattr(self, arg)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{arg}: {v!r} must be a positive integer")
        if self.output not in OUTPUTS:
            raise ValueError(f"output: {self.output!r} is not one of {list(OUTPUTS)}")
        if not self.damping >= 0:
            raise ValueError(f"damping: {self.damping!r} must be >= 0 (a multiple of the mean of diag(Phi^T Phi))")
        if self.captions not in CAPTION_CHOICES:
            raise ValueError(f"captions: {self.captions!r} is not one of {list(CAPTION_CHOICES)}")

    def timestep_list(self, num_train_timesteps: int) -> tuple[int, ...]:
        if self.timesteps > num_train_timesteps:
            raise ValueError(f"timesteps: {self.timesteps} is more than the model's {num_train_timesteps} "
                             "train timesteps; use fewer")
        return tuple(j * num_train_timesteps // self.timesteps for j in range(self.timesteps))

    def projections(self, model: DiffusionModel, names: Sequence[str]
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor | None]]:
        """{weight name: (A [k, d_out], B [k, d_in]) for a linear or convolution weight, (A [k, size], None)
        for any other parameter}, float64 on the CPU."""
        k = self.dim_per_side
        out = {}
        for n in names:
            p = model.unet.get_parameter(n)
            g = torch.Generator().manual_seed(_generator_seed(self.seed, n))
            matrix = _matrix(model.unet, n)
            a = torch.randn(k, p.shape[0] if matrix else p.numel(), generator=g, dtype=torch.float64) / math.sqrt(k)
            b = torch.randn(k, p[0].numel(), generator=g, dtype=torch.float64) / math.sqrt(k) if matrix else None
            out[n] = (a, b)
        return out

    def _project(self, terms: Iterator[tuple[str, torch.Tensor | None, torch.Tensor]], names: Sequence[str],
                 proj: dict[str, tuple[torch.Tensor, torch.Tensor | None]], rows: int) -> torch.Tensor:
        """[R, D] float64 projected per-row gradients, blocks in the order of `names`."""
        acc = {n: torch.zeros(rows, proj[n][0].shape[0] * (proj[n][0].shape[0] if proj[n][1] is not None else 1),
                              dtype=torch.float64, device=proj[n][0].device) for n in names}
        for n, x, g, sl in terms:
            a, b = proj[n]
            ga = g @ a.T  # [r, L, k]
            if b is None:
                acc[n][sl] += ga.sum(1).double()
            else:
                acc[n][sl] += torch.bmm(ga.transpose(1, 2), x @ b.T).flatten(1).double()
        return torch.cat([acc[n] for n in names], 1)

    def _features(self, model: DiffusionModel, names: Sequence[str], x0: torch.Tensor, text: torch.Tensor,
                  timesteps: torch.Tensor, seed: int, sample_ids: torch.Tensor, draw_ids: torch.Tensor,
                  backend: str) -> torch.Tensor:
        """[R, D] projected gradients of the rows, in batches of `batch_size` rows (CPU, float64)."""
        modules = rule_layers(model.unet, names)
        dev = model.device
        key = (str(dev), tuple(names), self.seed, self.dim_per_side)
        if self._proj_cache.get("key") != key:
            self._proj_cache.update(key=key, proj={
                n: (a.to(dev, torch.float32), None if b is None else b.to(dev, torch.float32))
                for n, (a, b) in self.projections(model, names).items()})
        proj = self._proj_cache["proj"]
        out = []
        with _tracking(model.unet, names):
            for lo in range(0, x0.shape[0], self.batch_size):
                sl = slice(lo, lo + self.batch_size)
                terms = _row_terms(model, modules, names, x0[sl].to(dev), text[sl].to(dev), timesteps[sl].to(dev),
                                   seed, sample_ids[sl].to(dev), draw_ids[sl].to(dev), self.output, backend)
                out.append(self._project(terms, names, proj, x0[sl].shape[0]).cpu())
        return torch.cat(out)

    def train_features(self, ctx: EvalContext) -> torch.Tensor:
        """Phi: [N, D] float64, one row per training image."""
        att = ctx.attributor
        model, data = att.model, att.prepare()
        rule_layers(model.unet, att.names)
        key = (model.unet_id(), data.data_id, tuple(att.names), self.dim_per_side, self.timesteps, self.output,
               self.seed, self.captions)
        if key in self._cache:
            return self._cache[key]
        ts = self.timestep_list(model.num_train_timesteps)
        layout = ScoringPlan(timesteps=ts, captions=self.captions, flips=False)  # rows and draw ids only
        phi = None
        for ids in _image_groups(data.n, max(1, self.batch_size // len(ts))):
            inputs = data.inputs(ids)[:, 0]
            text, counts = data.text(ids, self.captions)
            rows = expand_rows(ids, counts, layout)
            f = self._features(model, att.names, inputs[rows.image], text[rows.text_row], rows.timestep,
                               self.seed ^ DTRAK_STREAM, rows.sample_id, rows.draw_id, att.backend)
            weight = 1.0 / torch.as_tensor(counts, dtype=torch.float64)[rows.image]  # mean over captions
            if phi is None:
                phi = torch.zeros(data.n, f.shape[1], dtype=torch.float64)
            phi.index_add_(0, rows.sample_id, f * weight[:, None])
        self._cache.clear()
        self._cache[key] = phi
        return phi

    def query_features(self, ctx: EvalContext, queries: Sequence[Query]) -> torch.Tensor:
        """[Q, D] float64: each query image with its own prompt, the training images' timesteps."""
        _check_queries(queries)
        att = ctx.attributor
        model = att.model
        ts = torch.tensor(self.timestep_list(model.num_train_timesteps), dtype=torch.int64)
        x0 = torch.stack([att.query_inputs(q.image) for q in queries]).cpu()
        text = model.encode_text([q.prompt for q in queries]).cpu()
        which = torch.arange(len(queries)).repeat_interleave(len(ts))
        t = ts.repeat(len(queries))
        f = self._features(model, att.names, x0[which], text[which], t, self.seed ^ DTRAK_QUERY_STREAM,
                           torch.zeros_like(t), ScoringPlan.draw_id(0, 0, t), att.backend)
        return torch.zeros(len(queries), f.shape[1], dtype=torch.float64).index_add_(0, which, f)

    def scores(self, ctx: EvalContext, queries: Sequence[Query]) -> np.ndarray:
        _check_queries(queries)
        return trak_scores(self.train_features(ctx), self.query_features(ctx, queries), self.damping)


# --- first-order influence -----------------------------------------------------------------
def _directional(terms: Iterator[tuple[str, torch.Tensor | None, torch.Tensor, slice]],
                 directions: dict[str, torch.Tensor], rows: int) -> torch.Tensor:
    """[rows, Q] float64: each row's gradient dotted with each query's direction, as sum((X V^T) * G), or
    sum(G) V where the gradient is a sum of G over positions."""
    total = None
    for n, x, g, sl in terms:
        v = directions[n]  # [Q, *the parameter's shape]
        q = v.shape[0]
        if x is None:
            part = (g.sum(1) @ v.reshape(q, -1).T).double()
        else:
            r, length, d_in = x.shape
            d_out = g.shape[-1]
            step = max(1, _BUDGET // max(1, r * length * d_out))
            cols = []
            for q0 in range(0, q, step):
                vq = v[q0:q0 + step].reshape(-1, d_out, d_in)
                xv = (x.reshape(r * length, d_in) @ vq.reshape(-1, d_in).T).view(r, length, -1, d_out)
                cols.append((xv * g[:, :, None, :]).sum((1, 3)).double())
            part = torch.cat(cols, 1)
        if total is None:
            total = torch.zeros(rows, q, dtype=torch.float64, device=part.device)
        total[sl] += part
    if total is None:
        raise ValueError("weights: no selected layer ran in the UNet's forward pass; select other weights")
    return total


@dataclass
class FirstOrderInfluence:
    """The infinitesimal limit of one unlearning step: how fast each image's loss rises along it.

    score(q, z) = grad L(z)^T (F + lambda)^-1 grad L(q): the query gradient is
    ``unlearning.query_gradient`` under `config` (its draws, seed and first step; config.steps
    is ignored), F the attributor's Fisher, lambda = damping * mean(F) per weight (damping
    None: config.damping, as the unlearning step); config.method "sgd" drops F. L(z) is the
    image's loss under the attributor's scoring plan, every row (captions x timesteps x
    versions) with the plan's noise, so this is exactly the derivative of the loss our scores
    difference -- except that flips are averaged (mean over versions), where the score
    takes the max, which has no derivative at ties.
    """

    config: UnlearnConfig = field(default_factory=UnlearnConfig)
    damping: float | None = None
    fisher_samples: int | None = None
    batch_size: int = 64
    name: str = "influence"

    def __post_init__(self) -> None:
        if self.damping is not None and not self.damping >= 0:
            raise ValueError(f"damping: {self.damping!r} must be >= 0 (a multiple of the mean Fisher) or None")
        if isinstance(self.batch_size, bool) or not isinstance(self.batch_size, int) or self.batch_size < 1:
            raise ValueError(f"batch_size: {self.batch_size!r} must be a positive integer")

    def directions(self, ctx: EvalContext, queries: Sequence[Query]) -> dict[str, torch.Tensor]:
        """{weight name: [Q, *shape] float64} = (F + lambda)^-1 grad L(q) for each query."""
        _check_queries(queries)
        att = ctx.attributor
        model = att.model
        rule_layers(model.unet, att.names)
        damping = self.config.damping if self.damping is None else self.damping
        newton = self.config.method == "newton"
        fisher = att.fisher(self.fisher_samples) if newton else None
        if fisher is not None:
            check_fisher(fisher, model.unet, att.names, damping)
        grads = []
        for q in queries:
            x0 = att.query_inputs(q.image)
            text = model.encode_text([q.prompt])[0]
            grads.append(query_gradient(model, att.names, x0, text, self.config, backend=att.backend))
        out = {}
        for n in att.names:
            g = torch.stack([gq[n] for gq in grads])
            if fisher is not None:
                f = fisher[n].to(g.device, torch.float64)
                g = g / (f + damping * float(f.mean()))
            out[n] = g
        return out

    def scores(self, ctx: EvalContext, queries: Sequence[Query]) -> np.ndarray:
        _check_queries(queries)
        att = ctx.attributor
        model, data, plan = att.model, att.prepare(), att.plan
        modules = rule_layers(model.unet, att.names)
        dev = model.device
        directions = {n: v.to(dev, torch.float32) for n, v in self.directions(ctx, queries).items()}
        out = torch.zeros(data.n, len(queries), dtype=torch.float64)
        per_group = max(1, self.batch_size // (plan.versions * len(plan.timesteps)))
        with _tracking(model.unet, att.names):
            for ids in _image_groups(data.n, per_group):
                inputs = data.inputs(ids)[:, :plan.versions]
                text, counts = data.text(ids, plan.captions)
                rows = expand_rows(ids, counts, plan)
                per_image = plan.versions * len(plan.timesteps) * torch.as_tensor(counts, dtype=torch.float64)
                weight = 1.0 / per_image[rows.image]  # the mean over the image's rows
                for lo in range(0, len(rows), self.batch_size):
                    sl = slice(lo, lo + self.batch_size)
                    x0 = inputs[rows.image[sl], rows.version[sl]].to(dev)
                    terms = _row_terms(model, modules, att.names, x0, text[rows.text_row[sl]].to(dev),
                                       rows.timestep[sl].to(dev), plan.seed, rows.sample_id[sl].to(dev),
                                       rows.draw_id[sl].to(dev), "loss", att.backend)
                    d = _directional(terms, directions, len(x0)).cpu()
                    out.index_add_(0, rows.sample_id[sl], d * weight[sl, None])
        return out.T.numpy()
