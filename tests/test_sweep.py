"""Resumable, chunked and sharded loss sweeps (run_sweep) against plain LossSweep.run."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

import tiny
from subprocs import child_env, sigkill_when, stop_after_chunks
from forgetscore.attribution import Attributor, ScoringPlan
from forgetscore.attribution.losses import LossSweep
from forgetscore.attribution.ranks import distributed_env
from forgetscore.attribution.sweep import chunk_name, run_sweep, variant_id

PLAN = ScoringPlan(timesteps=(5, 500), flips=True, seed=3)
CHUNK = 3
# Every image has at least 4 rows (2 versions x 2 timesteps x 1-3 captions), so with batches of 4
# rows plain run() makes the same UNet batches as the chunks (one image each, split in 4-row calls)
# and the two agree bitwise; with other batch sizes only up to rounding.
BATCH = 4


# Every process here runs the UNet on one thread (OMP_NUM_THREADS=1 in the subprocesses): the
# thread count can change the last bits, and sharding must be the only difference compared bitwise.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    model_dir, train_dir = tiny.build_model(root / "model"), tiny.build_train(root / "train", n=9)
    att = Attributor.load(model_dir, train_dir, cache_dir=root / "cache", plan=PLAN, batch_size=BATCH,
                          progress=False)
    att.prepare()  # subprocesses below find the prepared data in the cache and only read it
    g = torch.Generator().manual_seed(0)
    name = att.names[0]
    p = att.model.unet.get_parameter(name)
    weights = {name: p.detach() + 0.05 * torch.randn(p.shape, generator=g)}
    torch.save(weights, root / "weights.pt")
    return {"root": root, "model": model_dir, "train": train_dir, "cache": root / "cache", "att": att,
            "weights": weights}


def _variants(setup):
    return [None, setup["weights"]]


def _ids(setup):
    return [variant_id(w) for w in _variants(setup)]


def _count_runs(monkeypatch, batch_size: bool = False) -> list:
    """From now on, the image ids (with the batch size if asked) of every LossSweep.run, in order."""
    calls = []
    real = LossSweep.run

    def counting(self, variants, indices=None, **kw):
        calls.append((self.batch_size, list(indices)) if batch_size else list(indices))
        return real(self, variants, indices, **kw)

    monkeypatch.setattr(LossSweep, "run", counting)
    return calls


def test_variant_id():
    w = {"a": torch.ones(2, 3), "b": torch.zeros(4, dtype=torch.bfloat16)}
    assert variant_id(None) == variant_id({}) == "original"
    assert variant_id(w) == variant_id(dict(reversed(list(w.items()))))
    assert variant_id(w) != variant_id({**w, "a": torch.ones(3, 2)})
    assert variant_id(w) != variant_id({**w, "a": torch.ones(2, 3, dtype=torch.float64)})
    w2 = {**w, "a": w["a"].clone()}
    w2["a"][1, 2] = 1.0000001
    assert variant_id(w) != variant_id(w2)


def test_chunked_equals_unchunked_and_resumes(setup, tmp_path, monkeypatch):
    sweep = setup["att"].sweep()
    variants = _variants(setup)
    want = sweep.run(variants, progress=False)
    out = tmp_path / "sweep"
    got = run_sweep(sweep, variants, out, chunk_size=CHUNK, variant_ids=_ids(setup), progress=False)
    assert got.shape == (2, 9, 2) and got.dtype == np.float64
    np.testing.assert_array_equal(got, want)
    assert sorted(p.name for p in out.iterdir()) == [chunk_name(k) for k in range(3)] + ["sweep.json"]
    assert distributed_env() == (0, 1)
    big = LossSweep(sweep.model, sweep.data, PLAN, batch_size=256)
    np.testing.assert_allclose(run_sweep(big, variants, tmp_path / "big", chunk_size=CHUNK, progress=False),
                               big.run(variants, progress=False), rtol=1e-6, atol=0)

    calls = _count_runs(monkeypatch)
    (out / chunk_name(1)).unlink()
    again = run_sweep(sweep, variants, out, chunk_size=CHUNK, variant_ids=_ids(setup), progress=False)
    assert calls == [[3, 4, 5]]
    np.testing.assert_array_equal(again, want)
    calls.clear()
    np.testing.assert_array_equal(run_sweep(sweep, variants, out, chunk_size=CHUNK, variant_ids=_ids(setup),
                                            progress=False), want)
    assert calls == []

    # A subset in any order, with a last chunk shorter than the others.
    order = np.array([8, 2, 5, 0, 7])
    sub = run_sweep(sweep, variants, tmp_path / "sub", indices=order, chunk_size=CHUNK, variant_ids=_ids(setup),
                    progress=False)
    np.testing.assert_array_equal(sub, want[:, order])


def test_sigkill_then_resume(setup, tmp_path):
    out = tmp_path / "sweep"
    script = tmp_path / "slow_sweep.py"
    script.write_text(textwrap.dedent(f"""
        import time
        import torch
        from forgetscore.attribution import Attributor, ScoringPlan
        from forgetscore.attribution import sweep
        from forgetscore.attribution.sweep import run_sweep, variant_id

        real = sweep.write_npy
        def slow(*a, **kw):
            real(*a, **kw)
            time.sleep(60)  # long enough to be killed before the next chunk
        sweep.write_npy = slow
        att = Attributor.load({str(setup["model"])!r}, {str(setup["train"])!r}, cache_dir={str(setup["cache"])!r},
                              plan=ScoringPlan.from_dict({PLAN.to_dict()!r}), batch_size={BATCH},
                              progress=False)
        w = torch.load({str(setup["root"] / "weights.pt")!r})
        run_sweep(att.sweep(), [None, w], {str(out)!r}, chunk_size={CHUNK},
                  variant_ids=[variant_id(None), variant_id(w)], progress=False)
        """))
    sigkill_when(script, out / chunk_name(0))
    assert not (out / chunk_name(2)).exists()
    # What a kill in the middle of a write leaves: a temporary file, never read as a chunk.
    (out / f".{chunk_name(2)}.abc123.tmp").write_bytes(b"\x93NUMPY half")

    sweep = setup["att"].sweep()
    got = run_sweep(sweep, _variants(setup), out, chunk_size=CHUNK, variant_ids=_ids(setup), progress=False)
    np.testing.assert_array_equal(got, sweep.run(_variants(setup), progress=False))
    assert sorted(p.name for p in out.iterdir()) == [chunk_name(k) for k in range(3)] + ["sweep.json"]


def test_directory_of_another_sweep_is_refused(setup, tmp_path):
    sweep = setup["att"].sweep()
    out = tmp_path / "sweep"
    run_sweep(sweep, [None], out, chunk_size=CHUNK, variant_ids=["original"], progress=False)
    other_plan = LossSweep(sweep.model, sweep.data, ScoringPlan(timesteps=(5, 501), flips=True, seed=3),
                           batch_size=BATCH)
    with pytest.raises(ValueError, match="cache: .*another model/data/plan.*plan.*fresh directory"):
        run_sweep(other_plan, [None], out, chunk_size=CHUNK, variant_ids=["original"], progress=False)
    with pytest.raises(ValueError, match="cache: .*chunk_size"):
        run_sweep(sweep, [None], out, chunk_size=4, variant_ids=["original"], progress=False)
    with pytest.raises(ValueError, match="cache: .*variant_ids"):
        run_sweep(sweep, [setup["weights"]], out, chunk_size=CHUNK, progress=False)
    with pytest.raises(ValueError, match="cache: .*indices_id"):
        run_sweep(sweep, [None], out, indices=np.arange(9)[::-1], chunk_size=CHUNK, variant_ids=["original"],
                  progress=False)
    bf16 = LossSweep(sweep.model, sweep.data, sweep.plan, batch_size=BATCH, precision="bf16")
    with pytest.raises(ValueError, match="cache: .*precision: 'fp32' there, 'bf16' here"):
        run_sweep(bf16, [None], out, chunk_size=CHUNK, variant_ids=["original"], progress=False)
    manifest = json.loads((out / "sweep.json").read_text())
    del manifest["precision"]  # a manifest from before precision was recorded: it meant fp32
    (out / "sweep.json").write_text(json.dumps(manifest))
    run_sweep(sweep, [None], out, chunk_size=CHUNK, variant_ids=["original"], progress=False)
    with pytest.raises(ValueError, match="cache: .*precision"):
        run_sweep(bf16, [None], out, chunk_size=CHUNK, variant_ids=["original"], progress=False)
    manifest["unet_id"] = "0" * 16  # as if made with other UNet weights
    (out / "sweep.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="cache: .*another model.*unet_id"):
        run_sweep(sweep, [None], out, chunk_size=CHUNK, variant_ids=["original"], progress=False)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / chunk_name(0)).write_bytes(b"")
    with pytest.raises(ValueError, match="cache: .*no sweep.json"):
        run_sweep(sweep, [None], orphan, chunk_size=CHUNK, variant_ids=["original"], progress=False)




def _expected(setup):
    """(before-losses, after-losses of setup's weights) swept with BATCH: the same UNet batches as the chunks."""
    return (setup["att"].sweep().run([None], progress=False)[0],
            setup["att"].sweep().run([setup["weights"]], progress=False))


def _attributor(setup, cache, batch_size=BATCH) -> Attributor:
    return Attributor.load(setup["model"], setup["train"], cache_dir=cache, plan=PLAN, batch_size=batch_size,
                           progress=False, chunk_size=CHUNK)


def _interrupted(monkeypatch, sweep, chunks: int = 1) -> None:
    """`sweep()` killed once `chunks` chunks are on disk."""
    resume = stop_after_chunks(monkeypatch, chunks)
    with pytest.raises(KeyboardInterrupt):
        sweep()
    resume()


def _after(att, variants) -> np.ndarray:
    losses = att._run(variants, None, desc="after")
    att.forget_sweeps()  # what attribute() does once it has the scores
    return losses


def test_auto_batch_size_resumes_under_the_interrupted_sweeps_own(setup, tmp_path, monkeypatch):
    """The probe's answer moves with free GPU memory; a resumed "auto" sweep keeps the batch size it began with."""
    from forgetscore.attribution import losses

    want, want_after = _expected(setup)
    variants, cache = [setup["weights"]], tmp_path / "cache"
    probed = {"rows": BATCH}
    monkeypatch.setattr(losses, "auto_batch_size", lambda model, precision: probed["rows"])
    _interrupted(monkeypatch, _attributor(setup, cache, "auto").before_losses)
    (first,) = (cache / "sweeps").iterdir()
    assert [p.name for p in first.glob("chunk-*")] == [chunk_name(0)]

    calls = _count_runs(monkeypatch, batch_size=True)
    probed["rows"] = 2 * BATCH  # more memory free now: the finished chunk's batch size still fits
    att = _attributor(setup, cache, "auto")
    assert att.batch_size == 2 * BATCH
    np.testing.assert_array_equal(att.before_losses(), want)
    assert calls == [(BATCH, [3, 4, 5]), (BATCH, [6, 7, 8])]
    assert list((cache / "sweeps").iterdir()) == []  # done: nothing left to resume

    # Interrupted again (the after-sweep of some weights); then the probe finds less room than that
    # sweep's batch size: it starts afresh under what fits, and the superseded chunks go when it ends.
    _interrupted(monkeypatch, lambda: _attributor(setup, cache, "auto")._run(variants, None, desc="after"))
    calls.clear()
    probed["rows"] = BATCH // 2
    got = _after(_attributor(setup, cache, "auto"), variants)
    assert [c[0] for c in calls] == [BATCH // 2] * 3
    np.testing.assert_allclose(got, want_after, rtol=1e-6, atol=0)
    assert list((cache / "sweeps").iterdir()) == []

    # An explicit batch size is obeyed, whatever an interrupted sweep used.
    _interrupted(monkeypatch, lambda: _attributor(setup, cache)._run(variants, None, desc="after"))
    calls.clear()
    _after(_attributor(setup, cache, 2 * BATCH), variants)
    assert [c[0] for c in calls] == [2 * BATCH] * 3
    assert list((cache / "sweeps").iterdir()) == []

    # Interrupted under the probe's own size (2 chunks done), then under a smaller one (1 chunk): the probe's
    # own folder, with the most chunks, is resumed, and every folder of the sweep goes when it ends.
    _interrupted(monkeypatch, lambda: _attributor(setup, cache, 2 * BATCH)._run(variants, None, desc="after"), 2)
    _interrupted(monkeypatch, lambda: _attributor(setup, cache, BATCH)._run(variants, None, desc="after"))
    assert len(list((cache / "sweeps").iterdir())) == 2
    calls.clear()
    probed["rows"] = 2 * BATCH
    np.testing.assert_allclose(_after(_attributor(setup, cache, "auto"), variants), want_after, rtol=1e-6, atol=0)
    assert calls == [(2 * BATCH, [6, 7, 8])]
    assert list((cache / "sweeps").iterdir()) == []


def test_the_attributors_own_sweep_folders_survive_kills_at_any_step(setup, tmp_path, monkeypatch):
    """Kills while the before-losses are saved, or while a finished sweep's folder is deleted."""
    from forgetscore.attribution import attributor as attributor_mod

    want, want_after = _expected(setup)
    variants, cache = [setup["weights"]], tmp_path / "cache"
    calls = _count_runs(monkeypatch)
    # Killed while writing the before-losses: the finished sweep's chunks are still there to resume from.
    real_write = attributor_mod.write_npy
    monkeypatch.setattr(attributor_mod, "write_npy", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _attributor(setup, cache).before_losses()
    monkeypatch.setattr(attributor_mod, "write_npy", real_write)
    assert len(calls) == 3
    calls.clear()
    np.testing.assert_array_equal(_attributor(setup, cache).before_losses(), want)
    assert calls == []  # nothing swept again
    assert list((cache / "sweeps").iterdir()) == []

    # Killed once the before-losses are saved, before their sweep's folder is deleted: the next run, which reads
    # the saved losses and never resumes that sweep, deletes it.
    (cache / f"{_attributor(setup, cache)._before_path().name}").unlink()
    real_forget = attributor_mod.Attributor.forget_sweeps
    monkeypatch.setattr(attributor_mod.Attributor, "forget_sweeps",
                        lambda self: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _attributor(setup, cache).before_losses()
    monkeypatch.setattr(attributor_mod.Attributor, "forget_sweeps", real_forget)
    assert len(list((cache / "sweeps").iterdir())) == 1
    calls.clear()
    np.testing.assert_array_equal(_attributor(setup, cache).before_losses(), want)
    assert calls == [] and list((cache / "sweeps").iterdir()) == []

    # A folder whose manifest went first (what an older removal, file by file, could leave when killed):
    # the Attributor's own folder, so its untrusted chunks are removed and the sweep runs afresh.
    _interrupted(monkeypatch, lambda: _attributor(setup, cache)._run(variants, None, desc="after"))
    (folder,) = (cache / "sweeps").iterdir()
    (folder / "sweep.json").unlink()
    # ... and a removal killed after its rename, and a killed write's temporary file from long ago.
    (cache / "sweeps" / ".0123.removing-1-2").mkdir()
    stale = cache / ".before-0123.npy.abc.tmp"
    stale.write_bytes(b"half")
    theirs = [cache / ".draft.tmp", cache / ".backup.removing-old"]  # files of the user's own: never touched
    theirs[0].write_bytes(b"mine")
    theirs[1].mkdir()
    for p in (stale, *theirs):
        os.utime(p, (0, 0))
    calls.clear()
    got = _after(_attributor(setup, cache), variants)
    assert len(calls) == 3
    np.testing.assert_array_equal(got, want_after)
    assert list((cache / "sweeps").iterdir()) == [] and not stale.exists()
    assert all(p.exists() for p in theirs)


def test_two_rank_gloo_sweep_equals_single_process(setup, tmp_path):
    out, result, computed_log = tmp_path / "sweep", tmp_path / "result-{rank}.npy", tmp_path / "computed-{rank}.json"
    script = tmp_path / "dist_sweep.py"
    script.write_text(textwrap.dedent(f"""
        import json

        import numpy as np
        import torch
        import torch.distributed as dist
        from forgetscore.attribution import Attributor, ScoringPlan
        from forgetscore.attribution.losses import LossSweep
        from forgetscore.attribution.ranks import distributed_env
        from forgetscore.attribution.sweep import run_sweep, variant_id

        computed = []
        real = LossSweep.run
        def logged(self, variants, indices=None, **kw):
            computed.append([int(i) for i in indices])
            return real(self, variants, indices, **kw)
        LossSweep.run = logged
        rank, world = distributed_env()
        assert world == 2, world
        att = Attributor.load({str(setup["model"])!r}, {str(setup["train"])!r}, cache_dir={str(setup["cache"])!r},
                              plan=ScoringPlan.from_dict({PLAN.to_dict()!r}), batch_size={BATCH},
                              progress=False)
        w = torch.load({str(setup["root"] / "weights.pt")!r})
        got = run_sweep(att.sweep(), [None, w], {str(out)!r}, chunk_size={CHUNK},
                        variant_ids=[variant_id(None), variant_id(w)], progress=False)
        assert dist.is_initialized() and dist.get_backend() == "gloo"
        np.save({str(result)!r}.format(rank=rank), got)
        try:  # ranks that disagree on what to sweep: all of them raise, none hangs
            run_sweep(att.sweep(), [None], {str(tmp_path / "other")!r}, indices=np.arange(rank + 1),
                      chunk_size={CHUNK}, variant_ids=["original"], progress=False)
            error = None
        except ValueError as exc:
            error = str(exc)
        with open({str(computed_log)!r}.format(rank=rank), "w") as f:
            json.dump({{"computed": computed, "error": error}}, f)
        dist.destroy_process_group()
        """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = [json.loads(Path(str(computed_log).format(rank=rank)).read_text()) for rank in range(2)]
    # chunks 0 and 2 on rank 0, chunk 1 on rank 1
    assert [log["computed"] for log in logs] == [[[0, 1, 2], [6, 7, 8]], [[3, 4, 5]]]
    for log in logs:
        assert "rank 1 was called with another n_images" in log["error"]
    assert not (tmp_path / "other").exists()

    want = run_sweep(setup["att"].sweep(), _variants(setup), tmp_path / "single", chunk_size=CHUNK,
                     variant_ids=_ids(setup), progress=False)
    for rank in range(2):
        np.testing.assert_array_equal(np.load(str(result).format(rank=rank)), want)
    assert sorted(p.name for p in out.iterdir()) == [chunk_name(k) for k in range(3)] + ["sweep.json"]
    assert json.loads((out / "sweep.json").read_text())["variant_ids"] == _ids(setup)


def test_a_resumed_sweeps_rate_counts_the_images_it_computed(setup, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    _interrupted(monkeypatch, _attributor(setup, cache).before_losses)  # 1 chunk of 3 images done
    att = _attributor(setup, cache)
    att.before_losses()
    assert att.timings.stages["score before"][1:] == (9 - CHUNK, "img")


def test_timings_add_up_a_stage_run_again_and_fit_long_names():
    from forgetscore.attribution.attributor import Timings

    t = Timings()
    t.add("unlearn", 2.0, 10, "draws")
    t.add("unlearn", 3.0, 15, "draws")  # a second query
    t.add("score before+after", 4.0, 8, "img")
    assert t.stages["unlearn"] == (5.0, 25, "draws")
    assert t.lines(total=9.25) == ["  unlearn                 5.0 s  (5 draws/s)",
                                   "  score before+after      4.0 s  (2 img/s)",
                                   "  total                   9.2 s"]
    assert t.lines()[0] == "  unlearn                 5.0 s  (5 draws/s)"


def test_a_killed_before_and_after_pass_resumes_after_another_job_cached_the_before_losses(setup, tmp_path,
                                                                                         monkeypatch):
    """Its chunks would otherwise stay in the cache for good: the rerun, finding the before-losses cached, would
    sweep the after-losses alone."""
    from forgetscore.attribution import UnlearnConfig

    config, query = UnlearnConfig(draws=4, micro_batch=4), torch.rand(1, 8, 8) * 2 - 1
    cache = tmp_path / "cache"
    want = _attributor(setup, tmp_path / "alone").attribute(query, "a red dot", config=config, fisher_samples=6)
    _interrupted(monkeypatch, lambda: _attributor(setup, cache).attribute(query, "a red dot", config=config,
                                                                          fisher_samples=6))
    _attributor(setup, cache).before_losses()  # another job caches them
    calls = _count_runs(monkeypatch)
    got = _attributor(setup, cache).attribute(query, "a red dot", config=config, fisher_samples=6)
    assert calls == [[3, 4, 5], [6, 7, 8]]  # the killed pass's first chunk served
    np.testing.assert_array_equal(got.scores, want.scores)
    assert list((cache / "sweeps").iterdir()) == []
