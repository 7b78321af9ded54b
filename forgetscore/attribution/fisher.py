"""The diagonal Fisher of the training loss over the selected weights.

F = mean over S samples of the squared per-sample gradient, each sample an image,
one random caption of it, one random timestep and fresh noise. As in the paper, the samples go
through the training set in epochs: samples [e * n, (e + 1) * n) visit each of the n images once,
in an order of its own for each epoch, so S = 5 n (the default) visits every image exactly five
times. The order, caption, timestep and noise are keyed on (seed, sample index), so that any
range of samples can be computed alone. The per-sample gradients are never formed for linear
and convolution layers, group and layer norms (every parameter of a diffusers UNet): hooks capture
each layer's inputs X and output gradients G (of every call, if it runs more than once) in one
batched backward pass, and :mod:`.per_sample` sums the squares of each sample's gradient from
them (for linear layers, ``kernels.fisher_accumulate`` adds sum_b (G_b^T X_b)^2). Any other
parameter takes one backward pass per sample. Accumulated in float64.

:func:`compute_fisher` computes it in memory; :func:`run_fisher` in resumable chunks of
samples written into a directory and shared by the ranks of a torchrun job (see below).
"""
from __future__ import annotations

import functools
import json
import numbers
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from torch.profiler import record_function

from .. import kernels
from ..kernels import validate
from . import per_sample
from .data import PreparedData
from .io import write_bytes
from .memory import largest_fitting, naming_the_batch
from .model import DiffusionModel
from .ranks import barrier, broadcast, deal_chunks, on_rank0
from .train_loss import row_losses

FISHER_STREAM = 0x46495348  # separates the Fisher's random draws from the scoring plan's
ORDER_STREAM = 0x4F524452  # the epochs' image orders: keyed on image ids, which must not meet the samples' keys


@functools.lru_cache(maxsize=4)  # a batch of samples spans one or two epochs; n int64s each
def epoch_order(seed: int, epoch: int, n: int) -> torch.Tensor:
    """The order in which epoch `epoch` visits images 0 .. n - 1: sorted by a 63-bit hash of (seed, epoch, image)."""
    bits = kernels.random_bits(seed ^ ORDER_STREAM, torch.arange(n), epoch, 2)
    return torch.sort((bits[:, 0] << 31) | (bits[:, 1] >> 1), stable=True).indices


def sample_draws(seed: int, start: int, count: int, data: PreparedData, num_train_timesteps: int,
                 flips: bool) -> dict[str, torch.Tensor]:
    """Sample s -> (image, caption, timestep, flip), keyed on (seed, s): the same whatever the batching.

    Sample s is position s % n of epoch s // n's order of the n images.
    """
    sample_id = torch.arange(start, start + count)
    epoch, position = sample_id // data.n, sample_id % data.n
    image = torch.empty(count, dtype=torch.int64)
    for e in torch.unique(epoch).tolist():
        at = epoch == e
        image[at] = epoch_order(seed, e, data.n)[position[at]]
    bits = kernels.random_bits(seed ^ FISHER_STREAM, sample_id, 0, 3)
    offsets = torch.as_tensor(data.caption_offsets)
    n_caps = offsets[image + 1] - offsets[image]
    return {"image": image, "caption": bits[:, 0] % n_caps, "timestep": bits[:, 1] % num_train_timesteps,
            "version": (bits[:, 2] & 1) if flips else torch.zeros(count, dtype=torch.int64),
            "sample_id": sample_id}


class _Capture:
    """Forward hooks that keep each call's input (detached) and output of some layers for one backward pass."""

    def __init__(self, modules: dict[str, torch.nn.Module]):
        self.calls: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {n: [] for n in modules}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in modules.items()]

    def _hook(self, name: str):
        def hook(module, args, output):
            self.calls[name].append((args[0].detach(), output))
        return hook

    def close(self) -> None:
        for h in self.handles:
            h.remove()


def _split(unet: torch.nn.Module, names: list[str]) -> tuple[dict[str, dict[str, str]], list[str]]:
    """The selected parameters as ({layer: {"weight"/"bias": parameter name}} for the layers whose
    per-sample gradients come from their inputs and output gradients, [every other parameter])."""
    modules = dict(unet.named_modules())
    layers: dict[str, dict[str, str]] = {}
    other = []
    for n in names:
        owner, _, kind = n.rpartition(".")
        mod = modules.get(owner)
        if mod is not None and kind in ("weight", "bias") and per_sample.supported(mod):
            layers.setdefault(owner, {})[kind] = n
        else:
            other.append(n)
    return layers, other


