"""Sweep options: reference (published) noise, prefetch, batch_size="auto", torch.compile."""
import threading
import warnings

import numpy as np
import pytest
import tiny
import torch
import torch.nn.functional as F

from forgetscore import cli
from forgetscore.attribution import Attributor, ScoringPlan
from forgetscore.attribution import losses as losses_mod
from forgetscore.attribution.losses import LossSweep, ReferenceNoise, expand_rows
from forgetscore.attribution.sweep import run_sweep

KEYED = ScoringPlan(timesteps=(5, 500), flips=True, seed=3)
# 9 images give 18 published items (as is, then flipped): batches of 4 items cut the flip boundary
# (batch 2 holds image 8 as is and images 0-2 flipped) and the last batch is short.
REFERENCE = ScoringPlan(timesteps=(5, 500), flips=True, seed=7, noise="reference", reference_batch=4,
                        noise_device="cpu")
BATCH = 4  # every image has >= 4 rows: one image per UNet batch, so orders and subsets agree bitwise


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("options")
    model_dir, train_dir = tiny.build_model(root / "model"), tiny.build_train(root / "train", n=9)
    att = Attributor.load(model_dir, train_dir, cache_dir=root / "cache", plan=KEYED, batch_size=BATCH,
                          progress=False)
    data = att.prepare()
    g = torch.Generator().manual_seed(0)
    name = att.names[0]
    p = att.model.unet.get_parameter(name)
    weights = {name: p.detach() + 0.05 * torch.randn(p.shape, generator=g)}
    return {"root": root, "model_dir": model_dir, "train_dir": train_dir, "att": att, "data": data,
            "weights": weights}


# --------------------------------------------------------------------------- reference noise

def published_loop(model, train, plan: ScoringPlan, images_per_batch: int):
    """Per-(image, version) losses and per-row noise, computed as the published compute_training_loss.py does.

    Its dataset holds every image as is, then every image flipped; a batch of items is expanded to
    items x captions x timesteps, gets noise from torch.randn with a generator seeded seed + batch
    index, the scheduler's add_noise, and a per-row MSE averaged over dims (1, 2, 3). Inputs are read
    from the image files and the captions encoded here, not taken from the prepared cache.
    """
    unet, sched, ts = model.unet, model.scheduler, list(plan.timesteps)
    items = [(i, 0) for i in range(len(train))] + ([(i, 1) for i in range(len(train))] if plan.flips else [])
    sums = np.zeros((len(train), plan.versions))
    counts = np.zeros((len(train), plan.versions))
    noise_of = {}
    with torch.no_grad():
        for batch_id, lo in enumerate(range(0, len(items), images_per_batch)):
            latents, conds, owners = [], [], []
            for i, v in items[lo:lo + images_per_batch]:
                img = train.load_pixels(i, model.image_shape)
                img = img.flip(-1) if v else img
                caps = train.captions[i] if plan.captions == "all" else train.captions[i][:1]
                latents.append(img[None].repeat_interleave(len(caps) * len(ts), dim=0))
                conds.append(model.encode_text(caps).repeat_interleave(len(ts), dim=0))
                owners += [(i, v)] * (len(caps) * len(ts))
            latents, conds = torch.cat(latents), torch.cat(conds)
            timesteps = torch.tensor(ts).repeat(len(owners) // len(ts))
            generator = torch.Generator(device="cpu")
            generator.manual_seed(plan.seed + batch_id)
            noise = torch.randn(latents.shape, generator=generator)
            noisy = sched.add_noise(latents, noise, timesteps)
            pred = unet(noisy, timesteps, conds, return_dict=False)[0]
            target = noise if model.prediction_type == "epsilon" else sched.get_velocity(latents, noise, timesteps)
            loss = F.mse_loss(pred, target, reduction="none").mean(dim=[1, 2, 3])
            for k, (i, v) in enumerate(owners):
                sums[i, v] += float(loss[k])
                counts[i, v] += 1
                noise_of.setdefault((i, v), []).append(noise[k])
    return sums / counts, noise_of


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_reference_noise_equals_the_published_loop(setup, prediction_type, tmp_path):
    if prediction_type == "epsilon":
        att, plan = setup["att"], REFERENCE
    else:  # 4 images, batches of 3 items: batch 1 holds image 3 as is and images 0-1 flipped
        att = Attributor.load(tiny.build_model(tmp_path / "model", prediction_type=prediction_type),
                              tiny.build_train(tmp_path / "train", n=4), cache_dir=tmp_path / "cache", plan=KEYED,
                              progress=False)
        plan = ScoringPlan.from_dict({**REFERENCE.to_dict(), "reference_batch": 3})
    data = att.prepare()
    assert att.model.prediction_type == prediction_type
    want, noise_of = published_loop(att.model, att.train, plan, plan.reference_batch)
    # UNet batches of 7 rows: unlike the published batches, so only rounding may differ.
    got = LossSweep(att.model, data, plan, batch_size=7).run([None], progress=False)[0]
    np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-8)
    if prediction_type == "epsilon":
        keyed = LossSweep(att.model, data, KEYED, batch_size=7).run([None], progress=False)[0]
        assert not np.allclose(keyed, want, rtol=1e-3)  # the published noise is not the keyed one

    # The noise itself, row by row, bitwise.
    ids = np.arange(data.n)
    _, counts = data.text(ids, plan.captions)
    rows = expand_rows(ids, counts, plan)
    noise = ReferenceNoise(plan, data, att.model.device).rows(
        rows.sample_id.numpy(), rows.version.numpy(), rows.caption.numpy(), rows.step.numpy())
    for i in ids:
        for v in range(2):
            sel = ((rows.sample_id == i) & (rows.version == v)).nonzero()[:, 0]
            torch.testing.assert_close(noise[sel], torch.stack(noise_of[(int(i), v)]), rtol=0, atol=0)


