"""Retraining without a set of images: jobs, a process pool, and a cache that never redoes work.

A user supplies the training function (``TrainFn``): given the image ids to leave out,
an output directory and whether randomness is coupled, it trains the model from
scratch and saves it there (diffusers layout).  Each retrain is identified by its
set of removed ids and protocol, so a set chosen by two methods is trained once, and a
finished retrain (its measurements on disk) is never redone after an interruption.  A model
is trained into a hidden folder and renamed into place once ``train_fn`` has returned and the
model loads, so a training that was killed or saved a broken model is redone, not reused.

Right after training, the worker measures the retrained model on every query
(:mod:`.counterfactual`): cheap next to training, and it lets the report show how a
removal moves unrelated queries too.  A measurement records which queries it measured;
when the queries or the measurement settings change, a retrained model still on disk is
measured again rather than trained again.
"""
from __future__ import annotations

import hashlib
import io
import json
import multiprocessing as mp
import os
import signal
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..attribution.io import write_bytes, write_dir
from ..threads import torch_threads
from .base import Query, say

TrainFn = Callable[[Sequence[int], Path, bool], None]
"""train_fn(exclude_ids, out_dir, coupled): train from scratch without those ids; save to out_dir."""


@dataclass(frozen=True)
class RetrainJob:
    exclude: tuple[int, ...]
    coupled: bool = True

    @property
    def key(self) -> str:
        blob = json.dumps({"exclude": sorted(self.exclude), "coupled": self.coupled})
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class MeasureSettings:
    """How a retrained model is measured (the same for the original)."""

    loss_stride: int = 5
    loss_draws: int = 2
    loss_seed: int = 0
    gen_steps: int = 25
    guidance_scale: float = 1.5
    threads: int = 1


def measure(model_dir: Path, queries: Sequence[Query], settings: MeasureSettings) -> dict[str, torch.Tensor]:
    """{"losses": float64 [Q], "images": float32 [Q, C, H, W]} of the model in `model_dir`."""
    from ..attribution.model import DiffusionModel
    from .counterfactual import query_losses, regenerate

    with torch_threads(settings.threads):
        model = DiffusionModel.load(model_dir)
        losses = query_losses(model, queries, stride=settings.loss_stride, draws=settings.loss_draws,
                              seed=settings.loss_seed)
        images = regenerate(model, queries, steps=settings.gen_steps, guidance_scale=settings.guidance_scale)
    return {"losses": torch.as_tensor(losses, dtype=torch.float64), "images": images,
            "queries": [q.fingerprint() for q in queries], "settings": asdict(settings)}


def _save(path: Path, obj: dict) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    write_bytes(path, buf.getvalue())


def trained_model(train_fn: TrainFn, job: RetrainJob, root: Path) -> Path:
    """The job's model folder `root/<key>`, trained first unless a complete one is there."""
    from ..attribution.model import DiffusionModel

    final = Path(root) / job.key

    def fill(tmp: Path) -> None:
        tmp.rmdir()  # out_dir does not exist yet when train_fn is called (it may copy a folder there)
        train_fn(list(job.exclude), tmp, job.coupled)
        if not tmp.is_dir() or not any(tmp.iterdir()):
            raise ValueError(f"train_fn: returned without saving a model to out_dir ({str(tmp)!r}); it must "
                             "save the trained pipeline there with save_pretrained")
        try:  # a model that cannot be loaded would stop every later run if it were kept
            DiffusionModel.load(tmp)
        except ValueError as exc:
            raise ValueError(f"train_fn: the model it saved does not load: {exc}; save the whole pipeline "
                             "(tokenizer/, text_encoder/, unet/, scheduler/) to out_dir") from None

    if not final.is_dir():
        write_dir(final, fill)  # renamed into place once whole: a killed or failed training leaves nothing there
    return final


def _job(train_fn: TrainFn, job: RetrainJob, root: Path, queries: Sequence[Query], settings: MeasureSettings
         ) -> tuple[str, float]:
    t = time.perf_counter()
    model_dir = trained_model(train_fn, job, root)
    seconds = time.perf_counter() - t
    result = measure(model_dir, queries, settings)
    result["train_seconds"] = seconds
    result["exclude"] = list(job.exclude)
    result["coupled"] = job.coupled
    _save(root / f"{job.key}.pt", result)
    return job.key, seconds


