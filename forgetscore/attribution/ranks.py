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
import secrets
from collections.abc import Callable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import TypeVar

import torch

from .io import read_json, write_json

T = TypeVar("T")
# How long ranks wait for each other to start: a rank that stopped before joining (a bad argument on one node)
# must not keep the others waiting as long as a collective may take.
JOIN_TIMEOUT = timedelta(minutes=10)
SAME_OPTIONS = "give every rank the same options"


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


def init_distributed(device: torch.device | str = "cpu", timeout: timedelta = timedelta(hours=6),
                     join_timeout: timedelta = JOIN_TIMEOUT) -> tuple[int, int]:
    """Join the process group torchrun describes in the environment (gloo on CPU, nccl on CUDA), if any.

    Does nothing when a group is already running or the environment names no several ranks.
    The long timeout covers the barrier where ranks that finished their chunks wait for the rest; the ranks
    wait `join_timeout` for each other to start (and to meet at their first collective).
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
    _import_group_defaults()
    # The rendezvous store's own timeout bounds the join (and NCCL's setup at the first collective), the group's
    # the collectives: without the split a rank missing from the start kept the others waiting for hours.
    try:
        store, rank, world = next(dist.rendezvous("env://", rank, world, timeout=join_timeout))
        store.set_timeout(join_timeout)
        dist.init_process_group(backend=backend, store=dist.PrefixStore("default_pg", store), rank=rank,
                                world_size=world, timeout=timeout)
        barrier()
    except RuntimeError as exc:  # torch's DistStoreError and the backends' errors are RuntimeErrors
        raise TimeoutError(f"rank {rank}: the {world} ranks did not all start within {join_timeout} (a rank stopped "
                           f"before joining, or was never started: see its output) ({exc})") from None
    store.set_timeout(timeout)
    return dist.get_rank(), dist.get_world_size()


def _import_group_defaults() -> None:
    """Import, before the group exists, the torch modules whose functions take the running group as a default.

    Such a default is bound when its module is first imported. Imported while a group runs (diffusers imports
    them when a model loads, after the join), they keep that group and its communication threads alive past
    `destroy_process_group`, into the interpreter's teardown, where a rank now and then aborted after all its
    work ("terminate called without an active exception"). Imported first, they bind no group.
    """
    import importlib

    for name in ("torch.distributed.nn", "torch.distributed.optim"):
        try:
            importlib.import_module(name)
        except ImportError:  # a torch built without them has nothing to bind the group either
            pass


def leave_distributed() -> None:
    """Leave the process group, if this process joined one.

    Its communication threads then stop before the interpreter's teardown (see
    :func:`_import_group_defaults` for what else must not hold the group).
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


def agree(fn: Callable[[], T], settings: Callable[[T], dict] | None = None, caller: str = "ranks") -> T:
    """`fn()` on every rank, ending in one collective whatever happens, so that ranks stay in step.

    For checks that can fail on one rank alone (a path missing on one machine, other options on one
    node): a failure on any rank raises on every rank (its own error where it happened, the failing
    rank's message elsewhere), and `settings(value)` of each rank, when given, must equal rank 0's, else
    every rank raises naming the first key that differs. Without a process group it is just `fn()`.
    """
    if not _dist_group_active():
        return fn()
    value, failure, mine = None, None, None
    try:
        value = fn()
        mine = settings(value) if settings is not None else None
    except Exception as exc:  # noqa: BLE001 - passed on to every rank below
        failure = exc
    kind = (None if failure is None else "value" if isinstance(failure, ValueError)
            else "os" if isinstance(failure, OSError) else "other")
    gathered = all_gather((kind, None if failure is None else str(failure), mine))
    error: BaseException | None = failure
    for r, (other_kind, message, _) in enumerate(gathered):
        if error is None and other_kind is not None:
            error = {"value": ValueError, "os": OSError}.get(other_kind, RuntimeError)(f"rank {r} failed: {message}")
    first = gathered[0][2] or {}
    for r, (_, _, other) in enumerate(gathered):
        for key in first if error is None else ():
            if other[key] != first[key]:
                shown = [repr(v) if len(repr(v)) <= 80 else repr(v)[:77] + "..." for v in (other[key], first[key])]
                error = ValueError(f"{caller}: rank {r} was started with another {key} than rank 0 ({shown[0]} vs "
                                   f"{shown[1]}); {SAME_OPTIONS}")
                break
    if error is not None:
        # Every rank stops here, so every rank meets this barrier: none leaves (and closes its connections) while
        # another still reads the gather, which a fast exit could cut off ("connection closed by peer").
        barrier()
        raise error
    return value


def check_shared(folder: Path, argument: str) -> None:
    """That every rank sees `folder` as one folder (a file rank 0 writes there), as ranks sharing work need."""
    if not _dist_group_active():
        return
    rank, _ = distributed_env()
    token = broadcast(secrets.token_hex(8) if rank == 0 else None)
    probe = folder / f".forgetscore-ranks-{token}"
    made = False
    if rank == 0:
        made = not folder.exists()
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
    barrier()
    seen = probe.is_file() and probe.read_text() == token
    seen_by = all_gather(seen)
    barrier()
    if rank == 0:
        probe.unlink(missing_ok=True)
        if made:
            try:
                folder.rmdir()  # made for the check alone; the stages make it again
            except OSError:
                pass
    missing = [r for r, ok in enumerate(seen_by) if not ok]
    if missing:
        raise ValueError(f"{argument}: {str(folder)!r} is not one folder for all ranks: rank {missing[0]} does not "
                         "see a file rank 0 wrote there; with several ranks the cache must be on a filesystem all of "
                         "them share, at a path each of them is given")


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
