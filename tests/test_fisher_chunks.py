"""The Fisher in resumable, sharded chunks (run_fisher, Attributor.fisher) against the in-memory one."""
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

import tiny
from subprocs import child_env, sigkill_when
from forgetscore import cli
from forgetscore.attribution import Attributor, ScoringPlan, compute_fisher
from forgetscore.attribution import fisher as fisher_mod
from forgetscore.attribution.fisher import MANIFEST, PREFIX, chunk_name, run_fisher

PLAN = ScoringPlan(timesteps=(5, 500), flips=True, seed=3)
SAMPLES, CHUNK, BATCH = 13, 4, 2  # 4 chunks, the last one short; batches fall on chunk boundaries

# Bitwise comparisons between processes need the same intra-op thread count everywhere.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("fisher")
    model_dir, train_dir = tiny.build_model(root / "model"), tiny.build_train(root / "train", n=9)
    att = Attributor.load(model_dir, train_dir, cache_dir=root / "cache", plan=PLAN, weights="cross-attn",
                          progress=False)
    data = att.prepare()
    return {"root": root, "model": model_dir, "train": train_dir, "att": att, "data": data}


def _run(setup, out, **kw):
    att = setup["att"]
    kw = {"samples": SAMPLES, "chunk_size": CHUNK, "batch_size": BATCH, "seed": 7, "progress": False, **kw}
    return run_fisher(att.model, setup["data"], att.names, out, **kw)


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for n in a:
        assert a[n].dtype == torch.float64
        assert torch.equal(a[n], b[n]), n




def test_chunks_equal_in_memory_fisher(setup, tmp_path):
    att = setup["att"]
    whole = compute_fisher(att.model, setup["data"], att.names, samples=SAMPLES, seed=7, batch_size=BATCH,
                           progress=False)
    # One chunk: the same batches summed in the same order.
    _assert_same(_run(setup, tmp_path / "one", chunk_size=SAMPLES), whole)
    # Four chunks: the same batches, only the float64 sums grouped otherwise.
    out = tmp_path / "four"
    got = _run(setup, out)
    for n in whole:
        torch.testing.assert_close(got[n], whole[n], rtol=1e-12, atol=0)
        assert float(got[n].abs().max()) > 0
    # Finished: every chunk folded into the prefix and deleted.
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, PREFIX]
    assert json.loads((out / MANIFEST).read_text())["n_chunks"] == 4
    # A finished directory computes nothing again.
    again = _run(setup, out)
    _assert_same(again, got)


def test_interrupted_run_resumes_to_the_same_bits(setup, tmp_path, monkeypatch):
    want = _run(setup, tmp_path / "whole")
    out = tmp_path / "cut"
    starts, stopped = [], []
    real = fisher_mod.fisher_sums

    def failing(*a, start, **kw):
        starts.append(start)
        if start == 2 * CHUNK and not stopped:
            stopped.append(start)
            raise InterruptedError("stopped in the third chunk")
        return real(*a, start=start, **kw)

    monkeypatch.setattr(fisher_mod, "fisher_sums", failing)
    with pytest.raises(InterruptedError):
        _run(setup, out)
    assert starts == [0, CHUNK, 2 * CHUNK]
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, PREFIX]  # chunks 0 and 1 are in the prefix
    # What a crash could leave beside it: a chunk already folded (killed before deleting it), a temporary
    # file of a write cut short, and a damaged later chunk. None of them may count.
    names = setup["att"].names
    (out / chunk_name(0)).write_bytes((tmp_path / "whole" / PREFIX).read_bytes())
    (out / f".{chunk_name(2)}.x1y2.tmp").write_bytes(b"half")
    (out / chunk_name(3)).write_bytes(b"not a chunk")
    starts.clear()
    got = _run(setup, out)
    assert starts == [2 * CHUNK, 3 * CHUNK]
    _assert_same(got, want)
    assert sorted(p.name for p in out.iterdir()) == [MANIFEST, PREFIX]
    assert set(load_file(out / PREFIX)) == set(names)


