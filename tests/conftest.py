import os

# Set before anything imports triton or transformers.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from forgetscore import kernels  # noqa: E402

# Backends checked against the reference; CUDA ones only where a GPU is present.
NATIVE_BACKENDS = [b for b in ("cpu", "triton", "cuda") if b in kernels.available_backends()]
ALL_BACKENDS = ["torch"] + NATIVE_BACKENDS


def backend_device(backend: str) -> torch.device:
    if backend in ("cuda",) or (backend == "triton" and torch.cuda.is_available()):
        return torch.device("cuda")
    return torch.device("cpu")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a whole module (use with ``pytestmark = pytest.mark.usefixtures("one_thread")``).

    Tiny tensors gain nothing from more threads, waiting for them on a busy machine takes ten
    times longer, and results compared bitwise with other processes need one fixed count.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def fresh_seed(what: str = "rng", nbytes: int = 4) -> int:
    """A new random seed, printed as "<what> seed N" (pytest shows it on failure).

    Replay a failure with the seeds it printed: FORGETSCORE_TEST_SEED=N sets every seed,
    FORGETSCORE_TEST_SEED=data=N,test=M those named (the others stay random).
    """
    replay = os.environ.get("FORGETSCORE_TEST_SEED", "")
    named = dict(item.split("=", 1) for item in replay.split(",") if "=" in item)
    given = named.get(what) if named else (replay or None)
    seed = int(given) if given else int.from_bytes(os.urandom(nbytes), "little")
    print(f"{what} seed {seed}")
    return seed


@pytest.fixture
def rng(request) -> torch.Generator:
    """A fresh random generator per test."""
    seed = fresh_seed()
    request.node.user_properties.append(("rng_seed", seed))
    return torch.Generator().manual_seed(seed)


def poison_heap(numel: int) -> None:
    """Leave freed NaN-filled memory of about `numel` floats for the next allocation to reuse.

    A kernel that skips elements then returns NaN (or stale values) there instead of
    coincidentally correct zeros, and the comparison with the reference catches it.
    """
    for n in (numel, numel * 2, max(numel // 2, 1)):
        t = torch.full((n,), float("nan"))
        del t