def fisher_sums(model: DiffusionModel, data: PreparedData, names: list[str], *, start: int, count: int,
                seed: int = 0, batch_size: int = 64, flips: bool = True, captions: str = "all",
                backend: str = "auto", bar=None) -> dict[str, torch.Tensor]:
    """{parameter name: float64 sum of squared per-sample gradients} over samples [start, start + count),
    in batches of `batch_size` from `start` (so a range is always computed the same way)."""
    unet = model.unet
    all_params = dict(unet.named_parameters())
    modules = dict(unet.named_modules())
    layers, other = _split(unet, names)
    sums = {n: torch.zeros(all_params[n].shape, dtype=torch.float64, device=model.device) for n in names}
    selected = [all_params[n] for n in names]
    for p in selected:
        p.requires_grad_(True)
    try:
        for lo in range(start, start + count, batch_size):
            n_rows = min(batch_size, start + count - lo)
            # The labels name the phases in a torch.profiler trace (benchmarks/bench_sweep.py --fisher-profile).
            with record_function("fisher: draws and inputs"):
                d = sample_draws(seed, lo, n_rows, data, model.num_train_timesteps, flips)
                x0 = data.inputs(d["image"].numpy())[torch.arange(n_rows), d["version"]].to(model.device)
                cap = d["caption"] if captions == "all" else torch.zeros_like(d["caption"])
                ctx = data.caption_states(d["image"].numpy(), cap.numpy()).to(model.device)  # only the drawn captions
                args = (x0, ctx, d["timestep"].to(model.device), seed ^ FISHER_STREAM,
                        d["sample_id"].to(model.device), torch.ones(n_rows, dtype=torch.int64, device=model.device))
            if layers:
                hooks = _Capture({o: modules[o] for o in layers})
                try:
                    with record_function("fisher: forward"):
                        losses = row_losses(model, *args, backend=backend)
                finally:
                    hooks.close()
                flat = [(o, x, y) for o, calls in hooks.calls.items() for x, y in calls]
                # Each row's loss depends only on its own sample, so the gradient of the sum w.r.t. a layer's
                # output rows is each sample's own output gradient.
                with record_function("fisher: backward"):
                    grads = torch.autograd.grad(losses.sum(), [y for _, _, y in flat], retain_graph=bool(other),
                                                allow_unused=True)
                used: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
                for (o, x, _), g in zip(flat, grads):
                    if g is not None:  # None: that call's output does not reach the loss
                        used.setdefault(o, []).append((x, g))
                with record_function("fisher: accumulate"):
                    for o, calls in used.items():
                        per_sample.accumulate(modules[o], calls, {kind: sums[n] for kind, n in layers[o].items()},
                                              n_rows, backend=backend)
                del hooks, flat, grads, used
            if other:
                extra = [all_params[n] for n in other]
                if not layers:
                    with record_function("fisher: forward"):
                        losses = row_losses(model, *args, backend=backend)
                with record_function("fisher: backward per sample"):
                    for b in range(n_rows):
                        gs = torch.autograd.grad(losses[b], extra, retain_graph=b < n_rows - 1, allow_unused=True)
                        for n, g in zip(other, gs):
                            if g is not None:
                                sums[n] += g.double().square()
            if bar is not None:
                bar.update(n_rows)
    finally:
        for p in selected:
            p.requires_grad_(False)
    return sums


FISHER_BATCH = 64  # samples per batch where "auto" does not probe (off CUDA)
FISHER_AUTO_CAP = 512  # the largest batch "auto" tries on a GPU


def probe_fisher_batch_size(model: DiffusionModel, data: PreparedData, names: list[str], *, flips: bool = True,
                            captions: str = "all", backend: str = "auto", cap: int = FISHER_AUTO_CAP) -> int:
    """The largest power-of-two batch up to `cap` whose Fisher batch fits on the model's device.

    Each try runs one batch of real samples exactly as :func:`fisher_sums` does (forward, the
    backward pass, the accumulation); an out-of-memory error halves it.
    """
    check_draws(model, names, captions)

    def fits(n: int) -> None:
        fisher_sums(model, data, names, start=0, count=n, batch_size=n, flips=flips, captions=captions,
                    backend=backend)
        if model.device.type == "cuda":
            torch.cuda.synchronize(model.device)

    return largest_fitting(fits, cap, argument="fisher_batch_size", unit="one sample's forward and backward pass",
                           hint="")


