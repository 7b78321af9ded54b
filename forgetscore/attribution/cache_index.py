"""What the cache root holds, folder by folder, and the removal of folders nothing reads any more.

Each training folder gets a cache folder ``runs/<encoders id>-<training-set identity>``; its
identity changes with any edit of the training folder, so every edit starts a new cache folder
and the old one (prepared data: up to hundreds of GB on a large set) stays until removed. The
identity is of the contents (names, sizes, modification times), so copies of one folder share a
cache folder; it records every training folder that used it (``train_dir.txt``, a path a line,
added as its preparation starts). It is stale when none of them has its identity any more.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..cache import cache_root
from .io import read_json, remove_dir, write_bytes
from .locks import JOB_LOCK, unless_busy

TRAIN_DIR_FILE = "train_dir.txt"  # in a run folder: the training folders that used it, a path a line


def recorded_training_folders(run: Path) -> list[str]:
    """The training folders a run folder records ([] where none is recorded yet)."""
    try:
        return [line for line in (Path(run) / TRAIN_DIR_FILE).read_text().splitlines() if line.strip()]
    except OSError:
        return []


def record_training_folder(run: Path, train_dir: str | os.PathLike) -> bool:
    """Add `train_dir` to what `run` records, if it is not there yet (the file rewritten whole, then renamed);
    whether it was added."""
    here = str(Path(train_dir).resolve())
    if "\n" in here or "\r" in here:  # the record holds a path a line: this one would read back as two
        raise ValueError(f"train: {here!r} holds a line break, which the cache's record of training folders cannot "
                         "hold; rename the folder (or one above it)")
    known = recorded_training_folders(run)
    if here in known:
        return False
    write_bytes(Path(run) / TRAIN_DIR_FILE, "".join(f"{p}\n" for p in [*known, here]).encode())
    return True


def forget_training_folder(run: Path, train_dir: str | os.PathLike) -> None:
    """Take `train_dir` out of what `run` records (the file goes with the last one)."""
    here = str(Path(train_dir).resolve())
    known = [p for p in recorded_training_folders(run) if p != here]
    if known:
        write_bytes(Path(run) / TRAIN_DIR_FILE, "".join(f"{p}\n" for p in known).encode())
    else:
        (Path(run) / TRAIN_DIR_FILE).unlink(missing_ok=True)


@dataclass
class CacheEntry:
    """One folder under the cache root."""
    path: Path
    size: int     # bytes of all its files
    what: str     # what it holds, in words
    stale: bool   # none of the training folders it was made for has those contents any more: nothing reads it
    # Interrupted sweeps in a run folder whose losses the folder holds finished (before-losses): nothing resumes them.
    superseded: list[Path] = field(default_factory=list)
    # A training set's folder: whether the cache root made it (see run_entry); None for other folders.
    own: bool | None = None


def folder_size(path: Path) -> int:
    """Bytes of the files under `path` (files that vanish while counting are skipped)."""
    total = 0
    for dirpath, _, files in os.walk(path):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(dirpath, name)).st_size
    return total


def fmt_size(size: int) -> str:
    """A byte count for people: 1.5 GiB, 312.0 KiB, 17 B."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def training_state(folder: Path) -> tuple[list[str], str]:
    """(the training folders a run folder records, the one that still has its identity first; the state:
    current (one does), changed (none does, some still exist), gone (none exists) or unrecorded)."""
    from .data import TrainingSet

    recorded = recorded_training_folders(folder)
    if not recorded:
        return [], "unrecorded"
    # Under the cache root the folder's name ends in the identity; a folder given to --cache has its
    # prepared stores' record of it.
    identity = folder.name.rsplit("-", 1)[-1] if folder.parent.name == "runs" else next(
        (m["data_id"] for p in sorted(folder.glob("prepared*")) if isinstance((m := _manifest(p)).get("data_id"), str)),
        None)
    for path in recorded:
        try:
            if Path(path).is_dir() and TrainingSet.load(path).identity() == identity:
                return [path, *(p for p in recorded if p != path)], "current"
        except (ValueError, OSError):  # no longer a readable training folder
            continue
    return recorded, "changed" if any(Path(p).is_dir() for p in recorded) else "gone"


def _manifest(folder: Path, name: str = "manifest.json") -> dict:
    """A prepared store's manifest, or the one of another kind `name` names ({} where it has none that reads)."""
    try:
        found = read_json(folder / name)
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _model(folder: Path) -> str | None:
    """The model a run folder's data was prepared with (its path then), as its prepared stores record it."""
    return next((m["model"] for p in sorted(folder.glob("prepared*"))
                 if isinstance((m := _manifest(p)).get("model"), str)), None)


def _sweeps(folder: Path) -> list[Path]:
    return sorted(p for p in (folder / "sweeps").glob("*") if p.is_dir() and not p.name.startswith("."))