def test_sigkill_then_resume(setup, tmp_path):
    out = tmp_path / "killed"
    script = tmp_path / "slow_fisher.py"
    att = setup["att"]
    script.write_text(textwrap.dedent(f"""
        import time
        from forgetscore.attribution import Attributor, ScoringPlan
        from forgetscore.attribution import fisher

        real = fisher._save
        def slow(path, *a, **kw):
            real(path, *a, **kw)
            if path.name == fisher.PREFIX:
                time.sleep(60)  # long enough to be killed after the first fold
        fisher._save = slow
        att = Attributor.load({str(setup["model"])!r}, {str(setup["train"])!r}, cache_dir={str(att.cache_dir)!r},
                              plan=ScoringPlan.from_dict({PLAN.to_dict()!r}), weights="cross-attn", progress=False)
        fisher.run_fisher(att.model, att.prepare(), att.names, {str(out)!r}, samples={SAMPLES},
                          chunk_size={CHUNK}, batch_size={BATCH}, seed=7, progress=False)
        """))
    sigkill_when(script, out / PREFIX)
    assert fisher_mod._folded(out) == 1
    _assert_same(_run(setup, out), _run(setup, tmp_path / "whole"))


def test_directory_of_another_fisher_is_refused(setup, tmp_path):
    out = tmp_path / "f"
    _run(setup, out)
    for kw, key in (({"samples": SAMPLES + 1}, "samples"), ({"seed": 8}, "seed"), ({"batch_size": 3}, "batch_size"),
                    ({"chunk_size": 5}, "chunk_size"), ({"flips": False}, "flips")):
        with pytest.raises(ValueError, match=f"cache: .*another model.*\\({key}: "):
            _run(setup, out, **kw)
    orphan = tmp_path / "orphan"
    orphan.mkdir()
    (orphan / chunk_name(0)).write_bytes(b"")
    with pytest.raises(ValueError, match="cache: .*no fisher.json"):
        _run(setup, orphan)
    for kw, name in (({"chunk_size": 0}, "chunk_size"), ({"batch_size": 1.5}, "batch_size"),
                     ({"samples": 0}, "samples")):
        with pytest.raises(ValueError, match=f"^{name}: .* must be an int >= 1"):
            _run(setup, tmp_path / "bad", **kw)
    assert not (tmp_path / "bad").exists()