def auto_fisher_batch_size(model: DiffusionModel, data: PreparedData, names: list[str], **kw) -> int:
    """Samples per batch for ``fisher_batch_size="auto"``: probed on CUDA, :data:`FISHER_BATCH` elsewhere.

    Why probe: at 64 a batch an H200 computed 342 samples/s, far below its forward and backward rate,
    as if it waited on the host's kernel launches; larger batches are not yet timed there
    (benchmarks/gpu_check.sh, open question 2). `kw`: those of :func:`probe_fisher_batch_size`.
    """
    if model.device.type == "cuda":
        return probe_fisher_batch_size(model, data, names, **kw)
    return FISHER_BATCH


def resumable_fisher_batch_size(out_dirs: list[Path], chunk_size: int, fitting: int) -> int:
    """The batch size to resume an "auto" Fisher with: that of the interrupted run among `out_dirs` (its chunk
    folders) with the most finished chunks, if it is no larger than `fitting` (what fits now); else `fitting`.

    Batch sizes change the last bits, so chunks of two are never mixed; the probe's answer moves with the
    GPU's free memory, and a resumed run should not start afresh for that.
    """
    found = []
    for folder in out_dirs:
        try:
            header = json.loads((folder / MANIFEST).read_text())
            batch = int(header["batch_size"])
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if header.get("chunk_size") != chunk_size or batch > fitting:
            continue
        done = _folded(folder) + sum(_chunk_index(p.name) is not None for p in folder.glob("chunk-*.safetensors"))
        if done:
            found.append((done, batch))
    return max(found)[1] if found else fitting