def _sweep_manifest(sweep: Path) -> dict:
    from .sweep import MANIFEST

    return _manifest(sweep, MANIFEST)


def superseded_sweeps(folder: Path) -> list[Path]:
    """The interrupted sweeps of the original model's losses over the whole training set that run folder `folder`
    also holds finished (its before-losses, of the same model, data, plan and precision). Nothing resumes them
    (every run reads the finished losses), under whatever batch or chunk size they were made."""
    import numpy as np

    from .sweep import IDENTITY_DEFAULTS, indices_id

    finished = []
    for meta in folder.glob("before-*.json"):
        try:
            made = read_json(meta)
            if meta.with_suffix(".npy").is_file():
                finished.append([made[k] for k in ("unet_id", "data_id", "plan", "precision")])
        except (OSError, ValueError, KeyError, TypeError):  # cut short, or not ours: vouches for nothing
            continue
    out = []
    for sweep in _sweeps(folder) if finished else ():
        m = _sweep_manifest(sweep)
        n = m.get("n_images")
        if m.get("variant_ids") != ["original"] or not isinstance(n, int) or isinstance(n, bool) or n < 1:
            continue
        made = [m.get(k, IDENTITY_DEFAULTS.get(k)) for k in ("unet_id", "data_id", "plan", "precision")]
        if made in finished and m.get("indices_id") == indices_id(np.arange(n)):
            out.append(sweep)
    return out


def _sweep_settings(sweep: Path) -> str:
    """The options an interrupted sweep was made under, which a run must give again to resume it, and its
    progress."""
    m = _sweep_manifest(sweep)
    if not isinstance(m.get("batch_size"), int):
        return "settings not recorded"
    how = " then ".join(", ".join(f"{key} {value}" for key, value in made.items())
                        for made in m.get("made_under") or () if isinstance(made, dict))
    losses = ("the original model's losses" if m.get("variant_ids") == ["original"]
              else f"losses of {len(m.get('variant_ids') or [])} weight variants")
    done = len(list(sweep.glob("chunk-*.npy")))
    return (f"{losses} at --batch-size {m['batch_size']} --chunk-size {m.get('chunk_size')} --precision "
            f"{m.get('precision', 'fp32')}{f' ({how})' if how else ''}, {done} of {m.get('n_chunks')} chunks done")


def _run_parts(folder: Path, superseded: list[Path]) -> str:
    """What a run folder holds: its prepared stores, Fisher files, before-losses and interrupted sweeps (those of
    them `superseded`: see superseded_sweeps)."""
    parts = [f"{p.name} {fmt_size(folder_size(p))}{'' if _manifest(p).get('complete') else ' (unfinished)'}"
             for p in sorted(folder.glob("prepared*")) if p.is_dir()]
    for label, pattern in (("Fisher", "fisher-*.safetensors"), ("before-losses", "before-*.npy")):
        count = len(list(folder.glob(pattern)))
        if count:
            parts.append(f"{count} {label}")
    sweeps = _sweeps(folder)
    if sweeps:
        size = fmt_size(sum(folder_size(p) for p in sweeps))
        said = [f"[{p.name[:8]}: {_sweep_settings(p)}"
                + ("; its losses are cached: nothing resumes it]" if p in superseded else "]") for p in sweeps]
        parts.append(f"{len(sweeps)} interrupted sweep{'s' if len(sweeps) > 1 else ''} ({size}; a rerun with the "
                     f"{'options of one' if len(sweeps) > 1 else 'options named'} resumes it: {' '.join(said)})")
    model = _model(folder)  # one training folder may be prepared for several models: each has its folder
    if model and not Path(model).exists():  # moved, or deleted: the user knows which
        model += " (no longer there)"
    return (", ".join(parts) or "nothing yet") + (f"; model {model}" if model else "")


def scan(root: Path | None = None) -> list[CacheEntry]:
    """Every folder under the cache root (``runs/`` folder by folder), largest first."""
    root = Path(root) if root is not None else cache_root()
    entries = []
    for path in sorted(root.glob("*")):
        if not path.is_dir() or path.name.startswith("."):
            continue
        if path.name == "runs":
            for run in sorted(path.glob("*")):
                if run.is_dir() and not run.name.startswith("."):
                    entries.append(run_entry(run, own=True))
                elif run.is_dir() and ".removing-" in run.name:  # a deletion that was killed or failed midway
                    entries.append(CacheEntry(run, folder_size(run), "what a deletion cut short left (nothing reads "
                                                                     "it)", True))
            continue
        if path.name == "digits-train":
            what = "the demo's training images"
        elif path.name.startswith("digits-") and (path / "unet").is_dir():
            what = "the demo's digits model"
        else:
            what = "not a forgetscore folder"
        entries.append(CacheEntry(path, folder_size(path), what, False))
    return sorted(entries, key=lambda e: -e.size)