def test_reference_noise_does_not_depend_on_subsets_orders_or_chunks(setup, tmp_path):
    data, model, w = setup["data"], setup["att"].model, setup["weights"]
    full = LossSweep(model, data, REFERENCE, batch_size=BATCH).run([None, w], progress=False)
    order = np.array([8, 2, 5, 0])
    fresh = LossSweep(model, data, REFERENCE, batch_size=BATCH)  # nothing made yet: batches made from scratch
    np.testing.assert_array_equal(fresh.run([None, w], order, progress=False), full[:, order])
    chunked = run_sweep(LossSweep(model, data, REFERENCE, batch_size=BATCH), [None, w], tmp_path / "sweep",
                        chunk_size=2, progress=False)  # chunks of 2 images cut the published batches of 4 items
    np.testing.assert_array_equal(chunked, full)
    # A directory made under keyed noise is refused: the plan, noise mode included, is its identity.
    run_sweep(LossSweep(model, data, KEYED, batch_size=BATCH), [None], tmp_path / "keyed", progress=False)
    with pytest.raises(ValueError, match="cache: .*plan"):
        run_sweep(LossSweep(model, data, REFERENCE, batch_size=BATCH), [None], tmp_path / "keyed", progress=False)


def test_reference_noise_is_part_of_the_plan_identity():
    assert "noise" not in KEYED.to_dict()  # keyed plans keep the dicts (and cache keys) they always had
    assert ScoringPlan.from_dict(REFERENCE.to_dict()) == REFERENCE
    other_batch = ScoringPlan.from_dict({**REFERENCE.to_dict(), "reference_batch": 5})
    other_device = ScoringPlan.from_dict({**REFERENCE.to_dict(), "noise_device": "cuda"})
    keyed = ScoringPlan.from_dict({k: v for k, v in REFERENCE.to_dict().items()
                                   if k not in ("noise", "reference_batch", "noise_device")})
    prints = {p.fingerprint() for p in (REFERENCE, other_batch, other_device, keyed)}
    assert len(prints) == 4
    assert ScoringPlan(noise="reference", reference_batch=80).noise_device == "cuda"  # as published
    for kw, name in [({"noise": "philox"}, "noise"), ({"noise": "reference"}, "reference_batch"),
                     ({"noise": "reference", "reference_batch": 0}, "reference_batch"),
                     ({"noise": "reference", "reference_batch": 2, "noise_device": "tpu"}, "noise_device"),
                     ({"reference_batch": 4}, "reference_batch"), ({"noise_device": "cpu"}, "noise_device")]:
        with pytest.raises(ValueError, match=f"^{name}: "):
            ScoringPlan(**kw)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error where there is no GPU")
