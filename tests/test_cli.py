"""The command line end to end on a tiny model, and `score` under torchrun."""
import json
import os
import subprocess
import sys

import numpy as np
import torch
import pytest

import tiny
from forgetscore import cli

PLAN_ARGS = ["--timesteps", "5,400,900", "--seed", "2", "--batch-size", "16", "--chunk-size", "4"]


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return tiny.build_model(root / "model"), tiny.build_train(root / "train", n=9), root


def _data(dirs):
    model, train, root = dirs
    return ["--model", str(model), "--train", str(train), "--cache", str(root / "cache")]


def _common(dirs):
    return _data(dirs) + PLAN_ARGS


def test_commands_end_to_end(dirs, capsys, tmp_path):
    common = _common(dirs)
    assert cli.main(["prepare", *_data(dirs)]) == 0
    assert cli.main(["fisher", *_data(dirs), "--fisher-samples", "10"]) == 0
    assert cli.main(["score", *common]) == 0
    out = tmp_path / "result"
    args = ["attribute", *common, "--fisher-samples", "10", "--prompt", "a red square", "--generate-seed", "1",
            "--draws", "8", "--micro-batch", "4", "--damping", "0.1", "--topk", "3", "--region", "0,0,4,8",
            "--n-train", "90", "--out", str(out)]
    assert cli.main(args) == 0
    text = capsys.readouterr().out
    assert "top 3 training images" in text and "time per stage" in text
    rec = json.loads((out / "attribution.json").read_text())
    scores = np.load(out / "scores.npy")
    assert scores.shape == (9,) and [r["id"] for r in rec["top"]] == list(np.argsort(-scores, kind="stable")[:3])
    assert rec["region"] == [0, 0, 4, 8] and rec["unlearn"]["draws"] == 8 and rec["unlearn"]["n_train"] == 90
    assert rec["generated"] == {"seed": 1, "steps": 50, "guidance_scale": 3.0} and rec["query"] is None
    for f in ("gallery.png", "report.html", "query.png", "tau.npy"):
        assert (out / f).stat().st_size > 0
    # Running again into the same directory is refused; report redraws.
    assert cli.main(args) == 2
    assert "out:" in capsys.readouterr().err
    assert cli.main(["report", "--out", str(out), "--topk", "5"]) == 0
    assert "<td>5</td>" in (out / "report.html").read_text()
    # A candidate subset, by file name or position.
    (tmp_path / "subset.txt").write_text("003.png\n5\n")
    sub = tmp_path / "sub"
    assert cli.main([a if a != str(out) else str(sub) for a in args] + ["--subset", str(tmp_path / "subset.txt")]) == 0
    assert "top 2 training images" in capsys.readouterr().out  # --topk 3, two scored
    sub_scores = np.load(sub / "scores.npy")
    assert np.isfinite(sub_scores[[3, 5]]).all() and np.isneginf(np.delete(sub_scores, [3, 5])).all()
    # Scores are differences of fp32 losses near 1, and a subset batches its rows differently: equal to an ulp of
    # the losses (not of the much smaller score).
    np.testing.assert_allclose(sub_scores[[3, 5]], scores[[3, 5]], rtol=1e-6, atol=2e-7)


