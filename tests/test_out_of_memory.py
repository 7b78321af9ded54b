"""Out of GPU memory: the probe that halves, and the error naming the option that sized the failed batch."""
import pytest
import tiny
import torch

from forgetscore import cli
from forgetscore.attribution import Attributor, ScoringPlan, UnlearnConfig
from forgetscore.attribution import memory
from forgetscore.attribution.losses import LossSweep
from forgetscore.attribution.memory import BatchOutOfMemory, largest_fitting, naming_the_batch

PLAN = ScoringPlan(timesteps=(5, 500), flips=True, seed=3)
TORCH_REPORT = ("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 79.19 GiB of which "
                "1.06 GiB is free. Including non-PyTorch memory, this process has 78.12 GiB memory in use. Of the "
                "allocated memory 75.3 GiB is allocated by PyTorch")


class FakeOOM(torch.cuda.OutOfMemoryError):
    pass


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("oom")
    model_dir, train_dir = tiny.build_model(root / "model"), tiny.build_train(root / "train", n=6)
    att = Attributor.load(model_dir, train_dir, cache_dir=root / "cache", plan=PLAN, batch_size=8, progress=False)
    att.prepare()
    return {"root": root, "model_dir": model_dir, "train_dir": train_dir, "att": att}


def _unet_out_of_memory(monkeypatch, unet, error=None):
    def forward(*args, **kwargs):
        raise error or FakeOOM(TORCH_REPORT)

    monkeypatch.setattr(unet, "forward", forward)