def test_cuda_reference_noise_without_a_gpu_is_refused(setup):
    plan = ScoringPlan(timesteps=(5, 500), noise="reference", reference_batch=4)
    with pytest.raises(ValueError, match="^noise_device: 'cuda' .*noise_device='cpu'"):
        LossSweep(setup["att"].model, setup["data"], plan)


# --------------------------------------------------------------------------- prefetch

@pytest.mark.parametrize("plan", [KEYED, REFERENCE], ids=["keyed", "reference"])
def test_prefetch_overlaps_loading_and_changes_nothing(setup, plan, monkeypatch):
    data, model, w = setup["data"], setup["att"].model, setup["weights"]
    plain = LossSweep(model, data, plan, batch_size=BATCH, prefetch=False)
    ahead = LossSweep(model, data, plan, batch_size=BATCH)
    assert ahead.prefetch
    batches = ahead.image_batches(np.arange(data.n))
    assert len(batches) == 9
    threads = {"plain": [], "ahead": []}
    second_loaded = threading.Event()
    waited = []

    def watch(sweep, key):
        load, compute = sweep._load, sweep._compute

        def logged_load(ids):
            threads[key].append(threading.current_thread().name)
            out = load(ids)
            if key == "ahead" and list(ids) == list(batches[1]):
                second_loaded.set()
            return out

        def held_compute(batch, variants):
            if key == "ahead" and not waited:  # batch 0 computes only once batch 1 was loaded beside it
                waited.append(second_loaded.wait(timeout=60))
            return compute(batch, variants)

        monkeypatch.setattr(sweep, "_load", logged_load)
        monkeypatch.setattr(sweep, "_compute", held_compute)

    watch(plain, "plain")
    watch(ahead, "ahead")
    want = plain.run([w], progress=False)
    got = ahead.run([w], progress=False)
    np.testing.assert_array_equal(got, want)
    assert waited == [True]
    assert threads["plain"] == [threading.current_thread().name] * 9
    assert len(threads["ahead"]) == 9 and all(t.startswith("forgetscore-prefetch") for t in threads["ahead"])


def test_a_failed_load_in_the_prefetch_thread_reaches_the_caller(setup, monkeypatch):
    data = setup["data"]
    sweep = LossSweep(setup["att"].model, data, KEYED, batch_size=BATCH)
    read, calls = data.inputs, []

    def failing(ids):
        calls.append(list(ids))
        if len(calls) == 3:
            raise OSError("disk gone")
        return read(ids)

    monkeypatch.setattr(data, "inputs", failing)
    with pytest.raises(OSError, match="disk gone"):
        sweep.run([None], progress=False)
    assert len(calls) == 3  # nothing was loaded after the failure
    assert not [t for t in threading.enumerate() if t.name.startswith("forgetscore-prefetch")]


def test_prefetch_thread_pins_on_the_sweeps_own_gpu(monkeypatch):
    """A new thread's current CUDA device is cuda:0; the prefetch thread first moves to the sweep's."""
    from forgetscore.attribution.losses import _thread_device

    assert _thread_device(torch.device("cpu")) is None
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 5)
    _thread_device(torch.device("cuda", 2))()
    _thread_device(torch.device("cuda"))()  # no index: the launching thread's current device
    assert chosen == [2, 5]


