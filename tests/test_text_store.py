"""Caption states stored in float16 or bfloat16: the rounded states, and under the matching autocast
precision the very losses of a float32 store."""
import numpy as np
import pytest
import tiny
import torch

from conftest import fresh_seed
from forgetscore import cli
from forgetscore.attribution import Attributor, DiffusionModel, ScoringPlan, TrainingSet, prepare
from forgetscore.attribution.losses import LossSweep

PLAN = ScoringPlan(timesteps=(3, 400, 999), captions="all", flips=True, seed=4)
HALF = {"float16": torch.float16, "bfloat16": torch.bfloat16}


@pytest.fixture(scope="module")
def stores(tmp_path_factory):
    root = tmp_path_factory.mktemp("text-store")
    model = DiffusionModel.load(tiny.build_model(root / "model"))
    train = TrainingSet.load(tiny.build_train(root / "train", n=7))
    kw = dict(shard_size=3, batch_size=2, progress=False)
    return model, {d: prepare(model, train, root / d, text_dtype=d, **kw) for d in ("float32", *HALF)}


def _weights(model, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in model.unet.named_parameters():
        if ".attn2.to_k." in name or ".attn2.to_v." in name:
            out[name] = p.detach() + 0.02 * torch.randn(p.shape, generator=g)
    return out


@pytest.mark.parametrize("dtype", list(HALF))
def test_half_width_store_holds_the_rounded_states(stores, dtype):
    _, data = stores
    ids = np.random.default_rng(fresh_seed("data")).permutation(7)[:5]
    full, counts = data["float32"].text(ids, "all")
    stored, half_counts = data[dtype].text(ids, "all", stored=True)
    assert counts == half_counts and stored.dtype == HALF[dtype] and full.dtype == torch.float32
    assert torch.equal(stored, full.to(HALF[dtype]))  # round to nearest even, as a cast does
    read, _ = data[dtype].text(ids, "all")
    assert read.dtype == torch.float32 and torch.equal(read, stored.float())
    assert float((read - full).abs().max()) > 0  # the store did round
    sizes = {d: sum(f.stat().st_size for f in data[d].dir.glob("text-*.npy")) for d in data}
    assert sizes[dtype] < 0.55 * sizes["float32"]
    # the store's dtype is part of the data identity, so caches of losses never mix stores
    assert data[dtype].data_id == data["float32"].data_id + f"+{dtype}"


@pytest.mark.parametrize("dtype, precision", [("bfloat16", "bf16"), ("float16", "fp16")])
def test_matching_precision_gives_the_float32_stores_losses(stores, dtype, precision):
    model, data = stores
    variants = [None, _weights(model, fresh_seed("weights"))]
    want = LossSweep(model, data["float32"], PLAN, batch_size=16, precision=precision).run(variants, progress=False)
    got = LossSweep(model, data[dtype], PLAN, batch_size=16, precision=precision).run(variants, progress=False)
    assert np.array_equal(got, want)
    # in float32 the rounded states are a (slightly) different input
    fp32 = LossSweep(model, data["float32"], PLAN, batch_size=16).run(variants, progress=False)
    rounded = LossSweep(model, data[dtype], PLAN, batch_size=16).run(variants, progress=False)
    assert not np.array_equal(rounded, fp32)
    np.testing.assert_allclose(rounded, fp32, rtol=0.05)


def test_attributor_keeps_each_store_in_its_own_folder(tmp_path):
    model_dir, train_dir = tiny.build_model(tmp_path / "model"), tiny.build_train(tmp_path / "train", n=4)
    args = cli.build_parser().parse_args(["prepare", "--model", str(model_dir), "--train", str(train_dir),
                                          "--cache", str(tmp_path / "c"), "--text-dtype", "bfloat16"])
    att = cli._attributor(args)
    data = att.prepare()
    assert data.dir == tmp_path / "c" / "prepared-bfloat16" and data.text_dtype == "bfloat16"
    plain = Attributor.load(model_dir, train_dir, cache_dir=tmp_path / "c", progress=False).prepare()
    assert plain.dir == tmp_path / "c" / "prepared" and plain.data_id != data.data_id
    with pytest.raises(ValueError, match=r"^text_dtype: 'int8' is not one of"):
        Attributor.load(model_dir, train_dir, cache_dir=tmp_path / "c", text_dtype="int8")
    with pytest.raises(ValueError, match=r"^text_dtype: 'float64' is not one of"):
        prepare(att.model, att.train, tmp_path / "x", text_dtype="float64")
    assert not (tmp_path / "x").exists()
