"""The CPU's TF32 emulation (benchmarks/precision.py): rounding to a 10-bit mantissa, against float64."""
import sys
from pathlib import Path

import numpy as np
import torch

from conftest import fresh_seed

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from precision import emulated_tf32, tf32_round  # noqa: E402


def _tf32_float64(x: np.ndarray) -> np.ndarray:
    """Nearest value with 10 mantissa bits, ties away from zero, computed in float64."""
    m, e = np.frexp(x.astype(np.float64))  # x = m * 2**e, 0.5 <= |m| < 1: 11 significant bits = m * 2**11
    scaled = m * 2.0 ** 11
    return np.ldexp(np.sign(scaled) * np.floor(np.abs(scaled) + 0.5), e - 11)


def test_tf32_round_against_float64():
    g = np.random.default_rng(fresh_seed("data"))
    x = (g.standard_normal(20000) * np.exp(g.uniform(-20, 20, 20000))).astype(np.float32)
    x[:4] = [0.0, -0.0, 1.0 + 2.0 ** -11, -(1.0 + 3 * 2.0 ** -11)]  # ties: away from zero
    got = tf32_round(torch.from_numpy(x)).numpy()
    np.testing.assert_array_equal(got.astype(np.float64), _tf32_float64(x))
    assert got[2] == 1.0 + 2.0 ** -10 and got[3] == -(1.0 + 2.0 ** -9)
    assert torch.equal(tf32_round(torch.ones(3, dtype=torch.bfloat16)), torch.ones(3, dtype=torch.bfloat16))


def test_emulation_rounds_the_inputs_of_linear_layers_and_is_undone():
    g = torch.Generator().manual_seed(fresh_seed("weights"))
    lin = torch.nn.Linear(64, 8)
    x = torch.randn(5, 64, generator=g)
    with emulated_tf32():
        got = lin(x)
    want = torch.nn.functional.linear(tf32_round(x), tf32_round(lin.weight), lin.bias)
    assert torch.equal(got, want) and not torch.equal(lin(x), want)
