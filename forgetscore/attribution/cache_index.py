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
from dataclasses import dataclass
from pathlib import Path

from ..cache import cache_root
from .io import read_json, remove_dir, write_bytes
from .locks import unless_busy

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


def _manifest(folder: Path) -> dict:
    """A prepared store's manifest ({} where it has none that reads)."""
    try:
        found = read_json(folder / "manifest.json")
    except (OSError, ValueError):
        return {}
    return found if isinstance(found, dict) else {}


def _model(folder: Path) -> str | None:
    """The model a run folder's data was prepared with (its path then), as its prepared stores record it."""
    return next((m["model"] for p in sorted(folder.glob("prepared*"))
                 if isinstance((m := _manifest(p)).get("model"), str)), None)


def _run_parts(folder: Path) -> str:
    """What a run folder holds: its prepared stores, Fisher files, before-losses and interrupted sweeps."""
    parts = [f"{p.name} {fmt_size(folder_size(p))}{'' if _manifest(p).get('complete') else ' (unfinished)'}"
             for p in sorted(folder.glob("prepared*")) if p.is_dir()]
    for label, pattern in (("Fisher", "fisher-*.safetensors"), ("before-losses", "before-*.npy")):
        count = len(list(folder.glob(pattern)))
        if count:
            parts.append(f"{count} {label}")
    sweeps = [p for p in (folder / "sweeps").glob("*") if p.is_dir() and not p.name.startswith(".")]
    if sweeps:
        size = fmt_size(sum(folder_size(p) for p in sweeps))
        parts.append(f"{len(sweeps)} interrupted sweep{'s' if len(sweeps) > 1 else ''} "
                     f"({size}; a rerun with the same settings resumes them)")
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
                    entries.append(run_entry(run))
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


def run_entry(run: Path) -> CacheEntry:
    """What one training set's cache folder (under the cache root, or one given to --cache) holds, and for what."""
    folders, state = training_state(run)
    parts = _run_parts(run)
    if state == "unrecorded":
        return CacheEntry(run, folder_size(run), f"a training set whose preparation has not finished: {parts}", False)
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
    return CacheEntry(run, folder_size(run), f"{folders[0]}{more}{said}: {parts}", state != "current")


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
                     "hold training folders as they were before a change, or that are gone: "
                     "`forgetscore cache --remove-stale` deletes them")
    return lines


def remove_stale(entries: list[CacheEntry]) -> tuple[list[CacheEntry], list[CacheEntry], list[str]]:
    """Delete the stale folders of `entries` that no job is in a stage of; returns (removed, left busy, why the
    others could not be deleted entirely)."""
    removed, busy, failed = [], [], []
    for e in entries:
        if not e.stale:
            continue
        with contextlib.ExitStack() as stack:
            # Every stage lock in the folder, held while it goes: a job that holds one is left to finish.
            free = all(stack.enter_context(unless_busy(lock)) for lock in sorted(e.path.rglob(".*.lock")))
            if free:
                try:
                    remove_dir(e.path, strict=True)
                except OSError as exc:
                    failed.append(str(exc))
                    continue
        (removed if free else busy).append(e)
    return removed, busy, failed