def test_image_batches_are_the_greedy_split(setup):
    sweep = LossSweep(setup["att"].model, setup["data"], KEYED, batch_size=13)
    ids = np.array([4, 0, 7, 1, 8, 2, 3, 6, 5])
    caps = [setup["data"].n_captions(int(i)) for i in ids]
    want, cur, rows = [], [], 0  # the obvious loop: add an image while the batch stays within 13 rows
    for i, c in zip(ids, caps):
        r = 2 * c * 2
        if cur and rows + r > 13:
            want.append(cur)
            cur, rows = [], 0
        cur.append(int(i))
        rows += r
    want.append(cur)
    assert [list(b) for b in sweep.image_batches(ids)] == want


# --------------------------------------------------------------------------- batch_size="auto"

class FakeOOM(torch.cuda.OutOfMemoryError):
    pass


def test_auto_batch_size_on_the_cpu_is_the_fixed_default(setup, monkeypatch):
    model = setup["att"].model

    def no_forward(*a, **kw):
        raise AssertionError("the CPU default is not probed")

    monkeypatch.setattr(model.unet, "forward", no_forward)
    assert LossSweep(model, setup["data"], KEYED, batch_size="auto").batch_size == losses_mod.AUTO_BATCH_CPU == 256
    att = Attributor(model, setup["att"].train, plan=KEYED, cache_dir=setup["root"] / "cache", progress=False)
    assert att.batch_size_probed  # "auto" is the default
    assert att.batch_size == 256 and att.sweep().batch_size == 256
    for bad in ("big", 0, True, 2.0):
        with pytest.raises(ValueError, match="^batch_size: "):
            LossSweep(model, setup["data"], KEYED, batch_size=bad)
        with pytest.raises(ValueError, match="^batch_size: "):
            Attributor(model, setup["att"].train, plan=KEYED, batch_size=bad, cache_dir=setup["root"] / "cache")


def test_probe_halves_on_out_of_memory(setup, monkeypatch):
    model = setup["att"].model
    real, tried = model.unet.forward, []

    def forward(x, t, encoder_hidden_states, cross_attention_kwargs=None, return_dict=True):
        rows = cross_attention_kwargs["text_index"]
        tried.append((x.shape[0], tuple(x.shape[1:]), tuple(encoder_hidden_states.shape), tuple(rows.shape)))
        if x.shape[0] > 24:
            raise FakeOOM("CUDA out of memory (fake)")
        return real(x, t, encoder_hidden_states=encoder_hidden_states, cross_attention_kwargs=cross_attention_kwargs,
                    return_dict=return_dict)

    monkeypatch.setattr(model.unet, "forward", forward)
    assert losses_mod.probe_batch_size(model, cap=100) == 16
    # called as the sweep calls the UNet: one caption's states, every row pointing at it
    text_shape = tuple(setup["data"].text([0], "first")[0].shape[1:])
    assert tried == [(n, model.input_shape, (1, *text_shape), (n,)) for n in (64, 32, 16)]
    tried.clear()
    assert losses_mod.probe_batch_size(model, "bf16", cap=16) == 16 and len(tried) == 1
    with pytest.raises(ValueError, match="^precision: "):
        losses_mod.probe_batch_size(model, "fp8")


def _fp32_math_flags():
    # Every getter, old and new: none may raise (torch.compile's autotuning reads the old ones).
    conv, matmul = torch.backends.cudnn, torch.backends.cuda.matmul
    newer = tuple(getattr(o, "fp32_precision", None) for o in (conv, getattr(conv, "conv", None), matmul))
    return (conv.allow_tf32, matmul.allow_tf32, torch.get_float32_matmul_precision()), newer