def load_measurement(root: Path, job: RetrainJob, queries: Sequence[Query] | None = None,
                     settings: MeasureSettings | None = None) -> dict | None:
    """The job's measurement, or None if there is none (or, given `queries` / `settings`, it measured
    other queries or measured them otherwise)."""
    path = Path(root) / f"{job.key}.pt"
    if not path.is_file():
        return None
    m = torch.load(path, weights_only=False)
    if queries is not None and m.get("queries") != [q.fingerprint() for q in queries]:
        return None
    if settings is not None and m.get("settings") != asdict(settings):
        return None
    return m


def worker_pool(workers: int) -> ProcessPoolExecutor:
    """A pool of `workers` processes that end with this one, however it ends (on Linux)."""
    # spawn: a fresh interpreter per worker; forking a process that already ran torch threads can hang.
    return ProcessPoolExecutor(workers, mp_context=mp.get_context("spawn"), initializer=_end_with_parent,
                               initargs=(os.getpid(),))


def _end_with_parent(parent: int) -> None:
    """In a worker: be sent SIGTERM when the parent ends. A parent killed (SIGKILL) runs no clean-up,
    and a worker in the middle of a retrain would otherwise train on for minutes, unseen."""
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # the parent ended before the line above took effect
        os._exit(1)


def _failed(job: RetrainJob, exc: BaseException, log: Callable[[str], None] | None) -> None:
    where = f"the retrain that removes {len(job.exclude)} images {list(job.exclude)[:10]} (retrains/{job.key})"
    if log:
        log(f"  {where} failed: {type(exc).__name__}: {exc}")
    if hasattr(exc, "add_note"):  # Python >= 3.11: the error names its retrain even without a log
        exc.add_note(f"in {where}")


def _stop(pool: ProcessPoolExecutor) -> None:
    """Cancel what is queued and end the retrains in flight: a rerun redoes them (they are not renamed into place).

    Cancelling alone is not enough: the calls already handed to the workers' queue would still run, and the
    interpreter's exit would wait for them."""
    terminate = getattr(pool, "terminate_workers", None)  # Python >= 3.14
    procs = [] if terminate else list((getattr(pool, "_processes", None) or {}).values())
    pool.shutdown(wait=False, cancel_futures=True)
    if terminate:
        terminate()
    for p in procs:
        p.terminate()


def run_retrains(jobs: Sequence[RetrainJob], train_fn: TrainFn, root: Path, queries: Sequence[Query],
                 settings: MeasureSettings, *, workers: int = 2, log: Callable[[str], None] | None = say
                 ) -> dict[str, dict]:
    """Train and measure every job not measured yet; returns {job key: measurement}.

    A failing retrain (or an interrupt) stops the others at once and is raised, naming its removal."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    unique = list({j.key: j for j in jobs}.values())
    done = {j.key: load_measurement(root, j, queries, settings) for j in unique}
    todo = [j for j in unique if done[j.key] is None]
    if log and todo:
        again = sum((root / j.key).is_dir() for j in todo)
        log(f"retraining {len(todo) - again} and measuring {len(todo)} of {len(unique)} models "
            f"({len(unique) - len(todo)} cached), {workers} at a time")
    if todo:
        t0 = time.perf_counter()
        if workers <= 1:
            for i, j in enumerate(todo):
                try:
                    _, s = _job(train_fn, j, root, queries, settings)
                except Exception as exc:
                    _failed(j, exc, log)
                    raise
                if log:
                    log(f"  retrain {i + 1}/{len(todo)} ({s:.0f} s)")
        else:
            pool = worker_pool(workers)
            try:
                futures = {pool.submit(_job, train_fn, j, root, queries, settings): j for j in todo}
                for i, f in enumerate(as_completed(futures)):
                    try:
                        _, s = f.result()
                    except Exception as exc:
                        _failed(futures[f], exc, log)
                        raise
                    if log:
                        left = (time.perf_counter() - t0) / (i + 1) * (len(todo) - i - 1)
                        log(f"  retrain {i + 1}/{len(todo)} ({s:.0f} s; about {left / 60:.0f} min left)")
            except BaseException:
                _stop(pool)
                raise
            pool.shutdown()
    for j in todo:
        done[j.key] = load_measurement(root, j, queries, settings)
    return done