def run_entry(run: Path, own: bool = False) -> CacheEntry:
    """What one training set's cache folder (under the cache root, or one given to --cache) holds, and for what.

    `own`: a folder the cache root made (under ``runs/``), which holds nothing of the user's."""
    folders, state = training_state(run)
    superseded = superseded_sweeps(run)
    parts = _run_parts(run, superseded)
    if state == "unrecorded":
        # Every preparation records its training folder before it starts, so no run reads such a folder: a
        # preparation refused or killed before that, or what a job wrote after the folder was removed under it.
        # A folder given to --cache may be one the user keeps other files in: it is only listed.
        said = ("no training folder recorded (nothing reads this)" if own
                else "a training set whose preparation has not finished")
        return CacheEntry(run, folder_size(run), f"{said}: {parts}", own, own=own)
    from .data import CACHE_FORMAT

    # A manifest without a format is of the first one; a store without a manifest has not started.
    formats = [m.get("format", 1) if m else None for m in map(_manifest, sorted(run.glob("prepared*")))]
    if state == "current" and formats and all(f is not None and f != CACHE_FORMAT for f in formats):
        # Prepared by an earlier version: no run reads it again (under the cache root, the folder's name holds
        # the encoders' id of that version; a folder given to --cache is prepared again in place when used).
        state = "earlier"
    said = {"current": "", "changed": " (changed since: nothing reads this)",
            "gone": " (gone: nothing reads this)",
            "earlier": " (prepared by an earlier version of forgetscore: nothing reads this)"}[state]
    more = f" and {len(folders) - 1} other cop{'ies' if len(folders) > 2 else 'y'}" if len(folders) > 1 else ""
    return CacheEntry(run, folder_size(run), f"{folders[0]}{more}{said}: {parts}", state != "current",
                      superseded if state == "current" else [], own=own)


def describe(entries: list[CacheEntry], root: Path) -> list[str]:
    """The listing `forgetscore cache` prints."""
    total = sum(e.size for e in entries)
    lines = [f"cache {root} ({fmt_size(total)} in {len(entries)} folder{'s' if len(entries) != 1 else ''}; "
             "$FORGETSCORE_CACHE moves it)"]
    for e in entries:
        lines.append(f"  {fmt_size(e.size):>10}  {e.path.relative_to(root)}  {e.what}")
    stale = [e for e in entries if e.stale]
    if stale:
        lines.append(f"{len(stale)} folder{'s' if len(stale) > 1 else ''} ({fmt_size(sum(e.size for e in stale))}) "
                     "hold training folders as they were before a change, or that are gone, or record none: "
                     "`forgetscore cache --remove-stale` deletes them")
    superseded = [p for e in entries for p in e.superseded]
    if superseded:
        lines.append(f"{len(superseded)} interrupted sweep{'s' if len(superseded) > 1 else ''} "
                     f"({fmt_size(sum(map(folder_size, superseded)))}) of losses the cache holds finished: "
                     "`forgetscore cache --remove-stale` deletes them")
    return lines


def _unused(folder: Path, stack: contextlib.ExitStack) -> bool:
    """Whether no job uses `folder` (a cache folder), holding it in `stack` if so.

    The job lock first, by its path (made if missing): a job that starts meanwhile waits for it, then finds the
    folder gone and makes it again. Then every stage lock, for jobs that hold a stage of the folder without it.
    """
    if not stack.enter_context(unless_busy(folder / JOB_LOCK)):
        return False
    return all(stack.enter_context(unless_busy(lock)) for lock in sorted(folder.rglob(".*.lock"))
               if lock.name != JOB_LOCK or lock.parent != folder)


def remove_stale(entries: list[CacheEntry]) -> tuple[list[CacheEntry], list[CacheEntry], list[str]]:
    """Delete the stale folders of `entries`, and the superseded sweeps of the others, that no job uses; returns
    (removed, left busy, why the others could not be deleted entirely). A sweep is returned as an entry of its own."""
    removed, busy, failed = [], [], []
    for e in entries:
        if not e.stale and not e.superseded:
            continue
        gone = [e] if e.stale else [CacheEntry(p, folder_size(p), "an interrupted sweep of losses the cache holds",
                                               True) for p in e.superseded]
        with contextlib.ExitStack() as stack:
            # A job using the folder (in a stage, or between stages) is left to finish.
            free = _unused(e.path, stack)
            if free and e.own is not None:
                # Judged when scanned: a job may have made the folder current since (prepared it, or finished the
                # sweep), then let go of it. Only what is still unread now, under the locks, goes.
                now = run_entry(e.path, own=e.own)
                gone = [e] if e.stale and now.stale else [] if e.stale else [
                    item for item in gone if item.path in now.superseded]
            for item in gone if free else ():
                try:
                    remove_dir(item.path, strict=True)
                except OSError as exc:
                    failed.append(str(exc))
                else:
                    removed.append(item)
        if not free:
            busy += gone
    return removed, busy, failed