def test_attributor_fisher_resumes_in_its_cache_and_cleans_up(setup, tmp_path, monkeypatch):
    att = Attributor.load(setup["model"], setup["train"], cache_dir=tmp_path / "cache", plan=PLAN,
                          weights="cross-attn", progress=False, fisher_batch_size=BATCH, fisher_chunk_size=CHUNK)
    real = fisher_mod.fisher_sums

    def failing(*a, start, **kw):
        if start == CHUNK:
            raise RuntimeError("out of memory, say")
        return real(*a, start=start, **kw)

    monkeypatch.setattr(fisher_mod, "fisher_sums", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        att.fisher(SAMPLES, seed=7)
    parts = list(att.cache_dir.glob("fisher-*.parts-*"))
    assert len(parts) == 1 and fisher_mod._folded(parts[0]) == 1
    monkeypatch.setattr(fisher_mod, "fisher_sums", real)
    got = att.fisher(SAMPLES, seed=7)
    assert att.timings.stages["fisher"][1] == SAMPLES - CHUNK  # the resumed run's own samples, for its rate
    assert not list(att.cache_dir.glob("fisher-*.parts-*"))
    _assert_same({n: got[n] for n in got}, _run(setup, tmp_path / "direct"))
    with pytest.raises(ValueError, match="fisher_chunk_size: 0 must be an int >= 1"):
        Attributor(att.model, att.train, plan=PLAN, fisher_chunk_size=0)


def test_fisher_options_reach_the_attributor(setup, tmp_path):
    parser = cli.build_parser()
    common = ["--model", str(setup["model"]), "--train", str(setup["train"]), "--cache", str(tmp_path)]
    args = parser.parse_args(["attribute", *common, "--prompt", "p", "--out", str(tmp_path / "o"),
                              "--fisher-batch-size", "5", "--fisher-chunk-size", "40"])
    att = cli._attributor(args)
    assert (att.fisher_batch_size, att.fisher_chunk_size) == (5, 40)
    att = cli._attributor(parser.parse_args(["score", *common]))
    assert (att.fisher_batch_size, att.fisher_chunk_size) == ("auto", fisher_mod.FISHER_CHUNK)
    att = cli._attributor(parser.parse_args(["fisher", *common, "--fisher-batch-size", "auto"]))
    assert att.fisher_batch_size == "auto"
    with pytest.raises(SystemExit):
        parser.parse_args(["fisher", *common, "--fisher-batch-size", "most"])
    for bad in ("most", 0, 2.5):
        with pytest.raises(ValueError, match=rf"^fisher_batch_size: {bad!r} must be an int >= 1"):
            Attributor(att.model, att.train, plan=PLAN, fisher_batch_size=bad)
        with pytest.raises(ValueError, match=rf"^batch_size: {bad!r} must be an int >= 1"):
            att.fisher(SAMPLES, batch_size=bad)


class FakeOOM(torch.cuda.OutOfMemoryError):
    pass


def test_the_fisher_batch_probe_halves_on_out_of_memory_and_runs_a_real_batch(setup, monkeypatch):
    att = setup["att"]
    real, tried = att.model.unet.forward, []

    def forward(x, *a, **kw):
        tried.append(x.shape[0])
        if x.shape[0] > 24:
            raise FakeOOM("CUDA out of memory (fake)")
        return real(x, *a, **kw)

    monkeypatch.setattr(att.model.unet, "forward", forward)
    assert fisher_mod.probe_fisher_batch_size(att.model, setup["data"], att.names, cap=100) == 16
    assert tried == [64, 32, 16]
    tried.clear()
    # Off CUDA, "auto" is the fixed batch, with no try at all.
    assert fisher_mod.auto_fisher_batch_size(att.model, setup["data"], att.names) == fisher_mod.FISHER_BATCH == 64
    assert tried == []
    monkeypatch.setattr(att.model.unet, "forward", lambda *a, **kw: (_ for _ in ()).throw(FakeOOM("fake")))
    with pytest.raises(ValueError, match="^fisher_batch_size: 'auto' found nothing that fits: one sample's "
                                         "forward and backward pass runs out of device memory; free GPU memory, or"):
        fisher_mod.probe_fisher_batch_size(att.model, setup["data"], att.names, cap=4)


def _parts(folder: Path, batch: int, chunk: int, chunks: int) -> Path:
    folder.mkdir(parents=True)
    (folder / MANIFEST).write_text(json.dumps({"batch_size": batch, "chunk_size": chunk}))
    for k in range(chunks):
        (folder / chunk_name(k)).write_bytes(b"")
    return folder


def test_an_auto_fisher_resumes_with_the_batch_of_its_interrupted_chunks(setup, tmp_path, monkeypatch):
    pick = fisher_mod.resumable_fisher_batch_size
    folders = [_parts(tmp_path / "a", 32, 8, 3), _parts(tmp_path / "b", 128, 8, 5), _parts(tmp_path / "c", 16, 8, 0),
               _parts(tmp_path / "d", 16, 4, 9), tmp_path / "missing"]
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / MANIFEST).write_text("{not json")
    folders.append(tmp_path / "e")
    assert pick(folders, 8, 256) == 128  # the most chunks, and it fits
    assert pick(folders, 8, 64) == 32  # 128 no longer fits; chunks of another chunk size do not count
    assert pick(folders, 8, 16) == 16 and pick([], 8, 512) == 512  # nothing to resume: what fits now

    # In the Attributor: the probe's answer, unless an interrupted run of this Fisher made chunks with a smaller one.
    att = Attributor.load(setup["model"], setup["train"], cache_dir=tmp_path / "cache", plan=PLAN,
                          weights="cross-attn", progress=False, fisher_chunk_size=CHUNK)
    assert att.fisher_batch_size == "auto"
    monkeypatch.setattr("forgetscore.attribution.attributor.auto_fisher_batch_size", lambda *a, **kw: 4)
    used, real = [], fisher_mod.fisher_sums

    def failing(*a, start, batch_size, fail=True, **kw):
        used.append(batch_size)
        if fail and start == CHUNK:
            raise RuntimeError("killed, say")
        return real(*a, start=start, batch_size=batch_size, **kw)

    monkeypatch.setattr(fisher_mod, "fisher_sums", failing)
    with pytest.raises(RuntimeError, match="killed"):
        att.fisher(SAMPLES, seed=7)
    assert used == [4, 4]
    monkeypatch.setattr("forgetscore.attribution.attributor.auto_fisher_batch_size", lambda *a, **kw: 8)
    monkeypatch.setattr(fisher_mod, "fisher_sums", lambda *a, **kw: failing(*a, fail=False, **kw))
    used.clear()
    got = att.fisher(SAMPLES, seed=7)  # resumed under the batch of its chunks, 4, which still fits
    assert used == [4, 4, 4]
    _assert_same(got, _run(setup, tmp_path / "direct", batch_size=4))


