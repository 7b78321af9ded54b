"""The command line's own checks: bad arguments fail before any work or write, and its help holds true."""
import argparse
import os
import re
import shlex
import tempfile

import pytest

from forgetscore import __version__, cli


def _parsers(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_help_examples_parse():
    parser = cli.build_parser()
    examples = []
    for p in _parsers(parser):
        p.allow_abbrev = False  # an example must spell each option out
        examples += re.findall(r"forgetscore [^`\n]*", p.epilog or "")
    assert len(set(examples)) >= 10
    for line in examples:
        try:
            parser.parse_args(shlex.split(line, comments=True)[1:])
        except SystemExit:
            pytest.fail(f"a help example does not parse: {line}")


def test_every_option_has_help():
    for p in _parsers(cli.build_parser()):
        bare = [a.option_strings[0] for a in p._actions if a.option_strings and not a.help]
        assert not bare, f"{p.prog}: {bare} have no help text"
    loo = next(p for p in _parsers(cli.build_parser()) if p.prog.endswith("evaluate loo"))
    assert "minutes on a CPU" in loo.format_help()  # --quick promises no exact time


def test_version(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["--version"])
    assert stop.value.code == 0 and capsys.readouterr().out.strip() == f"forgetscore {__version__}"


def test_info_shows_the_cache(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "elsewhere"))
    assert cli.main(["info", "--no-self-test"]) == 0
    assert re.search(rf"^cache +{re.escape(str(tmp_path / 'elsewhere'))}", capsys.readouterr().out, re.M)


@pytest.mark.parametrize("native,said", [(True, "yes"), (False, "no: bf16 and mixed precisions are emulated here"),
                                         (None, "unknown")])
