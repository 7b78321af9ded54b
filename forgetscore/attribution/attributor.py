"""The Attributor: one object that runs the whole method on a model and its training set.

    attributor = Attributor.load("model/", "train/")
    attributor.prepare()                 # encode images and captions once
    attributor.fisher()                  # diagonal Fisher of the training loss (cached)
    result = attributor.attribute(query, "a prompt", k=10)
    result.save("out/", train_dir="train/")

Every expensive product (prepared inputs, Fisher, before-unlearning losses) is cached
on disk under ``cache_dir``, keyed by the identities of the model, the data and the
plan, and reused whenever they match.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import numbers
import os
import sys
import time
import warnings
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..cache import cache_root
from ..kernels import validate
from . import params
from .cache_index import (fmt_size, folder_size, forget_training_folder, record_training_folder,
                          recorded_training_folders, training_state)
from .data import TEXT_DTYPES, PreparedData, TrainingSet, image_pixels, load_image, made_by_earlier_format, prepare
from .fisher import (FISHER_CHUNK, FISHER_FORMAT, as_count, auto_fisher_batch_size, resumable_fisher_batch_size,
                     run_fisher)
from .generate import generate
from .io import check_writable, clean_removed, read_json, remove_dir, write_bytes, write_json, write_npy
from .locks import hold_folder, let_go_of_folder, stage_lock, unless_busy
from .losses import LossSweep
from .model import DiffusionModel
from .plan import ScoringPlan
from .results import Attribution, names_id, rounding_note
from .ranks import agree, all_gather, barrier, check_shared, init_distributed, on_rank0, rank_device
from .sweep import SWEEP_FORMAT, indices_id, matching_sweeps, other_chunk_sizes, run_sweep, sweep_header, variant_id
from .train_loss import row_losses
from .unlearning import UnlearnConfig, unlearn

REDUCTIONS = ("max", "mean")
GENERATE_STEPS, GENERATE_GUIDANCE = 50, 3.0  # Attributor.generate's sampling, as generation_record records it
QUERY_LOSS_STREAM = 0x514C4F53


@dataclass
class Timings:
    """Seconds and item counts of each stage, for the report at the end of a run (a stage run again, e.g.
    the unlearning of each of several queries, adds up)."""
    stages: dict[str, tuple[float, int, str]] = field(default_factory=dict)
    # Of each stage's seconds, those spent waiting for another job's turn at it: no rate is made of them.
    waited: dict[str, float] = field(default_factory=dict)

    def add(self, name: str, seconds: float, count: int = 0, unit: str = "", waited: float = 0.0) -> None:
        """`count` items of `unit` that this job computed itself in `seconds`, `waited` of which it waited for
        another job (items another job made, or a resume found finished, are not counted)."""
        before_s, before_n, _ = self.stages.get(name, (0.0, 0, unit))
        self.stages[name] = (before_s + seconds, before_n + count, unit)
        if waited > 0:
            self.waited[name] = self.waited.get(name, 0.0) + waited

    def lines(self, total: float | None = None, width: int = 16) -> list[str]:
        """One line per stage, then one of the `total` seconds if given, in columns."""
        width = max([width, *map(len, self.stages)])
        out = []
        for name, (s, n, unit) in self.stages.items():
            waited = self.waited.get(name, 0.0)
            r = n / (s - waited) if n and s - waited > 0 else None
            said = [] if r is None else [f"{r:,.0f} {unit}/s" if r >= 10 else f"{r:.2g} {unit}/s"]
            if waited:
                said.append(f"{waited:.1f} s of it waiting for another job")
            out.append(f"  {name:<{width}} {s:8.1f} s" + (f"  ({'; '.join(said)})" if said else ""))
        if total is not None:
            out.append(f"  {'total':<{width}} {total:8.1f} s")
        return out


class Attributor:
    """Attribution by unlearning for one model, one training set and one scoring plan."""

    def __init__(self, model: DiffusionModel, train: TrainingSet, *, plan: ScoringPlan | None = None,
                 weights: str = "kv", cache_dir: str | os.PathLike | None = None, batch_size: int | str = "auto",
                 backend: str = "auto", progress: bool = True, resize: bool = False, chunk_size: int = 4096,
                 precision: str = "auto", prefetch: bool = True, compile: str | None = None,
                 fisher_batch_size: int | str = "auto", fisher_chunk_size: int = FISHER_CHUNK,
                 text_dtype: str = "float32"):
        from .. import kernels
        from .losses import auto_batch_size, check_noise_device, compile_mode, resolve_precision

        for arg, value, kind, hint in (("model", model, DiffusionModel, "DiffusionModel.load(folder)"),
                                       ("train", train, TrainingSet, "TrainingSet.load(folder)"),
                                       ("plan", plan, ScoringPlan, "ScoringPlan() or ScoringPlan.with_stride(50)")):
            if not isinstance(value, kind) and not (arg == "plan" and value is None):
                raise ValueError(f"{arg}: expected a {kind.__name__} (e.g. {hint}), got {type(value).__name__}")
        self.model, self.train = model, train
        # Under torchrun every rank runs the same calls; rank 0 writes what is shared.
        self.rank, self.world = init_distributed(model.device)

        def settings() -> None:
            # Settings that would otherwise fail only after the long stages before them.
            self.plan = plan or ScoringPlan()
            self.plan.check_model(model.num_train_timesteps)
            self.names = params.select(model.unet, weights)
            self.weights = weights
            self.backend, self.resize = backend, resize
            self.chunk_size = as_count("chunk_size", chunk_size)
            self.fisher_chunk_size = as_count("fisher_chunk_size", fisher_chunk_size)
            self.fisher_batch_size = _batch_or_auto(fisher_batch_size, "fisher_batch_size")
            self.batch_size = _batch_or_auto(batch_size, "batch_size")
            kernels.resolve(backend, model.device)
            check_noise_device(self.plan)
            if text_dtype not in TEXT_DTYPES:
                raise ValueError(f"text_dtype: {text_dtype!r} is not one of {list(TEXT_DTYPES)}")
            self.text_dtype = text_dtype
            self.precision = resolve_precision(precision, model.device)
            # Sweep options that leave the numbers as they are (prefetch) or change only their last bits (compile).
            self.prefetch, self.compile = bool(prefetch), compile_mode(compile, model.device)
            self._own_cache_dir = cache_dir is None  # made here, under the cache root: removable when left empty
            root = Path(cache_dir) if cache_dir is not None else cache_root() / "runs"
            self.cache_dir = root / f"{model.encoders_id()}-{train.identity()}" if cache_dir is None else root
            # Named as the user chose the folder: the argument, or the environment variable that moves the default.
            self._cache_argument = ("cache" if cache_dir is not None or "FORGETSCORE_CACHE" not in os.environ
                                    else "FORGETSCORE_CACHE")
            check_writable(self.cache_dir, self._cache_argument)

        # A check failing on one rank alone (a folder missing on one machine) stops every rank, and ranks started
        # with other settings are refused before they compute different things.
        agree(settings, lambda _: self._rank_settings())
        check_shared(self.cache_dir, self._cache_argument)
        self.batch_size_probed = self.batch_size == "auto"
        if self.batch_size_probed:
            # Each rank probes its own GPU; the ranks must sweep alike, so all take the smallest.
            self.batch_size = min(all_gather(auto_batch_size(model, self.precision)))
        self.progress = progress and self.rank == 0
        self.timings = Timings()
        self._data: PreparedData | None = None
        self._said_samples: set[int] = set()  # cached Fisher counts used in place of the default, said once
        self._finished: list[tuple[Path, Path]] = []  # sweep folders (and their locks) not yet kept
        # From its first stage (every stage starts with prepare) until close(), or until the Attributor is freed or
        # the process ends, the cache folder is this job's: `forgetscore cache --remove-stale` leaves it alone, in
        # the locked stages and between them (the unlearning step holds no stage lock).
        self._let_go: weakref.finalize | None = None

    def _hold(self) -> None:
        if self._let_go is None or not self._let_go.alive:
            self._let_go = weakref.finalize(self, let_go_of_folder, self.cache_dir, hold_folder(self.cache_dir),
                                            self._own_cache_dir)

    def close(self) -> None:
        """Let go of the cache folder (held from the first stage on): `forgetscore cache --remove-stale` may then
        delete it once it is stale. Closing twice does nothing; a `with` block closes at its end."""
        if self._let_go is not None:
            self._let_go()

    def __enter__(self) -> "Attributor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _rank_settings(self) -> dict:
        """What every rank must share (compared across ranks when they start): the numbers depend on it."""
        return {"model": (self.model.encoders_id(), self.model.unet_id()),
                # Names and captions, not modification times: each machine may hold its own copy of the folder.
                "training set": (len(self.train), names_id(self.train.file_names),
                                 hashlib.sha256(json.dumps(self.train.captions).encode()).hexdigest()[:16]),
                "plan": self.plan.to_dict(), "weights": self.names, "precision": self.precision,
                "text_dtype": self.text_dtype, "resize": self.resize, "batch_size": self.batch_size,
                "chunk_size": self.chunk_size, "fisher_batch_size": self.fisher_batch_size,
                "fisher_chunk_size": self.fisher_chunk_size, "compile": self.compile}

    @classmethod
    def load(cls, model_dir: str | os.PathLike, train_dir: str | os.PathLike, **kw) -> "Attributor":
        for arg, value in (("model_dir", model_dir), ("train_dir", train_dir)):
            if not isinstance(value, (str, os.PathLike)):
                raise ValueError(f"{arg}: expected a folder path, got {type(value).__name__}")
        device = rank_device(kw.pop("device", "cpu"))
        init_distributed(device)  # joined first: a folder missing on one machine then stops every rank
        # Cheap checks first: a bad folder fails before a model load.
        train, model = agree(lambda: (TrainingSet.load(train_dir), DiffusionModel.load(model_dir, device=device)))
        return cls(model, train, **kw)

    # --- stages --------------------------------------------------------------------------
    @contextlib.contextmanager
    def _stage(self, lock: Path, doing: str) -> Iterator[list[float]]:
        """:func:`.locks.stage_lock` for this job; yields [the seconds it waited for another job's turn]."""
        asked: list[float] = []

        def log(message: str) -> None:  # said as the wait begins
            asked.append(time.perf_counter())
            self._log(message)

        with stage_lock(lock, doing, log):
            yield [time.perf_counter() - asked[0] if asked else 0.0]

    def prepare(self) -> PreparedData:
        if self._data is not None:
            self._hold()  # again after close(): every stage, its data prepared or not, works in the folder
            return self._data
        t = time.perf_counter()
        # Under torchrun the ranks share the shards; every rank gets the finished data.
        # Each caption store has its own folder (and data_id), so a cache can hold both; the folders are
        # this Attributor's own, so shard files no manifest vouches for are removed.
        folder = "prepared" if self.text_dtype == "float32" else f"prepared-{self.text_dtype}"
        try:
            self._hold()
            on_rank0(self._tidy)
            if self._own_cache_dir:
                on_rank0(self._note_earlier_states)
            with self._stage(self.cache_dir / f".{folder}.lock", "preparing this training set") as waited:
                # The images another job (this one waited for) or a killed run encoded are no work of this job's.
                done = on_rank0(lambda: self._images_prepared(self.cache_dir / folder))
                added = False
                try:
                    # Recorded first (under the lock: no job's path is lost), so that a preparation that
                    # fails or is killed midway leaves a folder `forgetscore cache` can tie to its training
                    # folder, and call stale once that folder is fixed (and so has another identity).
                    if self.rank == 0:
                        added = record_training_folder(self.cache_dir, self.train.root)
                    self._data = prepare(self.model, self.train, self.cache_dir / folder, resize=self.resize,
                                         text_dtype=self.text_dtype, progress=self.progress, untrusted="remove")
                except BaseException:
                    if self.rank == 0:  # not a collective: the other ranks may not have failed
                        self._drop_unstarted(self.cache_dir / folder)
                        if added and not self._preparing_here(self.cache_dir / folder):
                            # Refused before it started (e.g. a cache of another model): left as found.
                            forget_training_folder(self.cache_dir, self.train.root)
                    raise
        except BaseException:
            # Nothing of this job's is in the folder without its prepared data: it is let go (a stage tried
            # later holds it again).
            self.close()
            # Once its lock files are gone too: the training set's cache folder under the cache root, if
            # nothing else is in it (once the training folder is fixed it has another identity).
            if self.rank == 0 and self._own_cache_dir:
                with contextlib.suppress(OSError):  # not empty: other stages' files
                    self.cache_dir.rmdir()
            raise
        if self.rank == 0:
            self._drop_earlier_reading()
        self.timings.add("prepare", time.perf_counter() - t, len(self.train) - done, "img", waited[0])
        return self._data

    def _images_prepared(self, folder: Path) -> int:
        """How many images of this training set `folder` holds encoded already (finished, or in the finished shards
        of an unfinished preparation); 0 where it holds another preparation, which starts afresh."""
        from .data import CACHE_FORMAT

        try:
            manifest = read_json(folder / "manifest.json")
        except (OSError, ValueError):
            return 0
        if not isinstance(manifest, dict) or [manifest.get(k) for k in ("format", "encoders_id", "data_id")] != [
                CACHE_FORMAT, self.model.encoders_id(), self.train.identity()]:
            return 0
        if manifest.get("complete"):
            return len(self.train)
        rows = 0
        for shard in folder.glob("inputs-[0-9]*.npy"):
            with contextlib.suppress(OSError, ValueError, EOFError):
                rows += np.load(shard, mmap_mode="r", allow_pickle=False).shape[0]
        return min(rows, len(self.train))

    def _drop_earlier_reading(self) -> None:
        """Remove the before-losses and Fisher files made from prepared data of an earlier cache format (their
        data id names no format): this version never reads them, and they would stay in the folder for good."""
        from safetensors import safe_open

        for meta in self.cache_dir.glob("before-*.json"):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                if made_by_earlier_format(read_json(meta).get("data_id")):
                    meta.unlink()
                    meta.with_suffix(".npy").unlink(missing_ok=True)
        for path in self.cache_dir.glob("fisher-*.safetensors"):
            with contextlib.suppress(Exception):  # unreadable or not ours: left as found
                with safe_open(str(path), "pt") as fh:
                    made = json.loads(fh.metadata()["forgetscore"])
                if made_by_earlier_format(made.get("data_id")):
                    path.unlink()

    def _note_earlier_states(self) -> None:
        """Say which cache folders under the cache root hold this training folder as it was before a change.

        Their name holds the folder's identity (its files' sizes and modification times), so a change starts
        a new folder and the old one, as large as the prepared data, would stay unnoticed. Each folder records
        the training folder it was made for (written as its preparation starts); the user decides what to delete.
        """
        here = str(Path(self.train.root).resolve())
        for other in sorted(self.cache_dir.parent.glob(f"{self.model.encoders_id()}-*")):
            try:
                if other == self.cache_dir or here not in recorded_training_folders(other):
                    continue
                if training_state(other)[1] == "current":  # a copy of the folder as it was still reads it
                    continue
                size = folder_size(other)
            except OSError:
                continue
            self._log(f"cache: {str(other)!r} ({fmt_size(size)}) holds this training folder as it was "
                      "before it changed; nothing reads it now: delete it to free the space (`forgetscore cache "
                      "--remove-stale` deletes every such folder)")

    def _preparing_here(self, folder: Path) -> bool:
        """Whether `folder` holds a preparation (finished or not) of this training set by this model's encoders."""
        try:
            manifest = read_json(folder / "manifest.json")
        except (OSError, ValueError):
            return False
        return isinstance(manifest, dict) and manifest.get("encoders_id") == self.model.encoders_id() \
            and manifest.get("data_id") == self.train.identity()

    def _drop_unstarted(self, folder: Path) -> None:
        """Remove a prepare's folder that holds no finished shard (e.g. its first image was unreadable): once the
        training folder is fixed it has another identity, so it would stay behind for good."""
        if folder.is_dir() and not any(folder.glob("inputs-[0-9]*.npy")):
            remove_dir(folder)

    def _tidy(self) -> None:
        """Finish what killed runs left in the cache: folder removals cut short, temporary files of writes."""
        # Only what this class writes: the cache folder may be one the user also keeps other files in.
        for folder, names in ((self.cache_dir, ("before-*", "fisher-*")), (self.cache_dir / "sweeps", ("*",))):
            if folder.is_dir():
                clean_removed(folder, names)

    def _key(self, *parts: object) -> str:
        return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def fisher(self, samples: int | None = None, *, seed: int = 0, batch_size: int | None = None,
               chunk_size: int | None = None, path: str | os.PathLike | None = None) -> dict[str, torch.Tensor]:
        """The diagonal Fisher of the selected weights (`samples`: default :meth:`fisher_samples`).

        Computed once and cached; in resumable chunks of samples that the ranks share under torchrun
        (`batch_size`, `chunk_size`: default the Attributor's `fisher_batch_size`, `fisher_chunk_size`).
        `path`: a file of the caller's in place of the cache, read as it is when it exists (with `samples` None,
        whatever count it holds; a file of another count than `samples` is refused), else computed into it.
        """
        # The seed as given: the Fisher mixes it with stream constants, and an error there would show another number.
        seed = validate.seed(seed)
        batch_size = _batch_or_auto(self.fisher_batch_size if batch_size is None else batch_size, "batch_size")
        chunk_size = as_count("chunk_size", self.fisher_chunk_size if chunk_size is None else chunk_size)
        samples = None if samples is None else as_count("samples", samples)
        if path and samples is not None:
            self._check_fisher_file(Path(path), samples)
        if samples is None and path is None:
            samples = self._default_fisher_samples(seed)
        samples = 5 * self.prepare().n if samples is None else samples  # after the cheap checks
        meta = self._fisher_meta(samples, seed)
        path = Path(path) if path else self.cache_dir / f"fisher-{self._key(meta)}.safetensors"
        # Rank 0 looks, every rank follows: ranks must make the same collective calls whatever each one's view of
        # a network filesystem.
        if not on_rank0(path.is_file):
            with self._stage(path.with_name(f".{path.name}.lock"), "computing this Fisher") as waited:
                if not on_rank0(path.is_file):  # it may have been made by the job this one waited for
                    self._make_fisher(path, meta, batch_size, chunk_size)
            if waited[0]:
                self.timings.add("fisher", waited[0], 0, "samples", waited[0])
        return load_fisher(path, self.model, self.names)

    def _check_fisher_file(self, path: Path, samples: int) -> None:
        """That a Fisher file the user named holds `samples` samples, if it exists and records its count.

        As the cache never serves a Fisher of another count for a count asked for, neither does a named file;
        nor is it recomputed, which would overwrite a file of the user's.
        """
        held = on_rank0(lambda: self._cached_fisher_samples(path) if path.is_file() else None)
        if held is not None and held != samples:
            raise ValueError(f"samples: {samples}, but path {str(path)!r} holds a Fisher of {held} samples; pass "
                             f"samples={held} (or None) to use it, or another path to compute one of {samples}")

    def fisher_samples(self, samples: int | None = None, *, seed: int = 0) -> int:
        """The sample count of the Fisher that :meth:`fisher` uses for `samples` (None: the default).

        The default is five epochs of the training set (5n, the paper), unless that Fisher is not cached
        and another count's is, for these weights and settings (made e.g. by ``forgetscore fisher
        --fisher-samples M``): then the largest cached count, rather than hours spent on a second Fisher.
        """
        if samples is not None:
            return as_count("samples", samples)
        epochs5 = 5 * self.prepare().n

        def cached() -> list[int]:
            if (self.cache_dir / f"fisher-{self._key(self._fisher_meta(epochs5, seed))}.safetensors").is_file():
                return [epochs5]
            return [m for m in map(self._cached_fisher_samples, self.cache_dir.glob("fisher-*.safetensors"))
                    if m is not None and (self.cache_dir / f"fisher-{self._key(self._fisher_meta(m, seed))}"
                                                            ".safetensors").is_file()]

        found = on_rank0(cached)  # rank 0 looks, every rank follows
        return max(found) if found else epochs5

    def _default_fisher_samples(self, seed: int = 0) -> int:
        """:meth:`fisher_samples`' default, said once when it is not five epochs."""
        samples = self.fisher_samples(seed=seed)
        if samples != 5 * self.prepare().n and samples not in self._said_samples:
            self._said_samples.add(samples)
            self._log(f"fisher: using the cached Fisher of {samples} samples, not five epochs "
                      f"({5 * self.prepare().n}); --fisher-samples N computes one of N samples")
        return samples

    def _fisher_meta(self, samples: int, seed: int) -> dict:
        data = self.prepare()
        return {"unet_id": self.model.unet_id(), "data_id": data.data_id, "names": self.names,
                "samples": samples, "seed": seed, "flips": self.plan.flips, "captions": self.plan.captions,
                "format": FISHER_FORMAT}

    @staticmethod
    def _cached_fisher_samples(path: Path) -> int | None:
        """The sample count a cached Fisher file records (None: unreadable); whether it fits is the caller's check."""
        from safetensors import safe_open

        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["forgetscore"])
            return int(meta["samples"])
        except Exception:  # noqa: BLE001  (a damaged or foreign file is no candidate)
            return None

    def _make_fisher(self, path: Path, meta: dict, batch_size: int | str, chunk_size: int) -> None:
        t = time.perf_counter()
        if batch_size == "auto":
            batch_size = self._auto_fisher_batch(path, chunk_size)
        # Chunks of other settings (batch and chunk sizes change the last bits) have their own folders; the
        # folders are this Attributor's own, so files in them that no manifest vouches for are removed.
        parts = path.with_name(f"{path.name}.parts-{self._key(meta, batch_size, chunk_size)}")
        stats: dict = {}
        fisher = run_fisher(self.model, self.prepare(), self.names, parts, samples=meta["samples"],
                            chunk_size=chunk_size, seed=meta["seed"], batch_size=batch_size, flips=self.plan.flips,
                            captions=self.plan.captions, backend=self.backend, progress=self.progress,
                            untrusted="remove", stats=stats)
        # The rate of what this run computed (a resumed run reuses finished chunks; ranks share the rest).
        self.timings.add("fisher", time.perf_counter() - t, sum(all_gather(stats["samples_computed"])), "samples")

        def keep() -> None:
            from safetensors.torch import save

            write_bytes(path, save({n: f.cpu().contiguous() for n, f in fisher.items()},
                                   metadata={"forgetscore": json.dumps(meta)}))
            for stale in path.parent.glob(f"{path.name}.parts-*"):
                remove_dir(stale)

        on_rank0(keep)

    def _auto_fisher_batch(self, path: Path, chunk_size: int) -> int:
        """The Fisher batch for "auto": probed on CUDA (every rank takes the smallest), or that of an interrupted
        run of this Fisher when it still fits (see :func:`.fisher.resumable_fisher_batch_size`)."""
        fitting = min(all_gather(auto_fisher_batch_size(self.model, self.prepare(), self.names, flips=self.plan.flips,
                                                        captions=self.plan.captions, backend=self.backend)))
        return on_rank0(lambda: resumable_fisher_batch_size(sorted(path.parent.glob(f"{path.name}.parts-*")),
                                                            chunk_size, fitting))

    def _log(self, message: str) -> None:
        if self.progress:
            print(message, file=sys.stderr, flush=True)

    def sweep(self, batch_size: int | None = None) -> LossSweep:
        """A :class:`LossSweep` of this Attributor's settings (`batch_size`: default its own)."""
        data = self.prepare()
        with warnings.catch_warnings():
            # What the precision costs on this device was said once, when this Attributor resolved it.
            warnings.filterwarnings("ignore", message="precision: ", category=UserWarning)
            return LossSweep(self.model, data, self.plan, batch_size=batch_size or self.batch_size,
                             backend=self.backend, precision=self.precision, prefetch=self.prefetch,
                             compile=self.compile)

    def _before_path(self) -> Path:
        # Not keyed on the batch size: another batch size changes only the last bits of the losses (as compile
        # mode, device and thread count do), not worth a whole sweep of the original model again.
        data = self.prepare()
        key = self._key(self.model.unet_id(), data.data_id, self.plan.to_dict(), self.precision)
        return self.cache_dir / f"before-{key}.npy"

    def before_losses(self) -> np.ndarray:
        """[n_train, versions] losses of the original model under the plan (computed once, then cached)."""
        if self._cached_before():
            return self._read_before()
        everything = np.arange(self.prepare().n)
        t = time.perf_counter()
        with self._stage(self._sweep_lock([variant_id(None)], everything), "sweeping these losses") as waited:
            if self._cached_before():  # made by the job this one waited for
                self.timings.add("score before", time.perf_counter() - t, 0, "img", waited[0])
                return self._read_before()
            stats: dict = {}
            before = self._run([None], None, desc="score (before)", stats=stats)[0]
            # The rate of what this run computed (a resumed sweep reuses finished chunks).
            computed = sum(all_gather(stats["images_computed"]))
            self.timings.add("score before", time.perf_counter() - t, computed, "img", waited[0])
            self._save_before(before)
            self.forget_sweeps()
        return before

    def _read_before(self) -> np.ndarray:
        path = self._before_path()
        if not path.with_suffix(".json").is_file():
            raise ValueError(f"cache: {str(path)!r} has no metadata beside it; delete it to recompute")
        try:
            meta = read_json(path.with_suffix(".json"))
            made_under = meta["plan"], meta["unet_id"]
        except (ValueError, KeyError, TypeError) as exc:  # cut short, or not ours
            raise ValueError(f"cache: {str(path.with_suffix('.json'))!r} is damaged ({exc!r}); delete it and "
                             f"{path.name} to recompute") from None
        if made_under != (self.plan.to_dict(), self.model.unet_id()):
            raise ValueError(f"cache: {str(path)!r} was made under another plan or model; delete it")
        try:
            before = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise ValueError(f"cache: cannot read {str(path)!r} ({exc}); delete it to recompute") from None
        # A run killed between saving them and deleting their sweep's chunks left the chunks behind; no run
        # would resume that sweep now (unless another job is in it: it is then left to that job).
        ids, everything = [variant_id(None)], np.arange(self.prepare().n)
        lock = self._sweep_lock(ids, everything)
        self._finished += [(folder, lock) for folder in self._interrupted(self.sweep(), ids, everything)]
        self.forget_sweeps()
        return before

    def _run(self, variants: list, indices: np.ndarray | None, desc: str, stats: dict | None = None) -> np.ndarray:
        """A resumable, sharded sweep (chunks in the cache; ranks share them under torchrun).

        Its chunks stay until :meth:`forget_sweeps`, which the caller calls once it has kept what it needs.
        """
        data = self.prepare()
        sel = np.arange(data.n) if indices is None else np.asarray(indices, dtype=np.int64)
        ids = [variant_id(w) for w in variants]
        lock = self._sweep_lock(ids, sel)
        # One job at a time sweeps these losses, under any batch size: a job that waited resumes from the
        # chunks of the one before it.
        with self._stage(lock, "sweeping these losses") as waited:
            sweep = self.sweep()
            found = self._interrupted(sweep, ids, sel)
            resume = self._resumable_batch_size(found)
            if resume != self.batch_size:
                sweep = self.sweep(resume)
            cut_otherwise = on_rank0(lambda: other_chunk_sizes(self.cache_dir / "sweeps",
                                                               sweep_header(sweep, ids, sel, self.chunk_size)))
            self._say_unresumed(found, cut_otherwise, sweep.batch_size, len(sel))
            out_dir = self.cache_dir / "sweeps" / self._key(*self._sweep_identity(ids, sel, sweep.batch_size))
            # The folder is this Attributor's own and named by all the settings: chunk files no manifest vouches
            # for (e.g. what a removal file by file, as older versions did, left when killed) are removed.
            losses = run_sweep(sweep, variants, out_dir, indices=sel, chunk_size=self.chunk_size,
                               variant_ids=ids, progress=self.progress, desc=desc, untrusted="remove", stats=stats,
                               log=self._log)
        if stats is not None:
            stats["waited_s"] = waited[0]
        # The same sweep under other batch and chunk sizes is superseded too (each folder with its own stage's lock).
        self._finished += [(folder, lock) for folder in (out_dir, *found)]
        self._finished += [(folder, self._sweep_lock(ids, sel, m["chunk_size"])) for folder, m in cut_otherwise.items()]
        return losses

    def _say_unresumed(self, found: dict[Path, tuple[int, int]], cut_otherwise: dict[Path, dict], batch_size: int,
                       n_images: int) -> None:
        """Say which interrupted sweeps of these losses this run cannot resume (made under another batch or chunk
        size, which change the last bits or the cut), and which options resume them: they are deleted once this
        sweep finishes."""
        n_chunks = -(-n_images // self.chunk_size)
        for batch, chunks in sorted(found.values(), reverse=True):
            if batch != batch_size and chunks:
                self._log(f"sweep: an interrupted sweep of these losses at batch size {batch} holds {chunks} of "
                          f"{n_chunks} finished chunks, which this run at batch size {batch_size} cannot use (the "
                          f"batch size changes the last bits): it starts afresh and deletes them when it finishes; "
                          f"to resume them instead, stop it and run again with --batch-size {batch}")
                break
        for folder, manifest in cut_otherwise.items():
            chunks = len(list(folder.glob("chunk-*.npy")))
            if chunks:
                self._log(f"sweep: an interrupted sweep of these losses in chunks of {manifest['chunk_size']} images "
                          f"holds {chunks} of {manifest.get('n_chunks')} finished chunks, which this run in chunks of "
                          f"{self.chunk_size} cannot use: it starts afresh and deletes them when it finishes; to "
                          f"resume them instead, stop it and run again with --chunk-size {manifest['chunk_size']} "
                          f"--batch-size {manifest.get('batch_size')}")
                break

    def _sweep_identity(self, ids: list[str], sel: np.ndarray, batch_size: int | None = None,
                        chunk_size: int | None = None) -> list:
        """What a sweep's numbers depend on, the format too (a sweep interrupted under an older version starts
        afresh in its own folder); with `batch_size` for its folder, without it for its stage's lock, which
        covers every batch size (see :func:`.sweep.matching_sweeps`). `chunk_size`: default this Attributor's."""
        batch = [] if batch_size is None else [batch_size]
        return [self.model.unet_id(), self.prepare().data_id, self.plan.to_dict(), *batch,
                self.chunk_size if chunk_size is None else chunk_size, self.precision, ids, indices_id(sel),
                SWEEP_FORMAT]

    def _sweep_lock(self, ids: list[str], sel: np.ndarray, chunk_size: int | None = None) -> Path:
        return self.cache_dir / "sweeps" / f".{self._key(*self._sweep_identity(ids, sel, chunk_size=chunk_size))}.lock"

    def _interrupted(self, sweep: LossSweep, ids: list, sel: np.ndarray) -> dict[Path, tuple[int, int]]:
        """The folders of this sweep interrupted under any batch size (chunks of two batch sizes differ in the
        last bits, so they cannot be mixed). Rank 0 looks, every rank follows."""
        return on_rank0(lambda: matching_sweeps(self.cache_dir / "sweeps",
                                                sweep_header(sweep, ids, sel, self.chunk_size)))

    def forget_sweeps(self) -> None:
        """Delete the chunks of finished sweeps (they only serve a resume), once every rank has read them;
        a sweep another job is in is left to that job. Every rank calls it."""
        barrier()
        if self.rank == 0:
            for folder, lock in self._finished:
                with unless_busy(lock) as free:
                    if free:
                        remove_dir(folder)
        self._finished.clear()

    def _resumable_batch_size(self, found: dict[Path, tuple[int, int]]) -> int:
        """The batch size to sweep with: under ``batch_size="auto"``, that of an interrupted sweep which fits.

        The probe's answer moves with the GPU's free memory, so a resumed "auto" sweep takes the batch
        size its finished chunks were made with (the one with the most chunks) when it is no larger than
        what fits now; an explicit batch size is always obeyed.
        """
        if not self.batch_size_probed:
            return self.batch_size
        fitting = [(chunks, batch) for batch, chunks in found.values() if batch <= self.batch_size and chunks]
        return max(fitting)[1] if fitting else self.batch_size

    def _cached_before(self) -> bool:
        """Whether the before-losses are cached, as rank 0 sees it (every rank must take the same path)."""
        return on_rank0(self._before_path().is_file)

    def _save_before(self, before: np.ndarray) -> None:
        path = self._before_path()
        meta = {"unet_id": self.model.unet_id(), "data_id": self.prepare().data_id, "plan": self.plan.to_dict(),
                "precision": self.precision}

        def write() -> None:
            # The first job to save them wins: another job's pass (at another batch size, say) may differ in the
            # last bits, and every later run should read the same numbers.
            if path.is_file():
                return
            write_json(path.with_suffix(".json"), meta)
            write_npy(path, before)

        on_rank0(write)  # a failed write raises on every rank

    # --- queries -------------------------------------------------------------------------
    def generate(self, prompt: str, seed: int = 0, *, steps: int = GENERATE_STEPS,
                 guidance_scale: float = GENERATE_GUIDANCE) -> torch.Tensor:
        """A query made by the model itself: UNet-space sample [C, H, W] (the same for the same arguments, on
        the same kind of device: record them, with :func:`generation_record`, to make it again). A pixel model's
        sample is clipped to [-1, 1], as its picture is shown and saved."""
        sample = generate(self.model, [prompt], [seed], steps=steps, guidance_scale=guidance_scale)[0]
        return sample if self.model.vae is not None else sample.clamp(-1, 1)

    def query_inputs(self, query) -> torch.Tensor:
        """A query as UNet input [C, H, W]: an image file or a PIL image (read as the training images are), or
        a tensor or array of pixels [C, H, W] in [-1, 1], or of the UNet's input shape."""
        from PIL import Image

        if isinstance(query, (str, os.PathLike)):
            query = load_image(query, self.model.image_shape, self.resize)
        elif isinstance(query, Image.Image):
            query = image_pixels(query, self.model.image_shape, self.resize)
        elif isinstance(query, np.ndarray):
            if query.dtype == np.uint8:
                raise ValueError(_EIGHT_BIT_QUERY)
            query = torch.from_numpy(np.asarray(query, dtype=np.float32))
        if not isinstance(query, torch.Tensor):
            raise ValueError(f"query: expected an image path, a PIL image or a tensor of pixels in [-1, 1], got "
                             f"{type(query).__name__}")
        if query.dtype == torch.uint8:
            raise ValueError(_EIGHT_BIT_QUERY)
        query = query.detach().float()
        if not bool(torch.isfinite(query).all()):
            raise ValueError("query: holds NaN or inf; pass a finite image or latent")
        latent = self.model.vae is not None
        if tuple(query.shape) == tuple(self.model.input_shape) and latent:
            return query.to(self.model.device)
        if tuple(query.shape) in (tuple(self.model.image_shape), tuple(self.model.input_shape)):
            # Pixels for the VAE lie in [-1, 1]; a pixel-space model's own sample may overshoot a little.
            low, high = float(query.min()), float(query.max())
            bound = 1 + 1e-3 if latent else 2.0
            if low < -bound or high > bound:
                raise ValueError(f"query: pixels must lie in [-1, 1]; these span [{low:.4g}, {high:.4g}] "
                                 "(from [0, 1]: 2 * x - 1; from 0..255: x / 127.5 - 1)")
            if not latent:
                return query.to(self.model.device)
            return self.model.encode_images(query[None])[0].float()
        raise ValueError(f"query: shape {tuple(query.shape)} is neither the model's input {self.model.input_shape} "
                         f"nor its image shape {self.model.image_shape} (channels first; for an H x W x C array of "
                         "8-bit pixels pass PIL.Image.fromarray(array))")

    def region_mask(self, region: Sequence[int] | torch.Tensor | np.ndarray | None) -> torch.Tensor | None:
        """A box (x0, y0, x1, y1) in image pixels, or an [H, W] mask (tensor or array), as a UNet-space weight
        mask [1, h, w]."""
        if region is None:
            return None
        _, H, W = self.model.image_shape
        if _is_mask(region):
            if isinstance(region, np.ndarray):
                if region.dtype != np.bool_ and not np.issubdtype(region.dtype, np.number):
                    raise ValueError(f"region: mask of dtype {region.dtype}; give numbers or bools (weights in [0, 1])")
                region = torch.from_numpy(np.asarray(region, dtype=np.float32))
            if tuple(region.shape) != (H, W):
                raise ValueError(f"region: mask shape {tuple(region.shape)} is not the image's ({H}, {W})")
            mask = region.detach().float().cpu()
            if not bool(torch.isfinite(mask).all()):
                raise ValueError("region: mask holds NaN or inf; give finite weights in [0, 1]")
        else:
            box = _region_box(region)
            if len(box) != 4 or not (0 <= box[0] < box[2] <= W and 0 <= box[1] < box[3] <= H):
                raise ValueError(f"region: {region!r} is not a box x0,y0,x1,y1 inside the {W}x{H} image")
            mask = torch.zeros(H, W)
            mask[box[1]:box[3], box[0]:box[2]] = 1
        _, h, w = self.model.input_shape
        mask = torch.nn.functional.adaptive_avg_pool2d(mask[None, None], (h, w))[0]
        if not bool((mask > 0).any()):
            raise ValueError("region: selects no pixel; give a box or mask with at least one pixel > 0")
        return mask.to(self.model.device)

    # --- attribution ---------------------------------------------------------------------
    @torch.no_grad()
    def query_loss(self, query: torch.Tensor, prompt: str, weights: dict[str, torch.Tensor] | None = None,
                   draws_per_timestep: int = 16) -> float:
        """The query's mean loss over the plan's timesteps (fixed noise), under `weights` (None: original)."""
        _check_prompt(prompt)
        x0 = self.query_inputs(query)
        ts = torch.tensor(self.plan.timesteps, device=x0.device).repeat_interleave(draws_per_timestep)
        n = ts.shape[0]
        ctx = self.model.encode_text([prompt])[0]
        with self.model.swapped(weights):
            losses = torch.cat([
                row_losses(self.model, x0[None].expand(len(chunk), *x0.shape), ctx[None].expand(len(chunk), *ctx.shape),
                           chunk, self.plan.seed ^ QUERY_LOSS_STREAM, torch.zeros(len(chunk), dtype=torch.int64,
                                                                                  device=x0.device),
                           torch.arange(lo, lo + len(chunk), device=x0.device), backend=self.backend)
                for lo in range(0, n, self.batch_size) for chunk in [ts[lo:lo + self.batch_size]]])
        return float(losses.double().mean())

    def unlearn(self, query: torch.Tensor, prompt: str, config: UnlearnConfig | None = None,
                region: Sequence[int] | torch.Tensor | None = None, fisher_samples: int | None = None
                ) -> dict[str, torch.Tensor]:
        config = config or UnlearnConfig()
        _check_prompt(prompt)
        fisher = self.fisher(fisher_samples) if config.method == "newton" else None
        x0 = self.query_inputs(query)
        ctx = self.model.encode_text([prompt])[0]
        mask = self.region_mask(region)
        t = time.perf_counter()
        # Rank 0 alone takes the step and hands every rank its weights: the step's backward passes need not
        # give the same last bits on two GPUs, and every rank must sweep the same weights.
        out = on_rank0(lambda: {n: w.cpu() for n, w in unlearn(self.model, self.names, fisher, x0, ctx, config,
                                                                len(self.train), mask, self.backend,
                                                                self.progress).items()})
        self.timings.add("unlearn", time.perf_counter() - t, config.steps * config.draws, "draws")
        return {n: w.to(self.model.device) for n, w in out.items()}

    def attribute(self, query: torch.Tensor | str | os.PathLike, prompt: str, *, k: int = 10,
                  config: UnlearnConfig | None = None, region: Sequence[int] | torch.Tensor | None = None,
                  reduce: str = "max", fisher_samples: int | None = None,
                  indices: np.ndarray | None = None) -> Attribution:
        return self.attribute_many([(query, prompt)], k=k, config=config, region=region, reduce=reduce,
                                   fisher_samples=fisher_samples, indices=indices)[0]

    def attribute_many(self, queries: Sequence[tuple[torch.Tensor | str | os.PathLike, str]], *, k: int = 10,
                       config: UnlearnConfig | None = None, region: Sequence[int] | torch.Tensor | None = None,
                       reduce: str = "max", fisher_samples: int | None = None,
                       indices: np.ndarray | None = None, keep_sweeps: bool = False) -> list[Attribution]:
        """Unlearn each query, then score the training set for all of them in one pass over the data.

        `keep_sweeps`: leave the pass's chunks in the cache until :meth:`forget_sweeps`, for a caller that saves
        the results first: if that fails (a full disk), a rerun reads the chunks instead of sweeping again."""
        def checked():  # on every rank, which must all be given the same (see ranks.agree)
            pairs = _query_pairs(queries)
            if reduce not in REDUCTIONS:
                raise ValueError(f"reduce: {reduce!r} is not one of {list(REDUCTIONS)}")
            if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
                raise ValueError(f"k: {k!r} must be an int >= 1 (the number of top images a result shows and saves)")
            if config is not None and not isinstance(config, UnlearnConfig):
                raise ValueError(f"config: expected an UnlearnConfig (e.g. preset('mscoco')), got "
                                 f"{type(config).__name__}")
            samples = None if fisher_samples is None else as_count("fisher_samples", fisher_samples)
            for _, p in pairs:
                _check_prompt(p)
            sources = [str(q) if isinstance(q, (str, os.PathLike)) else None for q, _ in pairs]
            inputs = [(self.query_inputs(q), p) for q, p in pairs]  # bad queries fail before any long stage
            self.region_mask(region)
            subset = None if indices is None else _image_ids(indices, len(self.train))
            return inputs, sources, int(k), config or UnlearnConfig(), samples, subset

        def same(checked_) -> dict:
            inputs, sources, k_, config_, samples, subset = checked_
            return {"queries": len(inputs), "prompts": [p for _, p in inputs],
                    "query files": sources, "config": config_, "k": k_, "region": repr(region), "reduce": reduce,
                    "fisher_samples": samples, "subset": None if subset is None else indices_id(subset)}

        queries, sources, k, config, fisher_samples, subset = agree(checked, same)
        for _, p in queries:
            unknown = self.model.unknown_words(p) if self.rank == 0 else []
            if unknown:
                warnings.warn(f"prompt: the model's tokenizer does not know {', '.join(map(repr, unknown))} of "
                              f"{p!r}: read as its unknown token, they say nothing of the picture; use the words of "
                              "the training captions", stacklevel=2)
            cut = self.model.cut_tokens(p) if self.rank == 0 else 0
            if cut:
                length = self.model.max_length
                warnings.warn(f"prompt: {p!r} is {length + cut} tokens long but the model's text encoder reads "
                              f"{length}: the last {cut} {'are' if cut > 1 else 'is'} dropped and say nothing of the "
                              "picture; shorten it", stacklevel=2)
        data = self.prepare()
        sel = np.arange(data.n) if subset is None else subset
        if fisher_samples is None and config.method == "newton":
            # Resolved once: every query takes the same Fisher, and the results record the one they took (another
            # job may cache a larger one meanwhile).
            fisher_samples = self._default_fisher_samples()
        unlearned = [self.unlearn(q, p, config, region, fisher_samples) for q, p in queries]
        # Before-losses come from the cache when there is one: the noise is keyed per image, so the
        # cached numbers are exactly those of any subset. Otherwise they are computed in the same
        # pass as the after-losses (and cached when the pass covers the whole set).
        cached = self.before_losses() if self._cached_before() else None
        # Without cached before-losses the same pass computes them too (one more variant per image), and says so.
        # So does a pass that a killed run began that way, before another job cached them: its chunks serve.
        both = cached is None or any(chunks for _, chunks in self._interrupted(
            self.sweep(), [variant_id(w) for w in [None, *unlearned]], sel).values())
        variants = [None] + unlearned if both else unlearned
        t, stats = time.perf_counter(), {}
        stage = "score before+after" if both else "score after"
        losses = self._run(variants, sel, desc=f"score ({stage[6:]})", stats=stats)
        self.timings.add(stage, time.perf_counter() - t, sum(all_gather(stats["images_computed"])), "img",
                         stats["waited_s"])
        if both:
            before, losses = losses[0], losses[1:]
        if cached is not None:
            before = cached[sel]  # the cached numbers, whatever batch size this pass ran
        elif indices is None:
            self._save_before(before)
        results = []
        settings = self._settings(config, fisher_samples, reduce, region, len(sel))
        for (q, prompt), after, weights, source in zip(queries, losses, unlearned, sources):
            tau = after - before
            scores = tau.max(axis=1) if reduce == "max" else tau.mean(axis=1)
            q_before, q_after = (self.query_loss(q, prompt, w) for w in (None, weights))
            meta = {**copy.deepcopy(settings), "query": source,  # each result's own: editing one changes no other
                    # How selective the forgetting was: the query's own loss should rise far more. Both rises
                    # are relative (divided by the loss before), the training set's averaged over its rows.
                    "query_loss_before": q_before, "query_loss_after": q_after,
                    "query_loss_rise": (q_after - q_before) / q_before,
                    "train_loss_rise_mean": float(np.mean(tau) / np.mean(before))}
            name = f"the query {source!r}" if source else "the query"
            note = rounding_note(scores, name, before)
            if note and self.rank == 0:
                warnings.warn(note, stacklevel=2)
            if q_after <= q_before and self.rank == 0:
                warnings.warn(f"unlearning: the step did not raise the loss of {name} ({q_before:.4g} before, "
                              f"{q_after:.4g} after), so the scores do not measure its forgetting; a step that "
                              "overshoots can do this: try a smaller alpha (or a larger --n-train), or more steps",
                              stacklevel=2)
            full_scores = scores if indices is None else _scatter(scores, sel, data.n)
            full_tau = tau if indices is None else _scatter(tau, sel, data.n)
            pixels = self.model.decode(self.query_inputs(q)[None])[0].cpu()
            results.append(Attribution(full_scores, full_tau, prompt, pixels, self.train.file_names,
                                       self.train.captions, meta, k=k))
        if not keep_sweeps:
            self.forget_sweeps()
        return results

    def _settings(self, config: UnlearnConfig, fisher_samples: int | None, reduce: str,
                  region: Sequence[int] | torch.Tensor | None, n_scored: int) -> dict:
        """Everything a result's numbers depend on, for its attribution.json (values as used, defaults resolved)."""
        from .. import __version__

        data = self.prepare()
        model = Path(self.model.source) if self.model.source else None
        newton = config.method == "newton"
        return {"version": __version__, "plan": self.plan.to_dict(), "noise": self.plan.noise,
                "unlearn": {**config.to_dict(), "n_train": config.n_train or len(self.train)},
                "fisher_samples": self.fisher_samples(fisher_samples) if newton else None,
                "weights": self.weights,
                "n_weights": int(sum(self.model.unet.get_parameter(n).numel() for n in self.names)),
                "reduce": reduce, "precision": self.precision, "batch_size": self.batch_size,
                "text_dtype": self.text_dtype,
                "model": str(model.resolve()) if model is not None and model.is_dir() else self.model.source,
                "unet_id": self.model.unet_id(), "data_id": data.data_id,
                "train_dir": str(Path(self.train.root).resolve()),
                # Images outside a scored subset hold -inf in scores.npy and tau.npy.
                "n_scored": n_scored,
                "region": None if region is None or _is_mask(region) else _region_box(region)}

    def score_variants(self, variants: Sequence[dict[str, torch.Tensor]], *, reduce: str = "max") -> np.ndarray:
        """Scores [len(variants), n_train] of arbitrary values of the selected weights (e.g. an ablation's
        own update), against the cached before-losses, in one pass over the data."""
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce: {reduce!r} is not one of {list(REDUCTIONS)}")
        before = self.before_losses()
        tau = self._run(list(variants), None, desc="score (after)") - before[None]
        self.forget_sweeps()
        return tau.max(axis=2) if reduce == "max" else tau.mean(axis=2)


def _batch_or_auto(value: int | str, argument: str) -> int | str:
    """A batch size as given: "auto", or a Python int >= 1 (numpy integers too)."""
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{argument}: {value!r} must be an int >= 1 or 'auto'")
    return int(value)


def _query_pairs(queries: object) -> list[tuple[object, str]]:
    """`queries` as a list of (query, prompt) pairs, each checked to be a pair (not yet what it holds)."""
    if isinstance(queries, (str, os.PathLike, torch.Tensor, np.ndarray)) or not hasattr(queries, "__iter__"):
        raise ValueError(f"queries: expected a list of (query, prompt) pairs, got {type(queries).__name__}; for one "
                         "query use attribute(query, prompt)")
    pairs = list(queries)
    if not pairs:
        raise ValueError("queries: empty; give at least one (query, prompt) pair")
    for i, pair in enumerate(pairs):
        # Only tuples and lists: a string or tensor of two items would unpack as a pair too.
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise ValueError(f"queries: item {i} is {_describe(pair)}, not a (query, prompt) pair; pass e.g. "
                             "[(\"query.png\", \"a prompt\")]")
    return [(q, p) for q, p in pairs]


def _describe(value: object) -> str:
    return f"a {type(value).__name__} of {len(value)}" if isinstance(value, (tuple, list)) else repr(value)[:60]


def _check_prompt(prompt: object) -> None:
    if not isinstance(prompt, str):
        raise ValueError(f"prompt: expected a string (the query's prompt), got {type(prompt).__name__}")
    if not prompt.strip():
        # The CLI refuses an empty --prompt too: the query would be unlearned as an unconditional sample.
        raise ValueError(f"prompt: {prompt!r} is empty; give the text the query was made from or shows")


def _image_ids(indices: object, n: int) -> np.ndarray:
    """The distinct image ids listed in `indices`, sorted (the scores are placed by id, so order does not matter)."""
    try:
        ids = np.asarray(indices)
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ValueError(f"indices: cannot be read as image ids ({exc}); give a list or array of integer "
                         "image ids") from None
    if ids.size == 0:
        raise ValueError("indices: empty; give at least one image id to score (or None for all)")
    # A boolean mask would be read as ids 0 and 1, and floats cut to ints, scoring images not meant.
    if ids.dtype == np.bool_ or (isinstance(indices, (list, tuple))
                                 and any(isinstance(v, (bool, np.bool_)) for v in indices)):
        raise ValueError("indices: booleans (a mask?), not image ids; give integer image ids (for a mask m: "
                         "np.flatnonzero(m))")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"indices: values of dtype {ids.dtype}, not image ids; give integer image ids")
    if ids.ndim > 1:
        raise ValueError(f"indices: shape {ids.shape}; give a flat list of image ids")
    if ids.min() < 0 or ids.max() >= n:
        raise ValueError(f"indices: need ids in [0, {n}) (positions in the training set)")
    return np.unique(ids.reshape(-1).astype(np.int64))


