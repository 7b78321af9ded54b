"""Ranks sharing a chunked job: the torchrun process group, and dealing a directory's unfinished chunks.

A long job (a loss sweep, the Fisher) is cut into fixed chunks, each written atomically
into one directory beside a manifest of everything its numbers depend on. :func:`deal_chunks`
checks that every rank was called alike, lets rank 0 alone open the directory (refusing one
made under other settings) and list the unfinished chunks, and gives each rank its
round-robin share of that one list, so every rank agrees on who computes what.
Without a process group every helper here is the single-process identity.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path

import torch

from .io import read_json, write_json


def distributed_env() -> tuple[int, int]:
    """(rank, world_size) of the running process group, or of the torchrun environment, else (0, 1)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and "RANK" in os.environ:
        return int(os.environ["RANK"]), world
    return 0, 1


def rank_device(device: torch.device | str) -> torch.device | str:
    """Under torchrun each rank takes its own GPU: a bare `cuda` means cuda:$LOCAL_RANK."""
    if str(device) == "cuda" and "LOCAL_RANK" in os.environ:
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return device


def init_distributed(device: torch.device | str = "cpu", timeout: timedelta = timedelta(hours=6)) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA), if any.

    Does nothing when a group is already running or the environment names no several ranks.
    The long timeout covers the barrier where ranks that finished their chunks wait for the rest.
    """
    import torch.distributed as dist

    if not dist.is_available():
        return 0, 1
    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    rank, world = distributed_env()
    if world <= 1:
        return rank, world
    device = torch.device(device)
    if device.type == "cuda":
        backend = "nccl"
        # NCCL's object collectives run on the current device: it must be this rank's own GPU, or two
        # ranks meet on one device (and NCCL refuses them).
        torch.cuda.set_device(device.index if device.index is not None else int(os.environ.get("LOCAL_RANK", "0")))
    else:
        backend = "gloo"
    dist.init_process_group(backend=backend, init_method="env://", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()


def leave_distributed() -> None:
    """Leave the process group, if this process joined one.

    Its communication threads then stop before the interpreter's teardown; left to that teardown, a
    rank was seen to abort on exit ("terminate called without an active exception") after all its work.
    """
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _dist_group_active() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def broadcast(obj: object) -> object:
    """`obj` as rank 0 has it, on every rank (the identity without a process group)."""
    import torch.distributed as dist

    if not _dist_group_active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(obj: object) -> list:
    """`obj` of every rank, in rank order, on every rank."""
    import torch.distributed as dist

    if not _dist_group_active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def on_rank0(fn: Callable[[], object]) -> object:
    """`fn()` computed by rank 0 alone and handed to every rank; a failure there raises on every rank.

    For work whose result must be identical on all ranks (e.g. weights from backward passes, whose
    last bits two GPUs need not agree on). Without a process group it is just `fn()`.
    """
    if not _dist_group_active():
        return fn()
    rank, _ = distributed_env()
    outcome: tuple[bool, object] | None = None
    failure: BaseException | None = None
    if rank == 0:
        try:
            outcome = (True, fn())
        except BaseException as exc:  # noqa: BLE001  (the other ranks must not wait for rank 0)
            failure = exc
            outcome = (False, (isinstance(exc, ValueError), f"{type(exc).__name__}: {exc}"))
    ok, value = broadcast(outcome)
    if failure is not None:
        raise failure
    if not ok:
        bad_input, message = value
        # Bad input (a ValueError, e.g. a damaged cache file) stays one: the command line reports those in one line.
        raise (ValueError if bad_input else RuntimeError)(f"rank 0 failed: {message}")
    return value


def barrier() -> None:
    import torch.distributed as dist

    if _dist_group_active():
        dist.barrier()


def _globs(names: str | tuple[str, ...]) -> tuple[str, ...]:
    return (names,) if isinstance(names, str) else tuple(names)


def _chunk_files(out_dir: Path, chunk_glob: str | tuple[str, ...]) -> list[Path]:
    return sorted({p for g in _globs(chunk_glob) for p in out_dir.glob(g)})


def clean_temporaries(out_dir: Path, names: str | tuple[str, ...]) -> None:
    """Remove the temporary files that killed writes of files named like `names` (globs) left behind.

    Only those: the folder may be the caller's own, holding other temporary files.
    """
    for p in _chunk_files(out_dir, tuple(f".{g}.*.tmp" for g in _globs(names))):
        p.unlink(missing_ok=True)


def open_chunk_dir(out_dir: Path, header: dict, manifest: str, keys: Sequence[str], defaults: dict,
                   chunk_glob: str | tuple[str, ...], untrusted: str = "refuse") -> str | None:
    """Check or write `out_dir`'s manifest; the error message if the directory belongs to another job.

    Chunk files that no matching manifest vouches for (none, or one of other settings) cannot be
    reused: `untrusted` "refuse" (an error) or "remove" them (the directory starts afresh).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / manifest
    problem = None
    if path.is_file():
        try:
            old = read_json(path)
        except OSError as exc:  # unreadable now (permissions, a network filesystem): never a reason to delete
            return f"cache: {str(path)!r} cannot be read ({exc}); check the directory or use a fresh one"
        except ValueError as exc:  # not JSON: untrusted
            old, problem = None, f"cache: {str(path)!r} is damaged ({exc}); use a fresh directory"
        for key in keys if old is not None else ():
            if old.get(key, defaults.get(key)) != header[key]:
                problem = (f"cache: {str(out_dir)!r} was made under another model/data/plan or set of variants "
                           f"({key}: {old.get(key, defaults.get(key))!r} there, {header[key]!r} here); "
                           "use a fresh directory")
                break
    else:
        stray = [p.name for p in _chunk_files(out_dir, chunk_glob)]
        if stray:
            problem = (f"cache: {str(out_dir)!r} holds chunk files ({stray[0]}, ...) but no {manifest}, so they "
                       "cannot be trusted; use a fresh directory")
    if problem and untrusted != "remove":
        return problem
    if problem or not path.is_file():
        for p in _chunk_files(out_dir, chunk_glob):
            p.unlink(missing_ok=True)
        write_json(path, header)
    clean_temporaries(out_dir, (*_globs(chunk_glob), manifest))
    return None


