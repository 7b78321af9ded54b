"""The benchmark scripts refuse arguments that mean nothing when they parse them, naming the option.

A zero count, a negative size or seed, an empty, unknown or repeated entry of a comma list would
otherwise crash deep inside a run, or finish it with a meaningless result. Parsed in this process
through each script's build_parser() / parse_args(); two scripts are also run as commands.
"""
import importlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from subprocs import child_env

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))


def script(name: str):
    return importlib.import_module(name)


def parse(name: str, argv: list[str]):
    """The script's arguments as its main() gets them: with the checks across options where it has them."""
    mod = script(name)
    if hasattr(mod, "parse_args"):
        return mod.parse_args(argv)
    return mod.build_parser().parse_args(argv)


def refused(capsys, fn, *args) -> str:
    """fn(*args) must stop as argparse does on a bad argument: exit status 2, one line of error."""
    with pytest.raises(SystemExit) as info:
        fn(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return err.strip().splitlines()[-1]


BAD = [
    ("ink_bias", ["run", "--k", "0"], "--k"),
    ("ink_bias", ["run", "--methods", "pixel,pixel"], "--methods"),
    ("ink_bias", ["run", "--methods", "pixel,nonsense"], "--methods"),
    ("custom_style", ["run", "--methods", " , "], "--methods"),
    ("custom_style", ["run", "--methods", "unlearning,influence,unlearning"], "--methods"),
    ("topk_stability", ["run", "--queries", "0"], "--queries"),
    ("topk_stability", ["run", "--queries", "-3"], "--queries"),
    ("bench_reads", ["--batch", "0"], "--batch"),
    ("bench_reads", ["--repeat", "-1"], "--repeat"),
    ("bench_memory", ["--images", "0"], "--images"),
    ("bench_memory", ["--shard-size", "-4096"], "--shard-size"),
    ("bench_memory", ["--sweep-images", "0"], "--sweep-images"),
    ("bench_memory", ["--timesteps", "1001"], "--timesteps"),
    ("bench_memory", ["--chunk-size", "0"], "--chunk-size"),
    ("bench_memory", ["--threads", "-1"], "--threads"),
    ("precision", ["--precisions", "fp32,fp32,bf16"], "--precisions"),
    ("precision", ["--precisions", "fp32,fp64"], "--precisions"),
    ("precision", ["--precisions", "bf16,fp16"], "--precisions"),  # no fp32 row to compare with
    ("precision", ["--precisions", "fp32,tf32"], "--precisions"),  # tf32 is CUDA only
    ("precision", ["--device", "cuda", "--compile-precisions", ""], "--compile-precisions"),
    ("precision", ["--compile", "default", "--compile-precisions", "tf32"], "--compile-precisions"),
    ("precision", ["--compile", "fastest"], "--compile"),
    ("precision", ["--batch-size", "0"], "--batch-size"),
    ("precision", ["--images", "0"], "--images"),
    ("precision", ["--cpu-check", "-64"], "--cpu-check"),
    ("precision", ["--query-seed", "-1"], "--query-seed"),
    ("precision", ["--query-seed", str(2 ** 64)], "--query-seed"),
    ("bench_sweep", ["--rounds", "-1"], "--rounds"),
    ("bench_sweep", ["--fisher-samples", "-16"], "--fisher-samples"),
    ("bench_sweep", ["--fisher-chunk", "-1"], "--fisher-chunk"),
    ("bench_sweep", ["--fisher-timeout-s", "0"], "--fisher-timeout-s"),
    ("bench_sweep", ["--fisher-batches", "64,512,64"], "--fisher-batches"),
    ("bench_sweep", ["--only", ""], "--only"),
    ("bench_sweep", ["--compile-precisions", "fp32,fp8"], "--compile-precisions"),
    ("bench_sweep", ["--threads", "-2"], "--threads"),
    ("bench_sweep", ["--device", "cpu", "--cudnn-benchmark"], "--cudnn-benchmark"),
    ("bench_kernels", ["--batches", "0,64"], "--batches"),
    ("bench_kernels", ["--batches", "64,,64"], "--batches"),
    ("bench_kernels", ["--fisher-input-dtypes", "float64"], "--fisher-input-dtypes"),
    ("bench_kernels", ["--fisher-input-dtypes", "float32,bfloat16,float32"], "--fisher-input-dtypes"),
    ("bench_kernels", ["--budget-s", "-30"], "--budget-s"),
    ("bench_kernels", ["--budget-s", "nan"], "--budget-s"),
    ("bench_kernels", ["--threads", "-1"], "--threads"),
    ("gpu_check", ["crosscheck", "--max-s", "0"], "--max-s"),
    ("gpu_check", ["crosscheck", "--max-s", "inf"], "--max-s"),
]


@pytest.mark.parametrize("name,argv,option", BAD, ids=[f"{n}:{' '.join(a)}" for n, a, _ in BAD])
def test_a_bad_argument_is_refused_naming_its_option(name, argv, option, capsys):
    line = refused(capsys, parse, name, argv)
    assert f"error: argument {option}: " in line or f"error: {option}: " in line, line


def test_the_messages_say_what_to_give(capsys):
    assert refused(capsys, parse, "bench_sweep", ["--rounds", "-1"]).endswith(
        "argument --rounds: -1 must be >= 1 (or 0 for the default)")
    assert refused(capsys, parse, "bench_memory", ["--timesteps", "0"]).endswith(
        "argument --timesteps: 0 must be in [1, 1000]")
    assert refused(capsys, parse, "bench_reads", ["--batch", "many"]).endswith(
        "argument --batch: 'many' is not an integer; give one >= 1")
    line = refused(capsys, parse, "ink_bias", ["run", "--methods", "pixel,nonsense"])
    assert "'nonsense' unknown; give one or more of unlearning," in line
    line = refused(capsys, parse, "bench_kernels", ["--batches", "64,,64"])
    assert "64 given more than once" in line and "e.g. 64,512" in line
    assert "give a finite number > 0 (or 0 for no limit)" in refused(capsys, parse, "bench_kernels",
                                                                      ["--budget-s", "-30"])


def test_bench_sweep_main_returns_the_status_of_a_refused_argument(capsys):
    assert script("bench_sweep").main(["--device", "cpu", "--rounds", "0x3"]) == 2
    assert "argument --rounds: '0x3' is not an integer" in capsys.readouterr().err


def test_methods_the_run_did_not_score_are_refused_before_loading_it(tmp_path, capsys):
    (tmp_path / "results.json").write_text(json.dumps({"config": {"methods": ["unlearning", "pixel"]}}))
    line = refused(capsys, script("ink_bias").main, [str(tmp_path), "--methods", "pixel,dtrak"])
    assert "error: --methods: the run has no scores of dtrak; choose from unlearning, pixel" in line
    (tmp_path / "results.json").write_text(json.dumps({"methods": ["unlearning", "caption"], "settings": {}}))
    line = refused(capsys, script("custom_style").main, [str(tmp_path)])  # the default names more
    assert "error: --methods: the run has no scores of unlearning-attn, dtrak, influence, pixel" in line


def test_good_arguments_still_parse():
    a = parse("ink_bias", ["run"])
    assert (a.k, a.methods) == (18, None)
    assert parse("ink_bias", ["run", "--k", "1", "--methods", "unlearning, pixel"]).methods == ("unlearning", "pixel")
    assert parse("custom_style", ["run"]).methods == ("unlearning", "unlearning-attn", "dtrak", "influence",
                                                      "caption", "pixel")
    assert parse("topk_stability", ["run", "--queries", "1"]).queries == 1
    a = parse("bench_reads", [])
    assert (a.batch, a.repeat) == (1024, 20)
    a = parse("bench_memory", ["--timesteps", "1000", "--threads", "0", "--images", "1"])
    assert (a.timesteps, a.threads, a.images, a.sweep_images, a.shard_size) == (1000, 0, 1, 20_000, 4096)

    a = parse("precision", [])
    assert (a.precisions, a.compile_precisions, a.batch_size, a.cpu_check, a.images, a.query_seed) == \
        (("fp32", "bf16", "fp16", "mixed"), ("fp32",), 1024, 0, None, 0)
    # the GPU check's row (gpu_check.sh)
    a = parse("precision", ["--device", "cuda", "--precisions", "fp32,tf32,bf16,fp16,mixed", "--batch-size", "auto",
                            "--compile", "reduce-overhead", "--compile-precisions", "bf16,mixed", "--cpu-check", "64",
                            "--query-seed", str(2 ** 64 - 1)])
    assert (a.precisions, a.batch_size, a.compile, a.compile_precisions, a.cpu_check) == \
        (("fp32", "tf32", "bf16", "fp16", "mixed"), "auto", "reduce-overhead", ("bf16", "mixed"), 64)

    # the GPU check's sweep step; 0 still stands for each option's default
    a = parse("bench_sweep", ["--device", "cuda", "--dtype", "bfloat16", "--quick", "--rounds", "3", "--compile",
                              "default", "--sweep-profile", "--cudnn-benchmark", "--fisher-methods", "kv,func",
                              "--fisher-timeout-s", "20", "--batch-rows", "0", "--fisher-chunk", "0"])
    assert (a.rounds, a.compile, a.fisher_methods, a.fisher_timeout_s, a.batch_rows) == \
        (3, ("default",), ("kv", "func"), 20, 0)
    a = parse("bench_sweep", ["--fisher-batches", "64, 512", "--threads", "2"])
    assert (a.fisher_batches, a.threads, a.only, a.rounds) == ((64, 512), 2, ("sweep", "queries", "fisher",
                                                                             "precisions"), 0)

    a = parse("bench_kernels", ["--device", "cuda", "--batches", "2048,8000", "--no-compile", "--budget-s", "0"])
    assert (a.batches, a.budget_s, a.fisher_input_dtypes) == ((2048, 8000), 0.0, None)
    a = parse("bench_kernels", ["--fisher-input-dtypes", "float32,bfloat16,float16", "--budget-s", "175.5"])
    assert (a.fisher_input_dtypes, a.budget_s) == (("float32", "bfloat16", "float16"), 175.5)

    assert parse("gpu_check", ["crosscheck", "--max-s", "10"]).max_s == 10.0
    assert parse("gpu_check", ["crosscheck"]).max_s == 60.0


@pytest.mark.parametrize("argv,option", [(["bench_memory.py", "--images", "0"], "--images"),
                                         (["gpu_check.py", "crosscheck", "--max-s", "-5"], "--max-s")])
def test_run_as_a_command_it_prints_usage_and_one_error(argv, option):
    # Both stay clear of torch when parsing: the check costs no torch import.
    proc = subprocess.run([sys.executable, str(BENCHMARKS / argv[0]), *argv[1:]], capture_output=True, text=True,
                          env=child_env(), cwd=BENCHMARKS.parent, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith("usage: ") and f"error: argument {option}: " in lines[-1], proc.stderr
