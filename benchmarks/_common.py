"""Helpers shared by the benchmark scripts: timing sync, the machine, the JSON record, formatting."""
from __future__ import annotations

import datetime
import json
import os
import platform
import signal
import sys
import time
import traceback
from collections.abc import Callable

import torch


def make_sync(device: torch.device) -> Callable[[], None]:
    """What to call before reading a clock: wait for queued GPU work; nothing on the CPU."""
    return torch.cuda.synchronize if device.type == "cuda" else (lambda: None)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
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
        """Stamp the elapsed time and load, save, print the report and errors; the exit status."""
        self["meta"]["elapsed_s"] = time.perf_counter() - start
        self["meta"]["load_average_end"] = load_average()
        self.save()
        print()
        print(report(self))
        if self["errors"]:
            print("\nerrors:\n  " + "\n  ".join(self["errors"]))
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