def _is_mask(region: object) -> bool:
    """Whether `region` is an [H, W] mask rather than a box (a 1-D array is a box's four numbers)."""
    return isinstance(region, torch.Tensor) or (isinstance(region, np.ndarray) and region.ndim != 1)


def _region_box(region: object) -> list[int]:
    """A box's coordinates as Python ints, refusing anything but integers (a float would be cut silently)."""
    if isinstance(region, (str, bytes)) or not hasattr(region, "__iter__"):
        raise ValueError(f"region: {region!r} is neither a box (x0, y0, x1, y1) of ints nor an [H, W] mask")
    box = list(region)
    bad = [v for v in box if isinstance(v, bool) or not isinstance(v, numbers.Integral)]
    if bad:
        raise ValueError(f"region: {bad[0]!r} in {region!r} is not an integer; give the box x0,y0,x1,y1 in whole "
                         "pixels (or an [H, W] mask for a fractional region)")
    return [int(v) for v in box]


def _scatter(values: np.ndarray, sel: np.ndarray, n: int) -> np.ndarray:
    out = np.full((n,) + values.shape[1:], -np.inf)
    out[sel] = values
    return out


def generation_record(seed: int, steps: int = GENERATE_STEPS, guidance_scale: float = GENERATE_GUIDANCE) -> dict:
    """How a generated query was made, for a result's metadata (``Attributor.generate``'s arguments)."""
    return {"seed": int(seed), "steps": int(steps), "guidance_scale": float(guidance_scale)}


