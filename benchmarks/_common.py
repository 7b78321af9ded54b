"""Helpers shared by the benchmark scripts: argument types, timing sync, the machine, the JSON record, formatting."""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

# torch is imported where it is used: bench_memory.py's parent process parses its arguments with the
# types below and must stay numpy-only (a child's peak RSS starts at its parent's), and gpu_check.py
# must still report on a machine where torch does not import.
if TYPE_CHECKING:
    import torch

# The repository root goes first on sys.path, ahead of any installed copy of forgetscore: the scripts run from
# a checkout, and should measure (or read runs with) the source tree they sit in, whatever else is installed.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def checkout_first() -> None:
    """Put the repository root first on sys.path (each script imports this module before forgetscore)."""
    while ROOT in sys.path:
        sys.path.remove(ROOT)
    sys.path.insert(0, ROOT)


checkout_first()


# --------------------------------------------------------------------------- argument types
# Each refuses a value that means nothing at parse time, before any model is built or store written:
# argparse prints "error: argument --NAME: <message>" and exits with status 2.

def int_range(low: int = 1, high: int | None = None, *, zero: str | None = None) -> Callable[[str], int]:
    """An argparse type: an int in [low, high] (no upper end when high is None).

    zero: what 0 stands for where an option takes it as "not set" (e.g. "torch's default"); 0 is then
    accepted too, and the message says so.
    """
    wanted = (f">= {low}" if high is None else f"in [{low}, {high}]") + (f" (or 0 for {zero})" if zero else "")

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer; give one {wanted}") from None
        if not (zero and value == 0) and not (value >= low and (high is None or value <= high)):
            raise argparse.ArgumentTypeError(f"{value} must be {wanted}")
        return value
    return parse


def positive_float(*, zero: str | None = None) -> Callable[[str], float]:
    """An argparse type: a finite float > 0 (seconds, say); with `zero` (what 0 stands for), 0 as well."""
    wanted = "a finite number > 0" + (f" (or 0 for {zero})" if zero else "")

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number; give {wanted}") from None
        # nan and inf pass float(); every comparison with nan is false, so a nan limit would never stop anything
        if not math.isfinite(value) or not (value > 0 or (zero and value == 0)):
            raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}")
        return value
    return parse


def _entries(text: str, hint: str) -> list[str]:
    """The comma-separated entries of `text`, blanks dropped; at least one."""
    entries = [e.strip() for e in text.split(",") if e.strip()]
    if not entries:
        raise argparse.ArgumentTypeError(f"{text!r}: {hint}")
    return entries


def _once_each(text: str, entries: list, hint: str) -> tuple:
    # A repeat would be measured (or read) twice and shown as two rows of the same thing.
    repeated = list(dict.fromkeys(e for i, e in enumerate(entries) if e in entries[:i]))
    if repeated:
        raise argparse.ArgumentTypeError(f"{text!r}: {', '.join(map(str, repeated))} given more than once; {hint}")
    return tuple(entries)


def choice_list(choices: Iterable[str]) -> Callable[[str], tuple[str, ...]]:
    """An argparse type: comma-separated entries of `choices`, each once, in the order given."""
    choices = tuple(choices)
    hint = f"give one or more of {', '.join(choices)}, each once, comma-separated"

    def parse(text: str) -> tuple[str, ...]:
        entries = _entries(text, hint)
        unknown = [e for e in entries if e not in choices]
        if unknown:
            raise argparse.ArgumentTypeError(f"{text!r}: {', '.join(map(repr, unknown))} unknown; {hint}")
        return _once_each(text, entries, hint)
    return parse