@pytest.mark.filterwarnings("ignore:CUDA is not available")  # autocast on "cuda" in a CPU-only build
@pytest.mark.parametrize("precision,tf32", [("fp32", False), ("tf32", True), ("bf16", False)])
def test_cuda_float32_math_follows_the_precision_and_is_restored(precision, tf32):
    # PyTorch runs cuDNN convolutions in TF32 by default; the sweep's "fp32" must not.
    before = _fp32_math_flags()
    with losses_mod.unet_precision(torch.device("cuda"), precision):
        legacy, newer = _fp32_math_flags()
        assert legacy == (tf32, tf32, "high" if tf32 else "highest")
        if hasattr(torch.backends.cuda.matmul, "fp32_precision"):  # the newer settings agree
            assert newer[2] == ("tf32" if tf32 else "ieee") and newer[1] in (("tf32" if tf32 else "ieee"), "none")
    assert _fp32_math_flags()[0] == before[0]
    with pytest.raises(RuntimeError, match="boom"), losses_mod.unet_precision(torch.device("cuda"), "fp32"):
        raise RuntimeError("boom")
    assert _fp32_math_flags()[0] == before[0]


def test_cpu_precisions_leave_cuda_flags_alone_and_autocast_the_unet():
    before = _fp32_math_flags()
    with losses_mod.unet_precision(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
        assert _fp32_math_flags() == before
    with losses_mod.unet_precision(torch.device("cpu"), "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    assert not torch.is_autocast_enabled("cpu")


def test_tf32_needs_cuda(setup):
    model = setup["att"].model
    with pytest.raises(ValueError, match=r"^precision: 'tf32' is a CUDA .* use fp32, bf16, fp16 or mixed there"):
        LossSweep(model, setup["data"], KEYED, precision="tf32")
    with pytest.raises(ValueError, match=r"^precision: 'tf32' is a CUDA"):
        Attributor(model, setup["att"].train, plan=KEYED, precision="tf32", cache_dir=setup["root"] / "cache")
    with pytest.raises(ValueError, match=r"^precision: 'fp8' is not one of"):
        Attributor(model, setup["att"].train, plan=KEYED, precision="fp8", cache_dir=setup["root"] / "cache")


def test_auto_precision_is_the_measured_default_of_each_device(setup):
    model = setup["att"].model
    assert Attributor(model, setup["att"].train, plan=KEYED, cache_dir=setup["root"] / "cache").precision == "fp32"
    assert LossSweep(model, setup["data"], KEYED, precision="auto").precision == "fp32"
    # The resolution needs no GPU: only the device's type.
    assert losses_mod.resolve_precision("auto", torch.device("cuda")) == "tf32"
    assert losses_mod.resolve_precision("bf16", torch.device("cuda")) == "bf16"
    with pytest.raises(ValueError, match=r"^precision: 'tf32' is a CUDA"):
        losses_mod.resolve_precision("tf32", torch.device("cpu"))


# --------------------------------------------------------------------------- torch.compile

def test_compile_runs_the_unet_through_torch_compile_with_one_static_shape(setup):
    data, model, w = setup["data"], setup["att"].model, setup["weights"]
    graphs = []

    def counting_backend(gm, example_inputs):  # dynamo's graph, run as it is (no inductor: too slow here)
        graphs.append([tuple(t.shape) for t in example_inputs if isinstance(t, torch.Tensor)])
        return gm.forward

    rows = 12  # images have 4-12 rows: most calls are padded up to 12
    eager = LossSweep(model, data, KEYED, batch_size=rows).run([None, w], progress=False)
    compiled = LossSweep(model, data, KEYED, batch_size=rows, compile="default", compile_backend=counting_backend)
    got = compiled.run([None, w], progress=False)
    np.testing.assert_allclose(got, eager, rtol=1e-6, atol=1e-9)
    assert len(graphs) == 1 and (rows, *model.input_shape) in graphs[0]  # one graph, for the padded shape
    assert compiled.compile == "default"
    assert losses_mod.compile_mode("auto", torch.device("cuda")) == "max-autotune"
    assert losses_mod.compile_mode("auto", torch.device("cpu")) == "default"
    assert losses_mod.compile_mode(None, torch.device("cpu")) is None
    with pytest.raises(ValueError, match="^compile: "):
        LossSweep(model, data, KEYED, compile="fastest")
    att = Attributor(model, setup["att"].train, plan=KEYED, compile="auto", prefetch=False,
                     cache_dir=setup["root"] / "cache", progress=False)
    assert (att.compile, att.prefetch) == ("default", False)


# --------------------------------------------------------------------------- command line

def test_command_line_options_reach_the_attributor():
    parser = cli.build_parser()
    base = ["--model", "m", "--train", "t"]
    args = parser.parse_args(["score", *base])
    assert (args.batch_size, args.compile, args.no_prefetch, args.noise) == ("auto", None, False, "keyed")
    assert cli._plan(args) == ScoringPlan.with_stride(50)
    args = parser.parse_args(["attribute", *base, "--prompt", "p", "--out", "o", "--batch-size", "auto",
                              "--compile", "--no-prefetch", "--noise", "reference", "--reference-batch", "80",
                              "--noise-device", "cpu", "--timestep-stride", "100"])
    assert (args.batch_size, args.compile, args.no_prefetch) == ("auto", "auto", True)
    assert cli._plan(args) == ScoringPlan.with_stride(100, noise="reference", reference_batch=80, noise_device="cpu")
    assert parser.parse_args(["score", *base, "--compile", "reduce-overhead"]).compile == "reduce-overhead"
    assert parser.parse_args(["score", *base, "--batch-size", "64"]).batch_size == 64
    for bad in ("0", "many"):
        with pytest.raises(SystemExit):
            parser.parse_args(["score", *base, "--batch-size", bad])


@pytest.mark.parametrize("native", [True, False, None])
def test_half_precisions_the_cpu_runs_slowly_are_warned_of(native, monkeypatch):
    from forgetscore.attribution.losses import resolve_precision

    monkeypatch.setattr(losses_mod, "cpu_has_bf16", lambda: native)
    with pytest.warns(UserWarning, match=r"^precision: fp16 on the CPU runs several times slower than fp32 \(few "
                                         r"CPU kernels take float16\)" + ("; bf16 is the CPU's fast" if native else "$")):
        assert resolve_precision("fp16", torch.device("cpu")) == "fp16"
    for precision in ("bf16", "mixed"):
        if native is False:
            with pytest.warns(UserWarning, match=rf"^precision: {precision} runs slower than fp32 on this CPU, which "
                                                 r"has no bfloat16 instructions .*; use fp32 here"):
                assert resolve_precision(precision, torch.device("cpu")) == precision
        else:  # with them, or when the CPU cannot tell
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                assert resolve_precision(precision, torch.device("cpu")) == precision
    with warnings.catch_warnings():  # never on a GPU, whatever the CPU
        warnings.simplefilter("error")
        assert resolve_precision("bf16", torch.device("cuda")) == "bf16"


@pytest.mark.parametrize("text,native", [
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512_bf16 amx_tile\n\nprocessor\t: 1\n", True),
    ("processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\nbugs\t\t: spectre_v1\n", False),
    ("processor\t: 0\nFeatures\t: fp asimd bf16 i8mm\n", True),
    ("processor\t: 0\nFeatures\t: fp asimd evtstrm\n", False),
    ("processor\t: 0\nmodel name\t: something\n", None),
])
def test_bfloat16_instructions_are_read_from_the_cpu_flags(tmp_path, text, native):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert losses_mod.cpu_has_bf16.__wrapped__(str(path)) is native
    assert losses_mod.cpu_has_bf16.__wrapped__(str(tmp_path / "missing")) is None