_EIGHT_BIT_QUERY = ("query: 8-bit pixels (uint8); pass a float tensor of pixels in [-1, 1] (x / 127.5 - 1), "
                    "or PIL.Image.fromarray(array) for an H x W x C array")


def load_fisher(path: str | os.PathLike, model: DiffusionModel, names: list[str]) -> dict[str, torch.Tensor]:
    """A saved Fisher, checked against the model's selected weights."""
    from safetensors import safe_open

    from .unlearning import check_fisher

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("forgetscore", "{}"))
            fisher = {k: f.get_tensor(k) for k in f.keys()}
    except FileNotFoundError:
        raise ValueError(f"fisher: {str(path)!r} does not exist; compute it first (forgetscore fisher)") from None
    except Exception as exc:  # noqa: BLE001  (safetensors reports a damaged file with its own error types)
        raise ValueError(f"fisher: cannot read {str(path)!r} ({exc}); delete it to compute it again") from None
    saved = meta.get("unet_id")
    if saved is not None and saved != model.unet_id():
        raise ValueError(f"fisher: {str(path)!r} was computed for another model (unet_id {saved}, this model's "
                         f"{model.unet_id()}); compute it for this model (forgetscore fisher)")
    check_fisher(fisher, model.unet, names, damping=1.0)
    return fisher
