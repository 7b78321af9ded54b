"""Running this checkout's code in child processes: their environment, and killing one mid-run."""
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


def sigkill_when(script: Path, appears: Path, timeout_s: float = 120) -> None:
    """Run `script` and SIGKILL it as soon as `appears` exists (it must, within `timeout_s`)."""
    proc = subprocess.Popen([sys.executable, str(script)], env=child_env(), stderr=subprocess.PIPE)
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