def int_list(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated ints >= 1 (batch sizes, say), each once, in the order given."""
    hint = "give one or more integers >= 1, each once, comma-separated, e.g. 64,512"
    try:
        values = [int(e) for e in _entries(text, hint)]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: {hint}") from None
    if min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: {hint}")
    return _once_each(text, values, hint)


def json_path(text: str) -> str:
    """An argparse type: a file to write the JSON record to, in a folder that exists and takes files.

    Checked when the arguments are parsed: the record is first written after minutes of measuring.
    """
    if not text.strip():
        raise argparse.ArgumentTypeError("empty; give a file path, e.g. out.json")
    if os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text!r} is a folder; give a file path in it, "
                                         f"e.g. {text.rstrip('/')}/out.json")
    folder = os.path.dirname(os.path.abspath(text))
    if not os.path.isdir(folder):
        raise argparse.ArgumentTypeError(f"{text!r}: its folder {folder!r} does not exist; create it first "
                                         "(mkdir -p) or give a path in an existing folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise argparse.ArgumentTypeError(f"{text!r}: the folder {folder!r} is not writable; give a path elsewhere")
    return text


def spread_timesteps(n: int, total: int = 1000) -> tuple[int, ...]:
    """Exactly n timesteps spread evenly over [0, total), from 0 (n in [1, total]).

    A grid stepping by total // n has more than n points wherever n does not divide total (3 gives 4).
    """
    if not 1 <= n <= total:
        raise ValueError(f"timesteps: {n} must be in [1, {total}]")
    return tuple(i * total // n for i in range(n))


def read_run(parser: argparse.ArgumentParser, run: str | os.PathLike, kind: str) -> dict:
    """results.json of a finished `forgetscore evaluate KIND` run (kind: "loo" or "custom"), or the parser's
    error (status 2, one line) naming what the folder is instead."""
    wanted = f"give the output folder of a finished `forgetscore evaluate {kind}` run"
    if not os.path.isdir(run):
        parser.error(f"run: {str(run)!r} is not a folder; {wanted}")
    path = os.path.join(run, "results.json")
    try:
        with open(path) as fh:
            results = json.load(fh)
    except FileNotFoundError:
        parser.error(f"run: {str(run)!r} holds no results.json (a run writes it when it finishes); {wanted}")
    except (OSError, ValueError) as exc:
        parser.error(f"run: {path!r} is unreadable ({type(exc).__name__}: {exc}); {wanted}")
    # What tells the two apart: a loo run records its config, a custom run its settings and concepts.
    found = None
    if isinstance(results, dict):
        found = "loo" if "config" in results else "custom" if {"settings", "concepts"} & set(results) else None
    if found != kind:
        what = f"an `evaluate {found}` run" if found else "not the results of an evaluation run"
        parser.error(f"run: {str(run)!r} is {what}; this script reads an `evaluate {kind}` run: {wanted}")
    return results


# --------------------------------------------------------------------------- the machine and the record

def timing_device(name: str, threads: int) -> torch.device | None:
    """The device a benchmark times on, with torch's thread count set first (0: its default); None, said
    on stderr, for CUDA where there is none."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        print("--device cuda: no CUDA device here", file=sys.stderr)
        return None
    return dev


def make_sync(device: torch.device) -> Callable[[], None]:
    """What to call before reading a clock: wait for queued GPU work; nothing on the CPU."""
    import torch

    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        import torch

        return torch.cuda.get_device_name(dev)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            name = next(line.split(":", 1)[1].strip() for line in fh if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name} ({os.cpu_count()} CPUs)"


def load_average() -> tuple[float, float, float] | None:
    return os.getloadavg() if hasattr(os, "getloadavg") else None


def run_meta(dev: torch.device) -> dict:
    """What every benchmark record says about its run: machine, versions, date, command, load."""
    import torch

    return {"device": dev.type, "device_name": device_name(dev), "torch": torch.__version__,
            "cuda": torch.version.cuda, "threads": torch.get_num_threads(),
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "argv": sys.argv, "load_average": load_average()}


class TimeUp(BaseException):
    """SIGTERM arrived (what `timeout` sends first): stop measuring and keep what was measured.

    A BaseException, so that the handlers that keep one failing method from stopping the others
    do not swallow it.
    """


_STOP = {"requested": False}


def stop_on_sigterm() -> None:
    """From now on, SIGTERM raises :class:`TimeUp` in the main thread (and :func:`stop_requested` is true)."""
    def handler(signum, frame):
        _STOP["requested"] = True
        raise TimeUp

    signal.signal(signal.SIGTERM, handler)


def stop_requested() -> bool:
    return _STOP["requested"]


class Results(dict):
    """A benchmark's JSON record ({"meta", *sections, "errors"}), written whole to `path` (temp file,
    then rename) at every save, so that a run cut short keeps what it measured."""

    def __init__(self, path: str | None, meta: dict, **sections: list | dict):
        super().__init__(meta=meta, **sections, errors=[])
        self.path = path

    def save(self) -> None:
        if self.path:
            tmp = self.path + ".tmp"
            with open(tmp, "w") as fh:
                json.dump(self, fh, indent=1, default=str)
            os.replace(tmp, self.path)

    def run_steps(self, steps: list[tuple[str, Callable[[], object]]]) -> None:
        """Each step in turn; one that fails is recorded in "errors" and the others still run.

        After a SIGTERM (see :func:`stop_on_sigterm`) the step under way keeps what it has recorded
        and the later ones are not started.
        """
        for name, step in steps:
            try:
                if stop_requested():
                    self["errors"].append(f"{name}: not run (stopped by SIGTERM)")
                else:
                    step()
                    if stop_requested():  # it caught the signal itself and reported its finished rounds
                        raise TimeUp
            except TimeUp:
                self["errors"].append(f"{name}: stopped by SIGTERM; the rows it had recorded are kept")
            except Exception as exc:  # noqa: BLE001 - keep what the other steps measure
                traceback.print_exc()
                self["errors"].append(f"{name}: {type(exc).__name__}: {exc}")
            self.save()

    def finish(self, start: float, report: Callable[[dict], str]) -> int:
        """Stamp the elapsed time and load, print the report and errors, save; the exit status.

        The report comes first: a record that cannot be written must not take the figures with it.
        """
        self["meta"]["elapsed_s"] = time.perf_counter() - start
        self["meta"]["load_average_end"] = load_average()
        print()
        print(report(self))
        if self["errors"]:
            print("\nerrors:\n  " + "\n  ".join(self["errors"]))
        try:
            self.save()
        except OSError as exc:
            print(f"--json: could not write {self.path!r} ({type(exc).__name__}: {exc}); the report above is "
                  "all there is of this run", file=sys.stderr)
            return 1
        return 1 if self["errors"] else 0


def fmt_bytes(v: int | None, digits: int = 1) -> str:
    if v is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(v) >= scale:
            return f"{v / scale:.{digits}f} {unit}"
    return f"{v} B"


def table(headers: list[str], rows: list[list[str]], first_numeric: int = 3) -> str:
    """Columns from `first_numeric` up to the last (a free-text note) are right-aligned."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    out = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip(), "  ".join("-" * w for w in widths)]
    for r in rows:
        out.append("  ".join(c.rjust(w) if first_numeric <= i < len(r) - 1 else c.ljust(w)
                             for i, (c, w) in enumerate(zip(r, widths))).rstrip())
    return "\n".join(out)