def deal_chunks(out_dir: Path, header: dict, *, device: torch.device | str, manifest: str, keys: Sequence[str],
                n_chunks: int, done: Callable[[int], bool], chunk_glob: str | tuple[str, ...], caller: str,
                same_hint: str,
                defaults: dict | None = None, untrusted: str = "refuse") -> tuple[int, int, list[int]]:
    """(rank, world, this rank's chunks): the chunks of `out_dir` not yet `done`, dealt round-robin.

    Joins the torchrun process group if there is one (see :func:`init_distributed`).
    Every rank must call it with the same `header` (its `keys` are compared across ranks; any
    difference raises on every rank, naming `same_hint`). Rank 0 alone checks the directory and
    lists the unfinished chunks before any rank writes; every rank then raises the same error or
    takes its share of the same list.
    """
    rank, world = init_distributed(device)
    headers = all_gather(header)
    for r, other in enumerate(headers):
        diff = [key for key in keys if other[key] != headers[0][key]]
        if diff:  # e.g. unlearned weights that came out differently on two ranks: every rank raises
            raise ValueError(f"{caller}: rank {r} was called with another {diff[0]} than rank 0 "
                             f"({other[diff[0]]!r} vs {headers[0][diff[0]]!r}); {same_hint}")
    failure: BaseException | None = None
    if rank == 0:
        try:
            error = open_chunk_dir(out_dir, header, manifest, keys, defaults or {}, chunk_glob, untrusted)
            todo = [] if error else [k for k in range(n_chunks) if not done(k)]
        # Any failure (e.g. an unwritable directory) is passed on: the other ranks must not wait for rank 0.
        except Exception as exc:  # noqa: BLE001
            failure, error, todo = exc, f"rank 0 could not open {str(out_dir)!r}: {exc!r}", []
        decision = (error, todo, failure is not None)
    else:
        decision = None
    error, todo, crashed = broadcast(decision)
    if failure is not None:
        raise failure
    if error:
        raise (RuntimeError if crashed else ValueError)(error)
    return rank, world, todo[rank::world]