def test_back_off_logic():
    sizes = []

    def fits_below(limit):
        def fits(n):
            sizes.append(n)
            if n > limit:
                raise FakeOOM("fake")
        return fits

    assert largest_fitting(fits_below(1000), 4096) == 512 and sizes == [4096, 2048, 1024, 512]
    sizes.clear()
    assert largest_fitting(fits_below(10 ** 6), 3000) == 2048 and sizes == [2048]  # cap: a power of 2
    sizes.clear()
    with pytest.raises(ValueError, match="^batch_size: 'auto' found nothing that fits"):
        largest_fitting(fits_below(0), 8)
    assert sizes == [8, 4, 2, 1]

    def library_oom(n):  # cuBLAS / cuDNN out of memory: a RuntimeError, retried like torch's own
        sizes.append(n)
        if n > 2:
            raise RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`")

    sizes.clear()
    assert largest_fitting(library_oom, 8) == 2 and sizes == [8, 4, 2]

    def named(n):  # a stage's own error inside a probe is still an out-of-memory error: halved too
        sizes.append(n)
        if n > 4:
            with naming_the_batch("batch_size", n, "rows", "the sweep"):
                raise FakeOOM("fake")

    sizes.clear()
    assert largest_fitting(named, 16) == 4 and sizes == [16, 8, 4]

    def broken(n):
        raise RuntimeError("not a memory error")

    with pytest.raises(RuntimeError, match="not a memory error"):  # other errors are not retried
        largest_fitting(broken, 8)
    with pytest.raises(ValueError, match="^cap: "):
        largest_fitting(fits_below(8), 0)


@pytest.mark.parametrize("error", [FakeOOM(TORCH_REPORT), torch.cuda.OutOfMemoryError("CUDA out of memory."),
                                   RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")])
def test_an_out_of_memory_error_names_the_batch_and_a_smaller_size(error):
    with pytest.raises(BatchOutOfMemory) as info:
        with naming_the_batch("fisher_batch_size", 512, "samples", "the Fisher"):
            raise error
    message = str(info.value)
    head = "fisher_batch_size: the Fisher ran out of GPU memory at 512 samples a batch ("
    tail = "); give a smaller one (e.g. 256) or free GPU memory"
    assert message.startswith(head) and message.endswith(tail)
    assert info.value.__cause__ is error
    assert isinstance(info.value, torch.cuda.OutOfMemoryError)  # what callers catching PyTorch's error catch
    detail = message[len(head):-len(tail)]
    assert len(detail) <= 160 and str(error).startswith(detail.removesuffix("..."))


def test_other_errors_pass_unchanged_and_an_inner_name_wins():
    error = RuntimeError("shape mismatch")
    with pytest.raises(RuntimeError) as info:
        with naming_the_batch("batch_size", 64, "rows", "the sweep"):
            raise error
    assert info.value is error
    with pytest.raises(BatchOutOfMemory, match=r"^micro_batch: the unlearning step .* at 1 draws a batch \(.*\); "
                                               r"free GPU memory$"):
        with naming_the_batch("batch_size", 64, "rows", "the sweep"):
            with naming_the_batch("micro_batch", 1, "draws", "the unlearning step"):
                raise FakeOOM("fake")
    assert memory.summary(ValueError()) == "ValueError"


def test_each_stage_names_its_own_batch_option(setup, monkeypatch):
    att = setup["att"]
    query = torch.rand(att.model.input_shape, generator=torch.Generator().manual_seed(0)) * 2 - 1
    _unet_out_of_memory(monkeypatch, att.model.unet)
    with pytest.raises(BatchOutOfMemory, match=r"^batch_size: the sweep ran out of GPU memory at 8 rows a batch "
                                               r"\(CUDA out of memory\. Tried to allocate 2\.00 GiB\..*\.\.\.\); "
                                               r"give a smaller one \(e\.g\. 4\)"):
        LossSweep(att.model, att.prepare(), PLAN, batch_size=8).run([None], progress=False)
    with pytest.raises(BatchOutOfMemory, match=r"^fisher_batch_size: the Fisher ran out of GPU memory at 2 samples"):
        att.fisher(6, batch_size=2)
    with pytest.raises(BatchOutOfMemory, match=r"^micro_batch: the unlearning step ran out of GPU memory at 3 draws"
                                               r".*or free GPU memory \(another size draws other timesteps"):
        att.unlearn(query, "a red square", UnlearnConfig(method="sgd", steps=1, draws=3, micro_batch=4))
    # A failed step leaves the model's weights as they were.
    monkeypatch.undo()
    fresh = Attributor.load(setup["model_dir"], setup["train_dir"], cache_dir=setup["root"] / "fresh", plan=PLAN,
                            batch_size=8, progress=False)
    for name in att.names:
        assert torch.equal(att.model.unet.get_parameter(name), fresh.model.unet.get_parameter(name))


def _errors(capsys) -> list[str]:
    """The error line of a failed command (the stage's progress bar may stand on lines above it)."""
    lines = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in lines if "error" in line]
    assert len(errors) == 1 and lines[-1] == errors[0], lines
    return errors


def test_the_command_line_says_it_in_one_line(setup, monkeypatch, capsys):
    data = ["--model", str(setup["model_dir"]), "--train", str(setup["train_dir"]),
            "--cache", str(setup["root"] / "cli")]
    plan = ["--timesteps", "5,500", "--seed", "3", "--batch-size", "16"]
    assert cli.main(["prepare", *data]) == 0
    capsys.readouterr()

    def out_of_memory(self, *args, **kwargs):
        raise FakeOOM(TORCH_REPORT)

    monkeypatch.setattr(LossSweep, "_forward", out_of_memory)
    assert cli.main(["score", *data, *plan]) == 1
    err = _errors(capsys)
    assert err[0].startswith("forgetscore score: error: --batch-size: the sweep ran out of GPU memory at 16 rows a "
                             "batch (CUDA out of memory.")
    assert err[0].endswith("; give a smaller one (e.g. 8) or free GPU memory")
    # Where no stage names its batch, PyTorch's report is cut to its first words and the options listed.
    monkeypatch.setattr(LossSweep, "run", lambda *a, **k: (_ for _ in ()).throw(FakeOOM(TORCH_REPORT + "\nmore")))
    assert cli.main(["score", *data, *plan]) == 1
    err = _errors(capsys)
    assert err[0].startswith("forgetscore score: error: out of GPU memory (CUDA out of memory. "), err
    assert err[0].endswith("; free GPU memory, or give smaller batches (--batch-size, --fisher-batch-size, "
                           "--micro-batch)")
    # Any other runtime error is not an out-of-memory error and is not dressed as one.
    monkeypatch.setattr(LossSweep, "run", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("a bug")))
    with pytest.raises(RuntimeError, match="^a bug$"):
        cli.main(["score", *data, *plan])
