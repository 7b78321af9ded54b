"""`prepare` shared by torchrun ranks: shards dealt round-robin, the same arrays as one process."""
import json
import subprocess
import sys
import textwrap
import time
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest

import tiny
from subprocs import child_env, free_port
from forgetscore.attribution import DiffusionModel, PreparedData, TrainingSet, prepare

pytestmark = pytest.mark.usefixtures("one_thread")


def _arrays(data):
    return [data.inputs(np.arange(data.n)).numpy(), data.text(np.arange(data.n), "all")[0].numpy()]


def test_two_ranks_prepare_the_same_cache_as_one_process(tmp_path):
    model_dir, train_dir = tiny.build_model(tmp_path / "model"), tiny.build_train(tmp_path / "train", n=9)
    log = tmp_path / "rank-{rank}.json"
    script = tmp_path / "dist_prepare.py"
    script.write_text(textwrap.dedent(f"""
        import json

        import torch.distributed as dist
        from forgetscore.attribution import DiffusionModel, TrainingSet, data, prepare
        from forgetscore.attribution.ranks import distributed_env

        written = []
        def logged(real):
            def write(path, *args):
                written.append(path.name)
                real(path, *args)
            return write
        data.write_npy, data.write_npy_rows = logged(data.write_npy), logged(data.write_npy_rows)
        rank, world = distributed_env()  # prepare joins torchrun's process group itself
        prepared = prepare(DiffusionModel.load({str(model_dir)!r}), TrainingSet.load({str(train_dir)!r}),
                           {str(tmp_path / "shared")!r}, shard_size=2, batch_size=2, progress=False)
        assert prepared.n == 9 and dist.get_world_size() == 2
        with open({str(log)!r}.format(rank=rank), "w") as f:
            json.dump(written, f)
        dist.destroy_process_group()
        """))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    written = [json.loads(Path(str(log).format(rank=r)).read_text()) for r in range(2)]
    shards = [[f"{kind}-{s:05d}.npy" for s in range(r, 5, 2) for kind in ("text", "inputs")] for r in range(2)]
    assert written == [shards[0] + ["caption_offsets.npy"], shards[1]]  # rank 0 also finishes the manifest
    one = prepare(DiffusionModel.load(model_dir), TrainingSet.load(train_dir), tmp_path / "single", shard_size=2,
                  batch_size=2, progress=False)
    shared = PreparedData(tmp_path / "shared")
    for a, b in zip(_arrays(shared), _arrays(one)):
        np.testing.assert_array_equal(a, b)
    assert shared.manifest == one.manifest


@pytest.mark.parametrize("device, local_rank, want", [("cuda:1", "0", 1), ("cuda", "3", 3), ("cpu", "1", None)])
def test_each_rank_joins_on_its_own_device(monkeypatch, device, local_rank, want):
    """NCCL's object collectives use the current CUDA device: it must be the rank's own GPU."""
    import torch
    import torch.distributed as dist

    from forgetscore.attribution import ranks

    calls = {}
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.setdefault("device", d))
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: calls.setdefault("backend", backend))
    monkeypatch.setattr(dist, "get_rank", lambda: 2)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    timeouts = []
    store = type("Store", (), {"set_timeout": lambda self, t: timeouts.append(t)})()
    monkeypatch.setattr(dist, "rendezvous", lambda url, rank, world, timeout: iter([(store, rank, world)]))
    monkeypatch.setattr(dist, "PrefixStore", lambda prefix, inner: inner)
    assert ranks.rank_device(device) == (f"cuda:{local_rank}" if device == "cuda" else device)
    assert ranks.init_distributed(device) == (2, 4)
    assert calls == ({"backend": "gloo"} if want is None else {"device": want, "backend": "nccl"})
    # The ranks wait minutes, not the collectives' hours, for each other to start.
    assert timeouts == [ranks.JOIN_TIMEOUT, timedelta(hours=6)]


def test_a_rank_that_never_joins_stops_the_others_after_the_join_timeout(monkeypatch, tmp_path):
    """A rank that failed before joining (a bad option on one machine) must not keep the others for hours."""
    from forgetscore.attribution import ranks

    for name, value in (("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "127.0.0.1"),
                        ("MASTER_PORT", str(free_port()))):
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("TORCHELASTIC_USE_AGENT_STORE", raising=False)
    started = time.monotonic()
    with pytest.raises(TimeoutError, match=r"^rank 0: the 2 ranks did not all start within 0:00:02 \(a rank stopped"):
        ranks.init_distributed("cpu", join_timeout=timedelta(seconds=2))
    assert time.monotonic() - started < 60
