"""Resumable, sharded loss sweeps: a :class:`LossSweep` run chunk by chunk into a directory.

    losses = run_sweep(sweep, [None, weights], "out/sweep", chunk_size=1024,
                       variant_ids=[variant_id(None), variant_id(weights)])

The image ids are cut by position into fixed chunks (chunk ``k`` holds
``ids[k * chunk_size:(k + 1) * chunk_size]``). Each chunk's losses
``[n_variants, len(chunk), versions]`` are written atomically to
``chunk-{k:06d}.npy`` beside a ``sweep.json`` manifest of everything the numbers
depend on, so an interrupted sweep resumes where it stopped and a directory made
under another model, data set, plan or set of variants is refused.

Under ``torch.distributed`` (e.g. launched with ``torchrun``) the unfinished chunks
are dealt round-robin to the ranks, which write into the same directory (it must be
on a filesystem every rank sees); after a barrier every rank assembles the full
array from the chunk files. A chunk is always computed the same way — the same
``image_batches`` split of the same ids, so the same UNet batches — whichever rank
computes it, so a sharded sweep gives exactly the numbers of a single-process one
(with the same batch size, device kind and intra-op thread count).
Only one sweep (one process, or one group of ranks) may write into a directory at a time.

Chunks need no alignment with anything for the noise: keyed noise depends on the draw
alone, and a ``noise="reference"`` plan places every image at its position in the whole
data set's published pass (see :class:`~forgetscore.attribution.losses.ReferenceNoise`),
so a chunk, a rank or a subset that cuts a published batch still gives each of its images
the published noise. The plan (noise mode and reference batch included) is part of the
manifest, so chunks made under another noise are refused.
"""
from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from .io import read_json, write_json, write_npy
from .losses import LossSweep
from .ranks import barrier, deal_chunks, init_distributed, on_rank0

SWEEP_FORMAT = 2  # 2: cross-attention keys and values once per caption (text_kv)
MANIFEST = "sweep.json"
# The identities a directory's chunks were computed under; all must match for reuse.
# Precision changes the numbers, so it is part of the identity; compile mode, device and backend
# only change the last bits (as the thread count does), so a sweep may be resumed across them.
IDENTITY_KEYS = ("format", "unet_id", "encoders_id", "data_id", "plan", "batch_size", "chunk_size",
                 "variant_ids", "n_images", "indices_id", "precision")
# What a manifest written before a key existed meant by its absence.
IDENTITY_DEFAULTS = {"precision": "fp32"}


def chunk_name(k: int) -> str:
    return f"chunk-{k:06d}.npy"


def variant_id(weights: dict[str, torch.Tensor] | None) -> str:
    """A short hash of a set of replacement weights (names, dtypes, shapes and bytes); None or {} is "original"."""
    if not weights:
        return "original"
    h = hashlib.sha256()
    for name in sorted(weights):
        t = weights[name].detach()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}\0".encode())
        if t.numel():
            h.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def indices_id(ids: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(ids, dtype="<i8").tobytes()).hexdigest()[:16]


