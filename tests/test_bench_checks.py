"""The benchmark scripts' behaviour around their measurements: the GPU check's steps and exit status, the
arithmetic every compared path runs in, what a bad input or a cut-short run leaves, and the records."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from subprocs import child_env

REPO = Path(__file__).resolve().parents[1]
BENCHMARKS = REPO / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import _common  # noqa: E402

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks what happens without a CUDA device")


def exits_2(capsys, fn, *args) -> str:
    """fn(*args) stops with status 2 (raised or returned) and one line on stderr, no traceback; that line."""
    try:
        rc = fn(*args)
    except SystemExit as exc:
        rc = exc.code
    assert rc == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


# --------------------------------------------------------------------------- gpu_check.sh

FAKE_PYTHON = """#!/usr/bin/env bash
# Records its arguments; pretends the sweep benchmark ran, fails `forgetscore info`, runs the rest for real.
printf '%s\\n' "$*" >> "$CALLS"
case "$*" in
  *bench_sweep.py*) exit 0 ;;
  "-m forgetscore info") echo "self-test FAIL (simulated)"; exit 3 ;;
esac
exec "$REAL_PYTHON" "$@"
"""


def gpu_check(tmp_path: Path, **env) -> tuple[subprocess.CompletedProcess, Path, str]:
    fake = tmp_path / "python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    out, calls = tmp_path / "out", tmp_path / "calls.txt"
    run_env = {**child_env(), "OUT": str(out), "PYTHON": str(fake), "REAL_PYTHON": sys.executable,
               "CALLS": str(calls), **env}
    for name in ("GPU_CHECK_DEVICE", "GPU_CHECK_DTYPE"):
        if env.get(name) is None:
            run_env.pop(name, None)
    proc = subprocess.run(["bash", str(BENCHMARKS / "gpu_check.sh")], capture_output=True, text=True, env=run_env,
                          timeout=300)
    return proc, out, calls.read_text() if calls.exists() else ""


@no_cuda
def test_the_rehearsal_exits_1_on_a_failed_step_after_its_summary_and_skips_what_it_cannot_check(tmp_path):
    proc, out, calls = gpu_check(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STEPS="info,sweep,crosscheck")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "GPU CHECK SUMMARY" in proc.stdout
    assert proc.stdout.rstrip().splitlines()[-1] == "gpu_check: failed or timed out: info (rc 3)"
    # bf16 on a CPU without bfloat16 instructions is emulated: minutes per call, past the step's cap.
    sweep = next(line for line in calls.splitlines() if "bench_sweep.py" in line)
    assert "--dtype float32" in sweep and "bfloat16" not in sweep
    steps = {line.split("\t")[0]: line.split("\t") for line in (out / "gpu_check_steps.tsv").read_text().splitlines()}
    assert steps["crosscheck"][1] == "skipped" and steps["crosscheck"][3].startswith("no CUDA device, nothing checked")
    assert steps["info"][1] == "3" and steps["sweep"][1] == "0"
    assert "torch sees no CUDA device" not in proc.stdout  # the hint is for a CUDA check without a GPU
    summary = proc.stdout.split("GPU CHECK SUMMARY", 1)[1]
    assert "crosscheck   skipped" in summary and "FAILED (rc 3)" in summary


@no_cuda
def test_a_cuda_check_without_a_gpu_says_to_rehearse_and_keeps_bf16_for_cuda(tmp_path):
    proc, _, calls = gpu_check(tmp_path, GPU_CHECK_STEPS="sweep")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    first = proc.stdout.split("=== [")[0]
    assert "torch sees no CUDA device" in first and "GPU_CHECK_DEVICE=cpu" in first
    assert "--dtype bfloat16" in next(line for line in calls.splitlines() if "bench_sweep.py" in line)


def test_the_sweep_dtype_can_be_set_and_is_checked(tmp_path):
    proc, _, calls = gpu_check(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_STEPS="sweep", GPU_CHECK_DTYPE="bfloat16")
    assert proc.returncode == 0 and "--dtype bfloat16" in calls
    proc, _, _ = gpu_check(tmp_path, GPU_CHECK_DEVICE="cpu", GPU_CHECK_DTYPE="fp16")
    assert proc.returncode == 2 and "GPU_CHECK_DTYPE: 'fp16' must be float32 or bfloat16" in proc.stderr


@no_cuda
def test_crosscheck_without_cuda_exits_as_skipped(capsys):
    import gpu_check

    assert gpu_check.main(["crosscheck", "--max-s", "5"]) == gpu_check.SKIPPED == 77
    assert capsys.readouterr().out.strip().endswith("skipped: no CUDA device, nothing checked")


def test_the_summary_gives_fisher_rows_in_samples_per_second(tmp_path, capsys):
    import gpu_check

    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"meta": {}, "rows": [
        {"part": "4 fisher", "method": "compute_fisher: hooks + kernel, K/V weights", "median_s": 29.8,
         "rows_per_s": 0.1342},
        {"part": "4 fisher", "method": "torch.func vmap(grad) per-sample, all weights", "median_s": 0.187,
         "rows_per_s": 342.4},
        {"part": "2 published", "method": "LossSweep.run (bfloat16)", "median_s": 0.5, "rows_per_s": 32000.0}]}))
    gpu_check._summary_sweep(str(path))
    lines = capsys.readouterr().out.splitlines()
    assert lines[-3].endswith("29.800s  0.134 samples/s")
    assert lines[-2].endswith("0.187s  342 samples/s")
    assert lines[-1].endswith("0.500s  32000 rows/s")


def test_the_summary_takes_no_reference_row_for_the_best_kernel(tmp_path, capsys):
    import gpu_check

    rows = [{"latent": "4x16x16", "batch": 64, "method": "eager", "total_ms": 2.0},
            {"latent": "4x16x16", "batch": 64, "method": "kernels auto (=torch)", "total_ms": 0.5},
            {"latent": "4x16x16", "batch": 64, "method": "kernels cpu", "total_ms": 1.0}]
    (tmp_path / "bench_gpu.json").write_text(json.dumps({"meta": {"device": "cpu"}, "noise_loss": rows}))
    gpu_check.main(["summary", str(tmp_path)])
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.lstrip().startswith("4x16x16"))
    assert "kernels cpu" in line and "2.00x" in line


# --------------------------------------------------------------------------- bench_sweep: one arithmetic

def test_every_path_the_sweep_is_compared_with_runs_in_the_sweeps_math(tmp_path, monkeypatch):
    import contextlib

    import bench_sweep
    import tiny
    from forgetscore.attribution import DiffusionModel, losses
    from forgetscore.attribution.dattri import ArrayData

    model = DiffusionModel.load(tiny.build_model(tmp_path / "model"))
    g = np.random.default_rng(0)
    n, caps = 2, bench_sweep.CAPTIONS
    text = g.standard_normal((n * caps, 8, 16), dtype=np.float32)
    data = ArrayData(g.standard_normal((n, 2, *model.input_shape), dtype=np.float32), text,
                     np.arange(n + 1, dtype=np.int64) * caps, model.encoders_id())
    running, entered = [None], []
    real = losses.unet_precision

    @contextlib.contextmanager
    def recording(device, precision):
        entered.append((running[0], precision))
        with real(device, precision):
            yield

    def call_each_once(fns, sync, rounds, log, **kw):
        out = {}
        for name, fn in fns.items():
            running[0] = name
            fn()
            out[name] = {"median_s": 1.0, "min_s": 1.0, "max_s": 1.0, "rounds": 1, "warm_up_s": 1.0}
        return out

    monkeypatch.setattr(losses, "unet_precision", recording)
    monkeypatch.setattr(bench_sweep, "time_interleaved", call_each_once)
    args = argparse.Namespace(dtype="float32", compile=(), compile_precisions=(), cudnn_benchmark=False,
                              sweep_profile=False)
    sizes = dict(batch_rows=20, part12_images=1, published_images=2, timesteps=2, rounds=1, warm_all=False)
    rows = []
    bench_sweep.bench_sweep_parts(args, model, data, sizes, rows.append, lambda msg: None)
    # The published loop runs at PyTorch's defaults, as published: under the sweep's math it would be timed slower
    # (IEEE convolutions) or faster (bf16) than its authors ran it.
    assert {name for name, _ in entered} == {"bare", "bare_shared", "sweep_flips", "sweep_noflip"}
    assert {p for _, p in entered} == {"fp32"}
    assert any(r.get("method") == "ratio sweep / bare" for r in rows)


# --------------------------------------------------------------------------- bench_kernels: the reference's cap

def test_auto_resolving_to_the_reference_keeps_its_size_cap(monkeypatch):
    import bench_kernels
    from forgetscore.kernels import dispatch, reference

    monkeypatch.setattr(bench_kernels, "kernel_backends", lambda dev: [("kernels auto (=torch)", "auto")])
    monkeypatch.setattr(dispatch, "resolve", lambda backend, device: reference)
    args = bench_kernels.build_parser().parse_args(["--quick", "--batches", "64", "--no-raw"])
    r = bench_kernels.Runner(args, torch.device("cpu"))
    timed = []

    def fake_group(fns):
        timed.extend(fns)
        return {name: {"median_s": 1e-3} for name in fns}

    monkeypatch.setattr(r, "time_group", fake_group)
    rows = []
    bench_kernels.bench_noise_loss(r, lambda section, row: rows.append(row), *bench_kernels.make_scheduler())
    auto = {row["latent"]: row for row in rows if row["method"] == "kernels auto (=torch)"}
    cap = bench_kernels.REFERENCE_MAX_NUMEL["cpu"]
    assert auto["4x64x64"]["numel"] > cap and auto["4x64x64"]["skipped"].startswith("reference backend above")
    assert auto["4x16x16"]["numel"] <= cap and "skipped" not in auto["4x16x16"]
    assert sum(name.startswith("kernels auto") for name in timed) == 2  # noise and loss of the small shape only


# --------------------------------------------------------------------------- --json, checked first

@pytest.mark.parametrize("name,argv", [("bench_kernels", []), ("bench_sweep", []), ("bench_memory", []),
                                       ("precision", []), ("topk_stability", ["run"])])
def test_a_json_path_in_a_missing_folder_is_refused_when_parsing(name, argv, tmp_path, capsys):
    import importlib

    mod = importlib.import_module(name)
    parse = getattr(mod, "parse_args", None) or mod.build_parser().parse_args
    line = exits_2(capsys, parse, [*argv, "--json", str(tmp_path / "missing" / "x.json")])
    assert "argument --json: " in line and "does not exist; create it first" in line
    line = exits_2(capsys, parse, [*argv, "--json", str(tmp_path)])
    assert "argument --json: " in line and "is a folder" in line
    assert parse([*argv, "--json", str(tmp_path / "x.json")]).json == str(tmp_path / "x.json")


def test_the_report_comes_before_a_record_that_cannot_be_written(tmp_path, capsys):
    folder = tmp_path / "gone"
    folder.mkdir()
    res = _common.Results(str(folder / "out.json"), {}, rows=[])
    res.run_steps([("a", lambda: res["rows"].append(1))])
    shutil.rmtree(folder)  # e.g. removed while the benchmark ran
    assert res.finish(time.perf_counter(), lambda r: f"REPORT {len(r['rows'])} rows") == 1
    out, err = capsys.readouterr()
    assert "REPORT 1 rows" in out and "--json: could not write" in err


# --------------------------------------------------------------------------- bench_memory

@pytest.mark.parametrize("n", [1, 3, 7, 600, 999, 1000])
def test_spread_timesteps_gives_exactly_n(n):
    ts = _common.spread_timesteps(n)
    assert len(ts) == len(set(ts)) == n and ts[0] == 0 and ts[-1] < 1000 and list(ts) == sorted(ts)


def test_the_memory_sweep_plans_exactly_the_timesteps_asked_for(tmp_path):
    import bench_memory

    bench_memory.write_store(tmp_path / "store", 8, 4)
    args = bench_memory.build_parser().parse_args(["--child", "sweep", "--store", str(tmp_path / "store"),
                                                   "--sweep-images", "4", "--timesteps", "3", "--threads", "1"])
    info = bench_memory.child(args)
    assert info["timesteps"] == 3 and info["rows"] == 4 * 2 * 3 and info["finite"]


def test_a_kept_store_says_where_it_is(tmp_path, capsys, monkeypatch):
    import bench_memory

    def fake_run(cmd, **kw):
        name = cmd[cmd.index("--child") + 1]
        info = {"seconds": 0.1, "shards": 1, "bytes": 1000} if name == "write" else {
            "images": 1, "shards_read": 1, "seconds": 0.1, "peak_rss": 2000, "rss_before_open": 1000,
            "stride": 1, "rows": 2, "block": 1}
        return subprocess.CompletedProcess(cmd, 0, json.dumps(info) + "\n", "")

    monkeypatch.setattr(bench_memory.subprocess, "run", fake_run)
    monkeypatch.setattr(bench_memory.tempfile, "mkdtemp", lambda prefix: str(tmp_path / "made"))
    out_json = tmp_path / "mem.json"
    assert bench_memory.main(["--images", "8", "--keep", "--json", str(out_json)]) == 0
    store = str((tmp_path / "made" / "store").resolve())
    out = capsys.readouterr().out
    assert f"store kept in {store}" in out and (tmp_path / "made").is_dir()
    assert json.loads(out_json.read_text())["meta"]["store_dir"] == store


# --------------------------------------------------------------------------- the checkout first

FAKE_PACKAGE = "raise ImportError('another copy of forgetscore was imported, not the checkout')\n"


@pytest.mark.parametrize("script,argv", [("precision.py", ["--help"]), ("custom_style.py", ["--help"]),
                                         ("ink_bias.py", ["--help"]), ("bench_reads.py", ["--cache", "nowhere"]),
                                         ("topk_stability.py", ["nowhere"])])
def test_the_scripts_import_the_checkout_before_another_copy(script, argv, tmp_path):
    other = tmp_path / "site" / "forgetscore"
    other.mkdir(parents=True)
    (other / "__init__.py").write_text(FAKE_PACKAGE)
    env = {**child_env(), "PYTHONPATH": str(tmp_path / "site")}  # ahead of site-packages, as an install would be
    proc = subprocess.run([sys.executable, str(BENCHMARKS / script), *argv], capture_output=True, text=True,
                          env=env, cwd=tmp_path, timeout=120)
    assert "another copy" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert proc.returncode in (0, 2)


# --------------------------------------------------------------------------- bad input: one line, status 2

@no_cuda
def test_precision_refuses_cuda_without_a_gpu_before_any_work(capsys, monkeypatch):
    import precision
    from forgetscore.digits import train

    monkeypatch.setattr(train, "ensure_model", lambda **kw: pytest.fail("trained a model first"))
    line = exits_2(capsys, precision.main, ["--device", "cuda"])
    assert line == "--device cuda: no CUDA device here; use --device cpu"
    assert "--device: 'gpu' is not a device" in exits_2(capsys, precision.parse_args, ["--device", "gpu"])


@pytest.mark.parametrize("script", ["ink_bias", "custom_style", "topk_stability"])
def test_the_analyses_refuse_a_missing_folder(script, tmp_path, capsys):
    import importlib

    line = exits_2(capsys, importlib.import_module(script).main, [str(tmp_path / "nowhere")])
    assert "is not a folder; give the output folder of" in line


def test_the_analyses_name_the_kind_of_run_they_read(tmp_path, capsys):
    import custom_style
    import ink_bias
    import topk_stability

    (tmp_path / "results.json").write_text(json.dumps({"settings": {}, "methods": ["pixel"], "concepts": {}}))
    line = exits_2(capsys, ink_bias.main, [str(tmp_path)])
    assert "is an `evaluate custom` run; this script reads an `evaluate loo` run" in line
    line = exits_2(capsys, topk_stability.main, [str(tmp_path)])
    assert "is an `evaluate custom` run; this script reads an `evaluate loo` run" in line
    (tmp_path / "results.json").write_text(json.dumps({"config": {"methods": ["pixel"]}}))
    line = exits_2(capsys, custom_style.main, [str(tmp_path)])
    assert "is an `evaluate loo` run; this script reads an `evaluate custom` run" in line
    line = exits_2(capsys, ink_bias.main, [str(tmp_path)])  # a loo run without its queries and scores
    assert "queries.pt" in line and "pixel.npy" in line and line.endswith("as it left it")
    (tmp_path / "results.json").unlink()
    assert "holds no results.json" in exits_2(capsys, custom_style.main, [str(tmp_path)])


def test_bench_reads_refuses_an_unprepared_cache(tmp_path, capsys):
    import bench_reads

    line = exits_2(capsys, bench_reads.main, ["--cache", str(tmp_path)])
    assert line.startswith("--cache: ") and "holds no prepared data" in line


def test_every_option_says_what_it_is():
    import bench_reads
    import precision

    for parser, options in ((bench_reads.build_parser(), ("--batch", "--repeat")),
                            (precision.build_parser(), ("--device", "--json"))):
        helps = {opt: a.help for a in parser._actions for opt in a.option_strings}
        assert all(helps[o] for o in options), helps


# --------------------------------------------------------------------------- custom_style: a copied run

def custom_run(root: Path) -> Path:
    from PIL import Image

    from forgetscore.attribution.data import TrainingSet

    concept = root / "concepts" / "ink"
    pool = concept / "pool"
    pool.mkdir(parents=True)
    lines = []
    for i, word in enumerate(["three", "one", "three", "one", "two"]):
        Image.fromarray(np.full((8, 8), 40 * i, dtype=np.uint8)).save(pool / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "text": [f"a <new1> {word}"], "exemplar": i >= 2}))
    (pool / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    torch.save({"images": torch.zeros(1, 1, 8, 8)}, concept / "queries.pt")
    (concept / "scores").mkdir()
    np.save(concept / "scores" / "pixel.npy", np.array([[0.1, 0.2, 0.9, 0.3, 0.5]]))
    (concept / "scores" / "pixel.json").write_text(json.dumps({"pool": TrainingSet.load(pool).identity()}))
    (root / "results.json").write_text(json.dumps({
        "settings": {"pool_captions": "fine-tuning"}, "methods": ["pixel"],
        "concepts": {"ink": {"kind": "style", "prompts": ["a <new1> handwritten three"]}}}))
    return root


def test_a_copied_custom_run_is_told_apart_from_a_scored_one(tmp_path, capsys, monkeypatch):
    import custom_style

    class Classifier:
        def predict(self, images):
            return torch.full((len(images),), 3)

    monkeypatch.setattr(custom_style, "get_classifier", lambda size: Classifier())
    run = custom_run(tmp_path / "run")
    custom_style.main([str(run), "--methods", "pixel"])
    assert "1 / 2 / 0.4" in capsys.readouterr().out  # exemplar rank / others' median rank / top-10 share
    copy = tmp_path / "copy"
    shutil.copytree(run, copy, copy_function=shutil.copy)  # as cp -r: new modification times
    later = time.time() + 5
    for f in (copy / "concepts" / "ink" / "pool").iterdir():
        os.utime(f, (later, later))
    custom_style.main([str(copy), "--methods", "pixel"])
    out = capsys.readouterr().out
    assert "pixel            no scores of this pool" in out
    assert "copied or touched" in out and "cp -a" in out and "evaluate custom again" in out


# --------------------------------------------------------------------------- topk_stability

def loo_run(root: Path) -> Path:
    from forgetscore.evaluation.retrain import RetrainJob

    (root / "retrains" / RetrainJob((), True).key).mkdir(parents=True)
    (root / "train").mkdir()
    specs = [{"prompt": f"a {w}", "seed": 0, "label": i} for i, w in enumerate(["seven", "one"])]
    torch.save({"specs": specs, "images": torch.zeros(2, 1, 8, 8)}, root / "queries.pt")
    plan = {"timesteps": [0, 100, 200, 300, 400, 500, 600, 700, 800, 900], "captions": "all", "flips": False,
            "seed": 3, "version": 1}
    (root / "trainer.json").write_text(json.dumps({"coupled": True, "plan": plan}))
    (root / "scores").mkdir()
    settings = ("Unlearning(name='unlearning', weights='kv', config=UnlearnConfig(steps=1, alpha=0.02, draws=40, "
                "micro_batch=20, damping=0.0, n_train=None, method='newton', seed=5), match_newton_length=False)")
    (root / "scores" / "unlearning.json").write_text(json.dumps({"settings": settings, "plan": plan}))
    return root


def test_topk_stability_varies_the_runs_own_settings_and_keeps_each_variant_as_it_finishes(tmp_path, capsys,
                                                                                         monkeypatch):
    import topk_stability

    run = loo_run(tmp_path / "run")
    seen = []

    def score(model_dir, train_dir, cache, pairs, plan, config):
        if len(seen) == 3:
            raise KeyboardInterrupt  # cut short during the fourth variant
        seen.append((plan, config))
        g = np.random.default_rng(len(seen))
        return g.random((len(pairs), 60))

    monkeypatch.setattr(topk_stability, "score", score)
    out = tmp_path / "topk.json"
    with pytest.raises(KeyboardInterrupt):
        topk_stability.main([str(run), "--queries", "2", "--json", str(out)])
    plan, config = seen[0]
    assert list(plan.timesteps) == list(range(0, 1000, 100)) and plan.seed == 3 and not plan.flips
    assert (config.draws, config.seed, config.alpha, config.micro_batch) == (40, 5, 0.02, 20)
    assert seen[1][1].seed == 6 and seen[2][0].seed == 4
    printed = capsys.readouterr().out
    assert "gradient seed 6  top-9   overlap with the default" in printed and "plan seed 4" in printed
    record = json.loads(out.read_text())
    assert list(record["variants"]) == ["default", "gradient seed 6", "plan seed 4"]
    assert len(record["variants"]["plan seed 4"]["overlap"]["top-18"]) == 2
    assert record["meta"]["plan"]["seed"] == 3 and not list(tmp_path.glob("*.tmp"))


def test_the_denser_plan_has_four_times_the_timesteps():
    from forgetscore.attribution.plan import ScoringPlan

    import topk_stability

    assert topk_stability.denser(ScoringPlan.with_stride(200, flips=False)).timesteps == tuple(range(0, 1000, 50))
    odd = topk_stability.denser(ScoringPlan(timesteps=(10, 50, 90), flips=False))
    assert odd.timesteps == (10, 20, 30, 40, 50, 60, 70, 80, 90) and not odd.flips


# --------------------------------------------------------------------------- bench_reads, precision: the figures

def test_bench_reads_interleaves_its_rounds_and_takes_medians():
    import bench_reads

    calls, now = [], [0.0]
    durations = {"loop": iter([5, 5, 1, 500, 1]), "ours": iter([5, 2, 2, 200, 2])}

    def fn(name):
        def call():
            calls.append(name)
            now[0] += next(durations[name])
        return call

    us = bench_reads.interleaved_us({"loop": fn("loop"), "ours": fn("ours")}, n_images=2, repeat=4,
                                    clock=lambda: now[0])
    assert calls == ["loop", "ours", "loop", "ours", "ours", "loop", "loop", "ours", "ours", "loop"]
    assert us == {"loop": pytest.approx(3 / 2 * 1e6), "ours": pytest.approx(2 / 2 * 1e6)}


def test_precision_says_when_a_top_k_overlap_is_one_by_construction():
    import precision

    row = {"precision": "bf16", "seconds": 1.0, "warmup_s": 1.0, "rows_per_s": 10.0, "speedup": 1.0,
           "spearman": 0.5, "top10": 1.0, "top100": 1.0}
    text = precision.report({"meta": {"images": 16}, "rows": [row]})
    assert "top-100: 16 images" in text and "top-10 " not in text.splitlines()[-1]
    text = precision.report({"meta": {"images": 8}, "rows": [row]})
    assert "top-10 and top-100: 8 images" in text and "k >= number of images" in text
    assert "k >= number of images" not in precision.report({"meta": {"images": 1797}, "rows": [row]})