def test_two_ranks_under_torchrun_equal_one_process(setup, tmp_path):
    log = tmp_path / "rank-{rank}.json"
    script = tmp_path / "dist_fisher.py"
    script.write_text(textwrap.dedent(f"""
        import json
        import time

        import numpy as np
        import torch
        import torch.distributed as dist
        from forgetscore.attribution import Attributor, ScoringPlan, UnlearnConfig
        from forgetscore.attribution import attributor, fisher
        from forgetscore.attribution.ranks import distributed_env

        starts = []
        real = fisher.fisher_sums
        def logged(*a, start, **kw):
            starts.append(start)
            return real(*a, start=start, **kw)
        fisher.fisher_sums = logged
        rank, world = distributed_env()
        if rank == 1:  # a slow reader: rank 0 must not remove the chunk folder before it has read the sum
            real_load = fisher._load
            def slow_load(path):
                time.sleep(1.5)
                return real_load(path)
            fisher._load = slow_load
        assert world == 2, world
        att = Attributor.load({str(setup["model"])!r}, {str(setup["train"])!r}, cache_dir={str(tmp_path / "c")!r},
                              plan=ScoringPlan.from_dict({PLAN.to_dict()!r}), weights="cross-attn", progress=False,
                              fisher_batch_size={BATCH}, fisher_chunk_size={CHUNK})
        att.fisher({SAMPLES}, seed=7)
        assert dist.get_backend() == "gloo"
        # Unlearning under torchrun: rank 0 alone takes the step and every rank sweeps its weights, even
        # where another rank's own step would differ in the last bits (as on two GPUs).
        unlearned_by = []
        real_unlearn = attributor.unlearn
        def unlearn_here(*a, **kw):
            unlearned_by.append(rank)
            return {{n: w + 1e-6 * rank for n, w in real_unlearn(*a, **kw).items()}}
        attributor.unlearn = unlearn_here
        query = torch.rand(1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
        result = att.attribute(query, "a red square", k=3, fisher_samples={SAMPLES},
                               config=UnlearnConfig(steps=1, alpha=0.05, draws=4, micro_batch=2, damping=0.1))
        np.save({str(tmp_path / "scores-{rank}.npy")!r}.format(rank=rank), result.scores)
        # Many chunks and a slow rank 1: the folder never holds more than two rounds of chunks.
        most = [0]
        real_save = fisher._save
        def counting_save(path, tensors, meta):
            real_save(path, tensors, meta)
            most[0] = max(most[0], len(list(path.parent.glob("chunk-*.safetensors"))))
        fisher._save = counting_save
        fisher.fisher_sums = real if rank == 0 else lambda *a, **kw: (time.sleep(0.3), real(*a, **kw))[1]
        many = fisher.run_fisher(att.model, att.prepare(), att.names, {str(tmp_path / "many")!r}, samples=24,
                                 chunk_size=2, batch_size=2, progress=False)
        torch.save(many, {str(tmp_path / "many-{rank}.pt")!r}.format(rank=rank))
        fisher._save, fisher.fisher_sums = real_save, logged
        try:  # ranks that disagree on the Fisher: all of them raise, none hangs
            fisher.run_fisher(att.model, att.prepare(), att.names, {str(tmp_path / "other")!r},
                              samples={SAMPLES} + rank, progress=False)
            error = None
        except ValueError as exc:
            error = str(exc)
        with open({str(log)!r}.format(rank=rank), "w") as f:
            json.dump({{"starts": starts, "error": error, "unlearned_by": unlearned_by, "most": most[0]}}, f)
        dist.destroy_process_group()
        """))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)]
    proc = subprocess.run(cmd, env=child_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    logs = [json.loads(Path(str(log).format(rank=r)).read_text()) for r in range(2)]
    # The Fisher's chunks dealt round-robin (twice: seed 7, then seed 0 for the attribution)
    assert [g["starts"] for g in logs] == [[0, 2 * CHUNK] * 2, [CHUNK, 3 * CHUNK] * 2]
    assert [g["unlearned_by"] for g in logs] == [[0], []]
    scores = [np.load(tmp_path / f"scores-{r}.npy") for r in range(2)]
    assert np.isfinite(scores[0]).all() and np.array_equal(scores[0], scores[1])
    for g in logs:
        assert "run_fisher: rank 1 was called with another samples" in g["error"]
    assert not (tmp_path / "other").exists()
    assert max(g["most"] for g in logs) <= 2 * 2  # two rounds of two ranks' chunks
    many = [torch.load(tmp_path / f"many-{r}.pt") for r in range(2)]
    _assert_same(many[0], many[1])
    _assert_same(many[0], _run(setup, tmp_path / "many-single", samples=24, chunk_size=2, batch_size=2, seed=0))
    files = [f for f in (tmp_path / "c").glob("fisher-*.safetensors")
             if json.loads(safe_open(str(f), "pt").metadata()["forgetscore"])["seed"] == 7]
    assert len(files) == 1 and not list((tmp_path / "c").glob("fisher-*.parts-*"))
    _assert_same(load_file(files[0]), _run(setup, tmp_path / "single"))


def test_a_running_sum_no_manifest_vouches_for_is_not_trusted(setup, tmp_path):
    """A prefix left without its fisher.json (e.g. a removal cut short) belongs to unknown settings."""
    out = tmp_path / "f"
    _run(setup, out, seed=1)
    (out / MANIFEST).unlink()
    with pytest.raises(ValueError, match=r"cache: .*holds chunk files \(prefix\.safetensors.*no fisher\.json"):
        _run(setup, out, seed=2)
    got = _run(setup, out, seed=2, untrusted="remove")  # a folder the caller owns: start afresh
    att = setup["att"]
    want = compute_fisher(att.model, setup["data"], att.names, samples=SAMPLES, seed=2, batch_size=BATCH,
                          progress=False)
    for n in want:
        torch.testing.assert_close(got[n], want[n], rtol=1e-12, atol=0)


def test_chunk_names_of_any_length_and_foreign_files(setup, tmp_path):
    assert fisher_mod._chunk_index(chunk_name(1_000_000)) == 1_000_000
    assert fisher_mod._chunk_index(chunk_name(7)) == 7
    assert fisher_mod._chunk_index("chunk-x.safetensors") is None and fisher_mod._chunk_index(PREFIX) is None
    out = tmp_path / "f"
    _run(setup, out)
    (out / "chunk-x.safetensors").write_bytes(b"someone else's")
    _run(setup, out)  # folding again neither fails on nor deletes a name that is not a chunk's
    assert (out / "chunk-x.safetensors").exists()


def test_an_unreadable_manifest_is_an_error_and_deletes_nothing(setup, tmp_path, monkeypatch):
    from forgetscore.attribution import ranks

    out = tmp_path / "f"
    _run(setup, out)
    before = sorted(p.name for p in out.iterdir())

    def unreadable(path):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(ranks, "read_json", unreadable)
    with pytest.raises(ValueError, match=r"cache: .*fisher\.json' cannot be read .*Permission denied"):
        _run(setup, out, untrusted="remove")
    assert sorted(p.name for p in out.iterdir()) == before


def test_the_default_fisher_is_a_cached_one_of_another_count_when_only_that_exists(setup, tmp_path, monkeypatch):
    """`fisher --fisher-samples M` then `attribute`: the cached Fisher serves, not hours on a second one."""
    att = Attributor.load(setup["model"], setup["train"], cache_dir=tmp_path / "cache", plan=PLAN,
                          weights="cross-attn", progress=False)
    n5 = 5 * att.prepare().n
    assert att.fisher_samples() == n5  # nothing cached: five epochs
    made = att.fisher(SAMPLES)
    assert att.fisher(SAMPLES + 1) is not None  # two counts cached: the larger serves
    said: list[str] = []
    att._log = said.append
    computed = []
    monkeypatch.setattr(fisher_mod, "fisher_sums", lambda *a, **kw: computed.append(1))
    assert att.fisher_samples() == SAMPLES + 1
    got = att.fisher()
    assert computed == [] and said == [f"fisher: using the cached Fisher of {SAMPLES + 1} samples, not five "
                                       f"epochs ({n5}); --fisher-samples N computes one of N samples"]
    _assert_same(got, att.fisher(SAMPLES + 1))
    assert not torch.equal(got[att.names[0]], made[att.names[0]])
    att.fisher()
    assert len(said) == 1  # said once
    from forgetscore.attribution import UnlearnConfig
    assert att._settings(UnlearnConfig(), None, "max", None, 9)["fisher_samples"] == SAMPLES + 1  # as recorded
    # Another seed, or other weights: not the same Fisher, so not a candidate.
    assert att.fisher_samples(seed=1) == n5
    other = Attributor.load(setup["model"], setup["train"], cache_dir=tmp_path / "cache", plan=PLAN, weights="kv",
                            progress=False)
    assert other.fisher_samples() == 5 * other.prepare().n
    # A damaged file in the cache is passed over.
    (tmp_path / "cache" / "fisher-0000.safetensors").write_bytes(b"junk")
    assert att.fisher_samples() == SAMPLES + 1


def test_a_result_records_the_fisher_it_took_when_a_larger_one_is_cached_meanwhile(setup, tmp_path, monkeypatch):
    from forgetscore.attribution import UnlearnConfig

    att = Attributor.load(setup["model"], setup["train"], cache_dir=tmp_path / "cache", plan=PLAN,
                          weights="cross-attn", progress=False)
    att.fisher(SAMPLES)
    real_run = Attributor._run

    def run_while_another_job_caches_more(self, *a, **kw):
        Attributor.load(setup["model"], setup["train"], cache_dir=tmp_path / "cache", plan=PLAN,
                        weights="cross-attn", progress=False).fisher(SAMPLES + 5)
        return real_run(self, *a, **kw)

    monkeypatch.setattr(Attributor, "_run", run_while_another_job_caches_more)
    result = att.attribute(torch.rand(1, 8, 8) * 2 - 1, "a red dot", config=UnlearnConfig(draws=4, micro_batch=4))
    assert result.metadata["fisher_samples"] == SAMPLES
    assert att.fisher_samples() == SAMPLES + 5  # what a later run takes