def _chunk_ok(path: Path, shape: tuple[int, ...]) -> bool:
    """Whether `path` holds a finished chunk of the expected shape (reads the header only)."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError):
        return False
    return arr.shape == shape and arr.dtype == np.float64


def sweep_header(sweep: LossSweep, variant_ids: Sequence[str], ids: np.ndarray, chunk_size: int) -> dict:
    """The manifest of a sweep of `sweep` over image ids `ids` in chunks of `chunk_size`: what its numbers depend on."""
    return {"format": SWEEP_FORMAT, "unet_id": sweep.model.unet_id(), "encoders_id": sweep.data.model_id,
            "data_id": sweep.data.data_id, "plan": sweep.plan.to_dict(), "batch_size": sweep.batch_size,
            "chunk_size": chunk_size, "variant_ids": list(variant_ids), "n_images": len(ids),
            "indices_id": indices_id(ids), "n_chunks": (len(ids) + chunk_size - 1) // chunk_size,
            "precision": sweep.precision}


def made_under(sweep: LossSweep) -> dict:
    """What a sweep's chunks are computed with beyond their identity: the kernel backend (as resolved), the compile
    mode and the kind of device. Each changes only the last bits, so chunks of two may join one sweep; the manifest
    lists every one that computed chunks in its folder (``made_under``), for a resume to say so."""
    import torch

    from ..kernels import dispatch

    device = torch.device(sweep.model.device)
    backend = sweep.backend
    if backend == "auto":
        with warnings.catch_warnings():  # the fallback was said when the settings were checked
            warnings.simplefilter("ignore")
            module = dispatch.resolve(backend, device)
        usable = ["torch", *dispatch.available_backends()]
        backend = next((name for name in ("cpu", "cuda", "triton", "torch")
                        if name in usable and dispatch._module(name) is module), backend)
    kind = device.type
    if kind == "cuda":  # GPUs of two models round differently
        kind = f"cuda ({torch.cuda.get_device_name(device)})"
    return {"backend": backend, "compile": sweep.compile or "off", "device": kind}


def _said(how: dict) -> str:
    return ", ".join(f"{key} {value}" for key, value in how.items())


def _sweeps_like(root: str | os.PathLike, header: dict, ignored: tuple[str, ...]) -> Iterator[tuple[Path, dict]]:
    """(folder, manifest) of each sweep folder in `root` whose manifest agrees with `header` on every identity key
    but the `ignored` ones (sizes, which a manifest holds as ints)."""
    root = Path(root)
    for manifest in sorted(root.glob(f"*/{MANIFEST}")) if root.is_dir() else ():
        try:
            old = read_json(manifest)
        except (OSError, ValueError):
            continue
        if not isinstance(old, dict) or not all(isinstance(old.get(key), int) for key in ignored):
            continue
        if all(old.get(key, IDENTITY_DEFAULTS.get(key)) == header[key] for key in IDENTITY_KEYS if key not in ignored):
            yield manifest.parent, old


def matching_sweeps(root: str | os.PathLike, header: dict) -> dict[Path, tuple[int, int]]:
    """The sweep folders in `root` that hold `header`'s sweep under any batch size.

    {folder: (its batch size, its finished chunk files)}. A batch size changes the last bits of the
    losses, so chunks of two batch sizes cannot join one sweep; each folder can be resumed under its own.
    """
    return {folder: (old["batch_size"], len(list(folder.glob("chunk-*.npy"))))
            for folder, old in _sweeps_like(root, header, ("batch_size",))}


def other_chunk_sizes(root: str | os.PathLike, header: dict) -> dict[Path, dict]:
    """The sweep folders in `root` that hold `header`'s sweep cut into chunks of another size (any batch size):
    {folder: its manifest}. A resume needs the chunk size they were cut with."""
    return {folder: old for folder, old in _sweeps_like(root, header, ("batch_size", "chunk_size"))
            if old["chunk_size"] != header["chunk_size"]}


def run_sweep(sweep: LossSweep, variants: Sequence[dict[str, torch.Tensor] | None], out_dir: str | os.PathLike, *,
              indices: np.ndarray | None = None, chunk_size: int = 1024, variant_ids: Sequence[str] | None = None,
              progress: bool = True, desc: str = "score", untrusted: str = "refuse",
              stats: dict | None = None, log: Callable[[str], None] | None = None) -> np.ndarray:
    """[len(variants), len(indices), versions] float64 losses, computed chunk by chunk into `out_dir`.

    Bitwise equal to ``sweep.run(variants, indices)`` whenever that run's image batches fall on
    chunk boundaries, and to any other ``run_sweep`` with the same chunk size and batch size on the
    same kind of device and intra-op thread count, however many ranks share it (the thread count
    can change the last bits of a convolution). Finished chunks in `out_dir` are reused.
    `variant_ids` name the variants in the manifest (default: :func:`variant_id` of each).
    Under torch.distributed every rank must call it with the same arguments, and every rank
    returns the whole array. Chunk files in `out_dir` that no matching manifest vouches for are
    refused, or with ``untrusted="remove"`` deleted (for a folder the caller owns). `stats`, if given,
    receives ``images_computed``: the images this rank computes in this call (the rest were resumed).
    Resuming chunks that another backend, compile mode or device made is said once, through `log` (default: a
    warning).
    """
    from tqdm.auto import tqdm

    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size: {chunk_size!r} must be an int >= 1")
    variants = list(variants)
    if not variants:
        raise ValueError("variants: give at least one (None for the original weights)")
    variant_ids = [variant_id(w) for w in variants] if variant_ids is None else [str(v) for v in variant_ids]
    if len(variant_ids) != len(variants):
        raise ValueError(f"variant_ids: {len(variant_ids)} ids for {len(variants)} variants; give one per variant")
    data = sweep.data
    ids = np.arange(data.n, dtype=np.int64) if indices is None else np.asarray(indices, dtype=np.int64).reshape(-1)
    if len(ids) and (ids.min() < 0 or ids.max() >= data.n):
        raise ValueError(f"indices: must lie in [0, {data.n}), got values in [{ids.min()}, {ids.max()}]")
    out_dir = Path(out_dir)
    n_var, versions = len(variants), sweep.plan.versions
    header = sweep_header(sweep, variant_ids, ids, chunk_size)
    n_chunks = header["n_chunks"]

    def chunk_ids(k: int) -> np.ndarray:
        return ids[k * chunk_size:(k + 1) * chunk_size]

    def chunk_shape(k: int) -> tuple[int, int, int]:
        return n_var, len(chunk_ids(k)), versions

    how = made_under(sweep)
    init_distributed(sweep.model.device)
    # What made the finished chunks, read before any rank writes one (rank 0 alone: it writes the manifest).
    prior = on_rank0(lambda: _prior(out_dir, header, n_chunks, chunk_shape))
    rank, world, mine = deal_chunks(
        out_dir, header, device=sweep.model.device, manifest=MANIFEST, keys=IDENTITY_KEYS, n_chunks=n_chunks,
        done=lambda k: _chunk_ok(out_dir / chunk_name(k), chunk_shape(k)), chunk_glob="chunk-*.npy",
        defaults=IDENTITY_DEFAULTS, caller="run_sweep", untrusted=untrusted,
        same_hint="every rank must sweep the same model, data, plan, variants and indices (compute the "
                  "variants on rank 0 and broadcast them)")
    on_rank0(lambda: _record_made_under(out_dir, how, *prior, n_chunks=n_chunks, log=log))
    if stats is not None:
        stats["images_computed"] = sum(len(chunk_ids(k)) for k in mine)
    with tqdm(total=sum(len(chunk_ids(k)) for k in mine), unit="img", disable=not progress or rank != 0,
              desc=desc if world == 1 else f"{desc} (rank 0 of {world})") as bar:
        for k in mine:
            losses = sweep.run(variants, chunk_ids(k), progress=False)
            write_npy(out_dir / chunk_name(k), losses)
            del losses
            bar.update(len(chunk_ids(k)))
    barrier()

    out = np.empty((n_var, len(ids), versions), dtype=np.float64)
    for k in range(n_chunks):
        path = out_dir / chunk_name(k)
        if not _chunk_ok(path, chunk_shape(k)):
            raise ValueError(f"cache: {str(path)!r} is missing or damaged after the sweep"
                             + ("; with several ranks the directory must be on a filesystem all of them share"
                                if world > 1 else "; run again to recompute it"))
        out[:, k * chunk_size:k * chunk_size + len(chunk_ids(k))] = np.load(path, allow_pickle=False)
    return out


def _prior(out_dir: Path, header: dict, n_chunks: int, shape) -> tuple[list[dict], int]:
    """(what made `out_dir`'s chunks so far, as its manifest lists, the finished chunks it holds); nothing for a
    folder whose manifest is of another sweep (its chunks are refused or removed, not reused)."""
    try:
        old = read_json(out_dir / MANIFEST)
    except (OSError, ValueError):
        return [], 0
    if not isinstance(old, dict) or any(old.get(k, IDENTITY_DEFAULTS.get(k)) != header[k] for k in IDENTITY_KEYS):
        return [], 0
    made = [m for m in old.get("made_under") or () if isinstance(m, dict)]
    return made, sum(_chunk_ok(out_dir / chunk_name(k), shape(k)) for k in range(n_chunks))


def _record_made_under(out_dir: Path, how: dict, made: list[dict], finished: int, *, n_chunks: int,
                       log: Callable[[str], None] | None) -> None:
    """Say when finished chunks made otherwise are reused, and add `how` to the manifest's list when this run
    computes chunks."""
    others = [m for m in made if m != how]
    if finished and others:
        message = (f"sweep: reusing {finished} finished chunk{'s' if finished > 1 else ''} of {n_chunks} made "
                   f"{'in part ' if how in made else ''}under {' and '.join(map(_said, others))}, not this run's "
                   f"{_said(how)}: the losses of two backends, compile modes or devices agree to float32 rounding "
                   f"only; for losses of one alone, stop this run, delete {str(out_dir)!r} and run again (a fresh "
                   "sweep), or resume it with the settings it was made with")
        if log is not None:
            log(message)
        else:
            warnings.warn(message, stacklevel=3)
    if finished < n_chunks and how not in made:
        manifest = read_json(out_dir / MANIFEST)
        write_json(out_dir / MANIFEST, {**manifest, "made_under": [*made, how]})