def as_count(name: str, value: object) -> int:
    """`value` as a Python int >= 1; numpy integers count too (they reach here from arrays), bool does not
    (True would pass for 1)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name}: {value!r} must be an int >= 1")
    return int(value)


def check_counts(**counts: int) -> None:
    """Each named count must be an int >= 1 (the error names the first that is not)."""
    for name, v in counts.items():
        as_count(name, v)


def check_draws(model: DiffusionModel, names: list[str], captions: str) -> None:
    """The weights named and the caption choice of a Fisher, checked before any work."""
    from .plan import CAPTION_CHOICES

    if isinstance(names, str) or not all(isinstance(n, str) for n in names):
        raise ValueError("names: expected a list of weight names (e.g. select_weights(unet, 'kv')), got "
                         f"{type(names).__name__}")
    if not names:
        raise ValueError("names: empty; give the weights the Fisher is for (e.g. select_weights(unet, 'kv'))")
    params = dict(model.unet.named_parameters())
    unknown = [n for n in names if n not in params]
    if unknown:
        raise ValueError(f"names: the UNet has no weight named {unknown[0]!r}; use select_weights(unet, preset) "
                         "or names from unet.named_parameters()")
    if captions not in CAPTION_CHOICES:
        raise ValueError(f"captions: {captions!r} is not one of {list(CAPTION_CHOICES)}")


def compute_fisher(model: DiffusionModel, data: PreparedData, names: list[str], *, samples: int, seed: int = 0,
                   batch_size: int = 64, flips: bool = True, captions: str = "all", backend: str = "auto",
                   progress: bool = True) -> dict[str, torch.Tensor]:
    """{parameter name: float64 Fisher diagonal (parameter's shape)} from `samples` samples, in memory."""
    from tqdm.auto import tqdm

    samples, batch_size = as_count("samples", samples), as_count("batch_size", batch_size)
    seed = validate.seed(seed)  # before it is mixed with a stream constant, so an error shows the seed given
    check_draws(model, names, captions)
    with tqdm(total=samples, desc="fisher", unit="sample", disable=not progress) as bar:
        sums = fisher_sums(model, data, names, start=0, count=samples, seed=seed, batch_size=batch_size,
                           flips=flips, captions=captions, backend=backend, bar=bar)
    return {n: f / samples for n, f in sums.items()}


# ----------------------------------------------------------------------------- resumable, sharded
#
# Samples [k * chunk_size, (k + 1) * chunk_size) form chunk k; its float64 sums are written atomically
# to chunk-{k:06d}.safetensors beside a fisher.json manifest. Rank 0 folds finished chunks, in chunk
# order, into prefix.safetensors (the sum of chunks 0 .. folded - 1) and deletes them, so the
# directory holds a bounded number of chunks whatever the sample count and the total is summed in
# the same order whichever ranks computed which chunks and wherever a run was interrupted. Under
# torchrun the ranks store their chunks in rounds, which keeps that bound (two rounds of chunks).

FISHER_FORMAT = 2  # 2: samples go through the images in epochs (1 drew them with replacement)
FISHER_CHUNK = 16384  # samples per chunk: about 12 s of the demo model on 2 CPU cores (its Fisher: 1,411 samples/s)
MANIFEST = "fisher.json"
PREFIX = "prefix.safetensors"
IDENTITY_KEYS = ("format", "unet_id", "data_id", "names", "samples", "seed", "flips", "captions", "batch_size",
                 "chunk_size")


def chunk_name(k: int) -> str:
    return f"chunk-{k:06d}.safetensors"


_CHUNK_NAME = re.compile(r"chunk-(\d+)\.safetensors")


def _chunk_index(name: str) -> int | None:
    """k of a chunk file's name (any number of digits); None for any other name."""
    m = _CHUNK_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


def _save(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    from safetensors.torch import save

    write_bytes(path, save({n: t.detach().cpu().contiguous() for n, t in tensors.items()}, metadata=meta))


def _file_ok(path: Path, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether `path` holds float64 tensors of exactly these names and shapes (reads the header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            if set(f.keys()) != set(shapes):
                return False
            return all(tuple(f.get_slice(n).get_shape()) == shapes[n] and f.get_slice(n).get_dtype() == "F64"
                       for n in shapes)
    except Exception:  # noqa: BLE001  (missing, truncated or foreign files alike)
        return False


def _folded(out_dir: Path) -> int:
    """How many leading chunks the prefix file already holds (0 without one)."""
    from safetensors import safe_open

    path = out_dir / PREFIX
    if not path.is_file():
        return 0
    with safe_open(str(path), framework="pt") as f:
        return int((f.metadata() or {}).get("folded", 0))


def _load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


class _Prefix:
    """Rank 0's running sum of chunks 0 .. folded - 1, kept in the directory for a resume."""

    def __init__(self, out_dir: Path, shapes: dict[str, tuple[int, ...]]):
        self.out_dir, self.shapes = out_dir, shapes
        self.folded = _folded(out_dir)
        path = out_dir / PREFIX
        if self.folded and not _file_ok(path, shapes):
            raise ValueError(f"cache: {str(path)!r} does not hold this Fisher's weights; use a fresh directory")
        self.sums = _load(path) if self.folded else None

    def fold(self, n_chunks: int) -> None:
        """Add every finished chunk that continues the prefix; write it; delete the chunks it now holds."""
        start = self.folded
        while self.folded < n_chunks and _file_ok(self.out_dir / chunk_name(self.folded), self.shapes):
            chunk = _load(self.out_dir / chunk_name(self.folded))
            self.sums = chunk if self.sums is None else {n: self.sums[n] + chunk[n] for n in self.shapes}
            self.folded += 1
        if self.folded > start:
            _save(self.out_dir / PREFIX, self.sums, {"folded": str(self.folded)})
        for p in self.out_dir.glob("chunk-*.safetensors"):
            k = _chunk_index(p.name)
            if k is not None and k < self.folded:
                p.unlink(missing_ok=True)


def run_fisher(model: DiffusionModel, data: PreparedData, names: list[str], out_dir: str | os.PathLike, *,
               samples: int, chunk_size: int = FISHER_CHUNK, seed: int = 0, batch_size: int = 64,
               flips: bool = True, captions: str = "all", backend: str = "auto",
               progress: bool = True, untrusted: str = "refuse", stats: dict | None = None) -> dict[str, torch.Tensor]:
    """The Fisher of :func:`compute_fisher`, computed in resumable chunks of `chunk_size` samples.

    A run killed at any moment resumes from the chunks in `out_dir`; under torch.distributed
    (torchrun) the unfinished chunks are dealt to the ranks, which must all call it alike and share
    `out_dir` on one filesystem. The result is the same bit for bit however many ranks computed it
    and however often it was resumed (with the same batch and chunk sizes, on the same kind of
    device and thread count); with one chunk it is exactly :func:`compute_fisher`'s. Every rank
    returns the whole Fisher. Files in `out_dir` that no matching manifest vouches for (chunks or a
    running sum made under other settings, or with no manifest) are refused, or with
    ``untrusted="remove"`` deleted (for a folder the caller owns). `stats`, if given, receives
    ``samples_computed``: the samples this rank computes in this call.
    """
    from tqdm.auto import tqdm

    samples, batch_size = as_count("samples", samples), as_count("batch_size", batch_size)
    chunk_size = as_count("chunk_size", chunk_size)
    seed = validate.seed(seed)  # before it is mixed with a stream constant, so an error shows the seed given
    check_draws(model, names, captions)
    out_dir = Path(out_dir)
    shapes = {n: tuple(model.unet.get_parameter(n).shape) for n in names}
    n_chunks = (samples + chunk_size - 1) // chunk_size
    header = {"format": FISHER_FORMAT, "unet_id": model.unet_id(), "data_id": data.data_id, "names": list(names),
              "samples": samples, "seed": seed, "flips": bool(flips), "captions": captions,
              "batch_size": batch_size, "chunk_size": chunk_size, "n_chunks": n_chunks}
    holder: dict[str, int] = {}

    def done(k: int) -> bool:  # called on rank 0 only, once the directory is checked
        if "folded" not in holder:
            holder["folded"] = _folded(out_dir)
        return k < holder["folded"] or _file_ok(out_dir / chunk_name(k), shapes)

    rank, world, mine = deal_chunks(
        out_dir, header, device=model.device, manifest=MANIFEST, keys=IDENTITY_KEYS, n_chunks=n_chunks, done=done,
        # The running sum counts as a chunk file: without a manifest vouching for it, it is not trusted.
        chunk_glob="*.safetensors", caller="run_fisher", untrusted=untrusted,
        same_hint="every rank must compute the Fisher of the same model, data, weights and settings")
    made: list[_Prefix] = []
    on_rank0(lambda: made.append(_Prefix(out_dir, shapes)))  # a damaged sum raises on every rank
    prefix = made[0] if made else None

    def count(k: int) -> int:
        return min(chunk_size, samples - k * chunk_size)

    def store(k: int, sums: dict[str, torch.Tensor]) -> None:
        _save(out_dir / chunk_name(k), sums, {"chunk": str(k)})
        if prefix is not None:
            prefix.fold(n_chunks)

    # Writing a chunk (and, on rank 0, folding) takes a fraction of a second per 50 MB of weights: done in a
    # thread while the next chunk is computed, one write in flight at a time.
    # The ranks go in rounds (round i: the i-th chunk of each), all of round i - 1 on disk before any
    # chunk of round i is stored. Rank 0 can then always fold up to the round before, so the folder
    # holds at most two rounds of chunks even when one rank is slower than the others; without the
    # rounds, a fast rank 0 would stop folding at the first chunk a slow rank had not finished, and
    # every later chunk would wait on disk (a chunk of every weight of a Stable Diffusion UNet is 7 GB).
    if stats is not None:  # what this call computes (the rest was resumed), e.g. for a timing
        stats["samples_computed"] = sum(count(k) for k in mine)
    rounds = broadcast(len(mine))  # rank 0 is dealt the most chunks
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgetscore-fisher-io") as io, \
            tqdm(total=sum(count(k) for k in mine), desc="fisher" if world == 1 else f"fisher (rank 0 of {world})",
                 unit="sample", disable=not progress or rank != 0) as bar:
        pending = None
        for i in range(rounds):
            sums = None
            if i < len(mine):
                with naming_the_batch("fisher_batch_size", batch_size, "samples", "the Fisher"):
                    sums = fisher_sums(model, data, names, start=mine[i] * chunk_size, count=count(mine[i]),
                                       seed=seed, batch_size=batch_size, flips=flips, captions=captions,
                                       backend=backend, bar=bar)
                sums = {n: t.cpu() for n, t in sums.items()}
            if pending is not None:
                pending.result()
            barrier()  # every chunk of round i - 1 is on disk
            if sums is not None:
                pending = io.submit(store, mine[i], sums)
            del sums
        if pending is not None:
            pending.result()
    barrier()

    def finish() -> None:
        prefix.fold(n_chunks)
        if prefix.folded < n_chunks:
            raise ValueError(f"cache: {str(out_dir / chunk_name(prefix.folded))!r} is missing or damaged after "
                             "the Fisher" + ("; with several ranks the directory must be on a filesystem all of "
                                             "them share" if world > 1 else "; run again to recompute it"))

    on_rank0(finish)
    total = prefix.sums if prefix is not None else _load(out_dir / PREFIX)
    barrier()  # every rank has read the prefix before a caller may remove the directory
    return {n: total[n].to(model.device) / samples for n in names}