def test_info_says_whether_the_cpu_computes_in_bfloat16(monkeypatch, capsys, native, said):
    from forgetscore.attribution import losses

    monkeypatch.setattr(losses, "cpu_has_bf16", lambda: native)
    assert cli.main(["info", "--no-self-test"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("cpu "))
    assert re.fullmatch(rf"cpu +\w+, {os.cpu_count()} cores; bfloat16 instructions: {re.escape(said)}.*", line)


@pytest.fixture
def no_work(monkeypatch):
    """The long stages of demo and evaluate fail the test if they are reached."""
    def work(*args, **kwargs):
        raise AssertionError("the work started before the arguments were checked")

    import forgetscore.digits.data
    import forgetscore.digits.train
    import forgetscore.evaluation.custom
    import forgetscore.evaluation.loo
    for module, name in ((forgetscore.digits.train, "ensure_model"), (forgetscore.digits.train, "train"),
                         (forgetscore.digits.data, "write_image_folder"), (forgetscore.evaluation.loo, "run_loo"),
                         (forgetscore.evaluation.custom, "run_custom")):
        monkeypatch.setattr(module, name, work)


def _fails(capsys, argv, says: str) -> None:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"error: {says}" in err[0], err


@pytest.mark.parametrize("extra, says", [
    (["--query-seed", "-1"], "--query-seed: -1 "),
    (["--query-seed", str(2 ** 64)], f"--query-seed: {2 ** 64} "),
    (["--prompt", ""], "--prompt: '' "),
    (["--prompt", " \t"], "--prompt: ' \\t' "),
    (["--topk", "0"], "--topk: 0 "),
    (["--topk", "1798"], "--topk: 1798 is more than the 1797 training images; give at most 1797"),
    (["--prompt", "a red handwritten seven"], "--prompt: 'red' not in the digits model's vocabulary"),
    (["--prompt", "a Fancy, thin seven!"], "--prompt: 'fancy', ',', '!' not in"),
    (["--prompt", "a " * 14 + "seven"], "--prompt: 15 words; the digits model reads at most 14"),
])
def test_bad_demo_arguments_fail_before_any_write(no_work, tmp_path, capsys, extra, says):
    _fails(capsys, ["demo", "--out", str(tmp_path / "d1"), *extra], says)
    assert not (tmp_path / "d1").exists()


def test_demo_checks_the_cache_root_before_training(no_work, tmp_path, capsys, monkeypatch):
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("FORGETSCORE_CACHE", str(tmp_path / "a-file"))
    _fails(capsys, ["demo", "--out", str(tmp_path / "d")], f"FORGETSCORE_CACHE: {str(tmp_path / 'a-file')!r} "
                                                           "cannot be a folder")
    assert not (tmp_path / "d").exists()


def test_demo_does_not_replace_model_or_train_folders_unasked(no_work, tmp_path, capsys):
    for name in ("model", "train"):
        (tmp_path / "d" / name).mkdir(parents=True)
        (tmp_path / "d" / name / "mine.txt").write_text("kept")
    _fails(capsys, ["demo", "--out", str(tmp_path / "d")], f"--out: {str(tmp_path / 'd')!r} already holds model/ "
                                                           "and train/, which the demo would replace; choose a new "
                                                           "directory, or pass --overwrite")
    assert [p.read_text() for p in sorted((tmp_path / "d").rglob("mine.txt"))] == ["kept", "kept"]


def test_the_demo_counts_the_one_digit_its_prompt_names():
    from forgetscore.demo import prompted_digit

    assert prompted_digit("a thin handwritten seven") == (7, "seven")
    assert prompted_digit("a Six") == (6, "six")
    assert prompted_digit("a one nine") is None and prompted_digit("a thick digit") is None
    assert prompted_digit("a seven like a seven") == (7, "seven")


@pytest.mark.parametrize("extra, says", [
    (["--recipe", "nope"], "--recipe: unknown 'nope'"),
    (["--methods", ","], "--methods: none given; choose from"),
    (["--ks", "0"], "--ks: '0'"),
    (["--ks", "9,1797"], "--ks: '9,1797'"),
    (["--random-sets", "0"], "--random-sets: 0 "),
])
def test_bad_loo_arguments_fail_before_any_write(no_work, tmp_path, capsys, extra, says):
    _fails(capsys, ["evaluate", "loo", "--out", str(tmp_path / "e8"), *extra], says)
    assert not (tmp_path / "e8").exists()


@pytest.mark.parametrize("extra, says", [
    (["loo", "--ks", "9,18,9"], "argument --ks: '9,18,9' names 9 twice; give each once"),
    (["loo", "--methods", "pixel, random,pixel"], "argument --methods: 'pixel, random,pixel' names pixel twice"),
    (["custom", "--methods", "pixel,pixel"], "argument --methods: 'pixel,pixel' names pixel twice"),
])
def test_a_list_option_refuses_a_repeated_item(tmp_path, capsys, extra, says):
    with pytest.raises(SystemExit) as stop:
        cli.main(["evaluate", extra[0], "--out", str(tmp_path / "e"), *extra[1:]])
    assert stop.value.code == 2 and f"error: {says}" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


@pytest.mark.parametrize("prompt", ["", "   "])
def test_attribute_refuses_a_blank_prompt(tmp_path, capsys, prompt):
    _fails(capsys, ["attribute", "--model", "m", "--train", "t", "--generate-seed", "1", "--prompt", prompt,
                    "--out", str(tmp_path / "r")], f"--prompt: {prompt!r} ")
    assert not (tmp_path / "r").exists()


COMMANDS = [["attribute", "--model", "m", "--train", "t", "--prompt", "x", "--generate-seed", "1", "--out"],
            ["demo", "--out"], ["report", "--out"], ["evaluate", "loo", "--out"], ["evaluate", "custom", "--out"],
            ["score", "--model", "m", "--train", "t", "--cache"]]


@pytest.mark.parametrize("command", COMMANDS, ids=["attribute", "demo", "report", "loo", "custom", "score-cache"])
def test_output_folders_are_checked_first(no_work, monkeypatch, tmp_path, capsys, command):
    (tmp_path / "a-file").write_bytes(b"")
    # report's --out is a result to read and redraw: a file there is taken for one of its files.
    reads = command[0] == "report"
    _fails(capsys, [*command, str(tmp_path / "a-file")], f"{command[-1]}: {str(tmp_path / 'a-file')!r} "
                                                          + ("is a file; give the folder that holds it" if reads
                                                             else "cannot be"))
    # A folder that refuses files whatever its permission bits say (as some filesystems do, and to a superuser).
    locked = tmp_path / "locked"
    locked.mkdir()
    mkstemp = tempfile.mkstemp

    def refuse(*args, dir=None, **kwargs):
        if dir is not None and str(dir) == str(locked):
            raise PermissionError(13, "Permission denied")
        return mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    _fails(capsys, [*command, str(locked if reads else locked / "out")], f"{command[-1]}: {str(locked)!r} cannot be "
                                                                         "written to (Permission denied)")
    assert list(locked.iterdir()) == []
    # An empty path would put the results in the working directory unasked.
    monkeypatch.chdir(tmp_path)
    for empty in ("", " "):
        _fails(capsys, [*command, empty], f"{command[-1]}: the path is empty; give a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "locked"]


@pytest.mark.skipif(not os.access("/proc", os.W_OK), reason="needs a /proc whose permission bits let this user in")
def test_a_folder_on_a_filesystem_that_takes_no_files_is_named_so():
    from forgetscore.attribution.io import check_writable

    with pytest.raises(ValueError, match=r"^--out: '/proc' cannot be written to \(its filesystem takes no new "
                                         r"files\); choose another path"):
        check_writable("/proc/forgetscore-out", "--out")


def test_an_error_starts_its_own_line_after_a_progress_bar(monkeypatch, capsys):
    from tqdm.auto import tqdm

    def stage(args):
        bar = tqdm(total=10, desc="stage")  # left open, as a stage that fails midway leaves its bar
        bar.update(3)
        raise ValueError("--x: bad")

    monkeypatch.setattr(cli, "_info", stage)
    assert cli.main(["info"]) == 2
    err = capsys.readouterr().err
    assert "3/10" in err and err.endswith("\nforgetscore info: error: --x: bad\n"), repr(err)


def test_library_errors_name_the_command_line_flag(tmp_path, capsys):
    import tiny

    model, train = tiny.build_model(tmp_path / "model"), tiny.build_train(tmp_path / "train", n=4)
    capsys.readouterr()  # what building them printed
    common = ["--model", str(model), "--train", str(train), "--cache", str(tmp_path / "cache")]
    _fails(capsys, ["score", *common, "--timestep-stride", "0"], "--timestep-stride: 0 must be")
    _fails(capsys, ["score", *common, "--timestep-stride", "0", "--timesteps", "5,9"],
           "--timesteps: give either the timesteps or --timestep-stride, not both")
    _fails(capsys, ["fisher", *common, "--fisher-samples", "0"], "--fisher-samples: 0 must be")
    assert not (tmp_path / "cache").exists()  # refused before the training set was prepared
    _fails(capsys, ["attribute", *common, "--query", str(train / "000.png"), "--prompt", "a red dot", "--out",
                    str(tmp_path / "r"), "--steps", "0"], "--steps: 0 must be")
    # A name that is no option of the command stays as the library wrote it.
    assert cli._as_flag("chunk_id: 3 is missing", cli.build_parser(), ["score"]) == "chunk_id: 3 is missing"
    assert cli._as_flag("indices: empty", cli.build_parser(), ["attribute"]) == "--subset: empty"


def test_a_subset_says_how_many_of_its_lines_repeat_an_image(tmp_path, capsys):
    (tmp_path / "s.txt").write_text("b.png\nb.png\n1\n0\n")
    ids = cli._subset(str(tmp_path / "s.txt"), ["a.png", "b.png", "c.png"])
    assert sorted(set(ids.tolist())) == [0, 1]
    assert "2 of its 4 lines name an image listed before; 2 images are scored" in capsys.readouterr().err
    (tmp_path / "t.txt").write_text("c.png\n0\n")
    cli._subset(str(tmp_path / "t.txt"), ["a.png", "b.png", "c.png"])
    assert capsys.readouterr().err == ""
    # Names as metadata.jsonl takes them ("./" and backslash folders), comment lines, and a "#" file name.
    names = ["a.png", "sub/b.png", "#c.png"]
    (tmp_path / "u.txt").write_text("# the top of a cheaper ranking\n./sub/b.png\nsub\\b.png\n#c.png\n")
    assert cli._subset(str(tmp_path / "u.txt"), names).tolist() == [1, 1, 2]
    assert "1 of its 3 lines name an image listed before; 2 images are scored" in capsys.readouterr().err
    (tmp_path / "v.txt").write_text("a.png\n./a.png\n")
    cli._subset(str(tmp_path / "v.txt"), names)
    assert "1 of its 2 lines name an image listed before; 1 image is scored" in capsys.readouterr().err


def test_a_timestep_stride_spans_the_models_own_train_timesteps(tmp_path):
    (tmp_path / "m" / "scheduler").mkdir(parents=True)
    (tmp_path / "m" / "scheduler" / "scheduler_config.json").write_text('{"num_train_timesteps": 500}')
    args = cli.build_parser().parse_args(["score", "--model", str(tmp_path / "m"), "--train", "t",
                                          "--timestep-stride", "100"])
    assert cli._plan(args).timesteps == (0, 100, 200, 300, 400)
    args.model = str(tmp_path / "nothing")  # unreadable: the usual 1000 (loading the model then says why)
    assert cli._plan(args).timesteps == tuple(range(0, 1000, 100))


def test_the_packages_own_warnings_are_one_line(monkeypatch, capsys):
    import warnings

    import forgetscore.attribution.losses as losses

    def info(args):
        warnings.simplefilter("always")
        warnings.warn_explicit("precision: bf16 runs slower here; use fp32", UserWarning, losses.__file__, 10)
        warnings.warn_explicit("another library's advice", UserWarning, "/elsewhere/lib.py", 3)
        return 0

    monkeypatch.setattr(cli, "_info", info)
    with pytest.warns(UserWarning) as caught:  # what reaches the warnings machinery as it was
        shown = warnings.showwarning
        assert cli.main(["info"]) == 0
        assert warnings.showwarning is shown  # restored after the command
    assert capsys.readouterr().err == "forgetscore info: warning: precision: bf16 runs slower here; use fp32\n"
    assert [str(w.message) for w in caught] == ["another library's advice"]  # shown as Python shows it