def test_bad_arguments_exit_with_one_line(dirs, capsys):
    common = _common(dirs)
    assert cli.main(["attribute", *common, "--prompt", "x", "--out", "/tmp/never-written-fs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("forgetscore attribute: error: --query/--generate-seed")
    assert cli.main(["score", *common[:-len(PLAN_ARGS)], "--timesteps", "5,x"]) == 2
    assert "--timesteps" in capsys.readouterr().err
    assert cli.main(["attribute", *common, "--prompt", "x", "--generate-seed", "1", "--n-train", "0",
                     "--out", "/tmp/never-written-fs"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--n-train: 0 must be a positive integer" in err[0], err
    (root := dirs[2] / "a-file").write_bytes(b"")
    for extra, says in ((["--generate-seed", "1", "--out", str(root / "out")], "out: "),
                        (["--generate-seed", "1", "--topk", "0", "--out", "/tmp/never-written-fs"], "--topk: 0"),
                        (["--generate-seed", "-1", "--out", "/tmp/never-written-fs"], "--generate-seed: -1")):
        assert cli.main(["attribute", *common, "--prompt", "x", *extra]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and says in err[0], err
    assert not (root.parent / "never-written-fs").exists()

    if not torch.cuda.is_available():  # CUDA-only settings on a machine without a GPU
        for extra, says in ((["--precision", "tf32"], "error: --precision: 'tf32' is a CUDA"),
                            (["--device", "cuda"], "error: --device: 'cuda' but this PyTorch")):
            assert cli.main(["score", *common, *extra]) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert len(err) == 1 and says in err[0], err


def test_filesystem_errors_are_one_line(monkeypatch, capsys):
    def full_disk(args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "_info", full_disk)
    assert cli.main(["info"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["forgetscore info: error: [Errno 28] No space left on device"]


def test_score_under_torchrun_equals_one_process(dirs, tmp_path):
    model, train, root = dirs
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    common = ["--model", str(model), "--train", str(train)] + PLAN_ARGS
    one = subprocess.run([sys.executable, "-m", "forgetscore", "score", *common, "--cache", str(tmp_path / "a")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "forgetscore", "score", *common, "--cache", str(tmp_path / "b")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("before-unlearning losses") == 1  # only rank 0 reports
    a = [np.load(p) for p in sorted((tmp_path / "a").glob("before-*.npy"))]
    b = [np.load(p) for p in sorted((tmp_path / "b").glob("before-*.npy"))]
    assert len(a) == len(b) == 1
    assert np.array_equal(a[0], b[0])  # bitwise: every chunk is computed the same way on any rank


def test_attribute_under_torchrun_equals_one_process(dirs, tmp_path):
    """The whole method on two ranks: Fisher chunks, the unlearning step (rank 0's, broadcast) and the sweeps."""
    model, train, root = dirs
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    common = ["attribute", "--model", str(model), "--train", str(train), *PLAN_ARGS, "--fisher-samples", "12",
              "--fisher-chunk-size", "4", "--fisher-batch-size", "2", "--prompt", "a red square",
              "--generate-seed", "1", "--draws", "8", "--micro-batch", "4", "--damping", "0.1", "--topk", "3"]
    one = subprocess.run([sys.executable, "-m", "forgetscore", *common, "--cache", str(tmp_path / "a"),
                          "--out", str(tmp_path / "out-a")], env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stderr
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                          "-m", "forgetscore", *common, "--cache", str(tmp_path / "b"), "--out", str(tmp_path / "out-b")],
                         env=env, capture_output=True, text=True, timeout=600)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("top 3 training images") == 1  # only rank 0 reports and writes
    a, b = np.load(tmp_path / "out-a" / "scores.npy"), np.load(tmp_path / "out-b" / "scores.npy")
    assert np.isfinite(a).all() and np.array_equal(a, b)


@pytest.mark.parametrize("command,takes,refuses", [
    ("prepare", ["--resize", "--text-dtype", "bfloat16"], ["--precision", "bf16", "--weights", "all", "--no-flips"]),
    ("fisher", ["--weights", "all", "--no-flips", "--captions", "first"], ["--batch-size", "8", "--timesteps", "5"]),
    ("score", ["--precision", "fp32", "--timesteps", "5", "--no-flips"], ["--weights", "all", "--fisher-samples", "4"]),
])
def test_each_command_takes_only_the_options_it_uses(command, takes, refuses, capsys):
    parser = cli.build_parser()
    data = ["--model", "m", "--train", "t"]
    args = parser.parse_args([command, *data, *takes])
    for i in range(0, len(refuses), 2):
        with pytest.raises(SystemExit):
            parser.parse_args([command, *data, *refuses[i:i + 2]])
        assert f"unrecognized arguments: {refuses[i]}" in capsys.readouterr().err
        sub = parser._subparsers._group_actions[0].choices[command]
        assert refuses[i] not in {flag for action in sub._actions for flag in action.option_strings}
    # The options it does not take keep the defaults the attribute command has.
    full = vars(parser.parse_args(["attribute", *data, "--prompt", "p", "--out", "o"]))
    for key, value in vars(args).items():
        if key in full and f"--{key.replace('_', '-')}" not in takes and key not in ("command", "func"):
            assert value == full[key], key



def test_attribute_a_list_of_queries_in_one_pass(dirs, capsys, tmp_path):
    common = _common(dirs) + ["--fisher-samples", "10", "--draws", "8", "--micro-batch", "4", "--topk", "3"]
    train = dirs[1]
    (tmp_path / "q").mkdir()
    (tmp_path / "q" / "pic.png").write_bytes((train / "003.png").read_bytes())
    queries = tmp_path / "q" / "list.jsonl"  # a relative image path is read from the list's folder
    queries.write_text('{"query": "pic.png", "prompt": "a red square"}\n\n'
                       '{"generate_seed": 1, "prompt": "a red square", "name": "gen"}\n')
    out = tmp_path / "many"
    assert cli.main(["attribute", *common, "--queries", str(queries), "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "pic:" in text and "gen:" in text and text.count("top 3 training images") == 2
    # Each equals the query attributed on its own.
    for name, alone in (("pic", ["--query", str(train / "003.png")]), ("gen", ["--generate-seed", "1"])):
        one = tmp_path / f"one-{name}"
        assert cli.main(["attribute", *common, *alone, "--prompt", "a red square", "--out", str(one)]) == 0
        np.testing.assert_allclose(np.load(out / name / "scores.npy"), np.load(one / "scores.npy"), rtol=1e-6,
                                   atol=1e-9)
        rec, rec1 = (json.loads((d / "attribution.json").read_text()) for d in (out / name, one))
        assert rec.get("generated") == rec1.get("generated") and [r["id"] for r in rec["top"]] == \
            [r["id"] for r in rec1["top"]]
    capsys.readouterr()
    # The list is checked before any work; the single-query options do not mix with it.
    assert cli.main(["attribute", *common, "--queries", str(queries), "--prompt", "x", "--out",
                     str(tmp_path / "x")]) == 2
    assert "--queries: the list gives each query and prompt; drop --prompt" in capsys.readouterr().err
    assert cli.main(["attribute", *common, "--queries", str(queries), "--out", str(out)]) == 2
    assert "already holds results" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # The queries' paths are recorded absolute (the list's are relative to its folder).
    assert json.loads((out / "pic" / "attribution.json").read_text())["query"] == str(tmp_path / "q" / "pic.png")
    # An image the model cannot take is named by its line of the list, before any query is generated.
    from PIL import Image

    Image.fromarray(np.zeros((16, 12), dtype=np.uint8)).save(tmp_path / "q" / "big.png")
    queries.write_text('{"generate_seed": 1, "prompt": "a red square", "name": "gen"}\n'
                       '{"query": "big.png", "prompt": "a red square"}\n')
    assert cli.main(["attribute", *common, "--queries", str(queries), "--out", str(tmp_path / "y")]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("forgetscore attribute: error: --queries: line 2: image ") and "big.png' is 12x16" in err, err


@pytest.mark.parametrize("lines, says", [
    ([], "lists no query"),
    (["{"], "line 1 is not JSON"),
    (['["a.png"]'], "line 1 is a JSON list, not an object"),
    (['{"query": "a.png", "prompt": "p", "seed": 1}'], "line 1 has 'seed'; the keys are query, generate_seed"),
    (['{"query": "a.png"}'], 'line 1 has no "prompt"'),
    (['{"query": "a.png", "prompt": " "}'], 'line 1 has no "prompt"'),
    (['{"query": "a.png", "prompt": ["p"]}'], 'line 1: "prompt" is a list; give the words the picture was made from '
                                              'as one string'),
    (['{"prompt": "p"}'], 'line 1: give exactly one of "query"'),
    (['{"query": "a.png", "generate_seed": 1, "prompt": "p"}'], 'line 1: give exactly one of "query"'),
    (['{"query": "nope.png", "prompt": "p"}'], "nope.png' is not a file"),
    (['{"generate_seed": -1, "prompt": "p"}'], '"generate_seed" -1 must be an int in [0, 2**64)'),
    (['{"generate_seed": true, "prompt": "p"}'], '"generate_seed" True must be an int'),
    (['{"query": "a.png", "prompt": "p", "name": "../up"}'], "the name '../up' cannot be a folder name"),
    (['{"query": "a.png", "prompt": "p"}', '{"generate_seed": 2, "prompt": "q", "name": "a"}'],
     "line 2 has the name 'a' of line 1"),
])
def test_a_bad_query_list_is_named_by_line(tmp_path, lines, says):
    from forgetscore.query_list import read_queries

    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "list.jsonl").write_text("".join(line + "\n" for line in lines))
    with pytest.raises(ValueError) as info:
        read_queries(tmp_path / "list.jsonl")
    assert str(info.value).startswith("--queries: ") and says in str(info.value), str(info.value)
