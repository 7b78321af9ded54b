"""Running this checkout's code in child processes: their environment, and killing one (or a sweep) mid-run."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child_env() -> dict:
    """One intra-op thread (bitwise comparisons need the same count everywhere), offline, this checkout first."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def sigkill_when(script: Path, appears: Path, timeout_s: float = 120, env: dict | None = None,
                 stdout=None) -> None:
    """Run `script` (in `env`, its output to `stdout`) and SIGKILL it as soon as `appears` exists (it must, within
    `timeout_s`)."""
    proc = subprocess.Popen([sys.executable, str(script)], env=child_env() if env is None else env, stdout=stdout,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout_s
    try:
        while not appears.exists():
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, f"{appears.name} never appeared"
            time.sleep(0.05)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_after_chunks(monkeypatch, chunks: int = 1):
    """Sweeps raise KeyboardInterrupt once `chunks` chunks are on disk, as if killed there; undo with the return."""
    from forgetscore.attribution import sweep as sweep_mod

    real = sweep_mod.write_npy
    written = []

    def write_then_stop(path, arr):
        real(path, arr)
        written.append(path)
        if len(written) == chunks:
            raise KeyboardInterrupt

    monkeypatch.setattr(sweep_mod, "write_npy", write_then_stop)
    return lambda: monkeypatch.setattr(sweep_mod, "write_npy", real)
