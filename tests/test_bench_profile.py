"""The benchmarks' profile breakdown: kinds of kernels by name, the device's busy time, one profiled call."""
import random
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from _profile import busy_seconds, kernel_kind, kinds_note, kinds_table, profile_kinds  # noqa: E402


@pytest.mark.parametrize("name,kind", [
    # cuDNN and cuBLAS kernels as they are named on Hopper GPUs
    ("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc_tilesize128x128x64", "convolution"),
    ("nvjet_tst_128x256_64x4_1x2_h_bz_coopA_NNT", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("void pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits<32, 128, 128, 4>>", "attention"),
    ("fmha_cutlassF_bf16_aligned_64x64_rf_sm80", "attention"),
    # torch.compile's kernels: named after what they fuse, a bias of a convolution included
    ("triton_poi_fused_add_convolution_silu_12", "fused pointwise"),
    ("triton_red_fused_native_group_norm_3", "normalization"),
    ("triton_tem_fused_mm_7", "matmul"),
    # ours, Triton and CUDA
    ("_noise_kernel", "ours: noise, loss"),
    ("void forgetscore::loss_partial_kernel<c10::BFloat16, float>", "ours: noise, loss"),
    ("Memcpy HtoD (Pinned -> Device)", "copies"),
    ("void cudnn::ops::nchwToNhwcKernel<__nv_bfloat16, __nv_bfloat16, float, false, true>", "copies"),
    ("void at::native::vectorized_elementwise_kernel<4, at::native::CUDAFunctor_add<float>>", "pointwise and other"),
    # CPU ops
    ("aten::mkldnn_convolution", "convolution"),
    ("aten::addmm", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::native_group_norm", "normalization"),
])
def test_kernel_kinds_from_names(name, kind):
    assert kernel_kind(name) == kind


def test_busy_time_is_the_union_of_the_intervals():
    rng = random.Random()
    for _ in range(50):
        intervals = []
        for _ in range(rng.randrange(0, 30)):
            lo = rng.randrange(0, 200)
            intervals.append((lo, lo + rng.randrange(0, 40)))
        covered = {t for lo, hi in intervals for t in range(lo, hi)}  # unit cells: an independent count
        assert busy_seconds(intervals) == len(covered)


def test_one_profiled_call_on_the_cpu_sums_its_ops_by_kind():
    conv = torch.nn.Conv2d(4, 8, 3, padding=1)
    x = torch.randn(2, 4, 16, 16)

    def run():
        with torch.no_grad():
            torch.nn.functional.group_norm(conv(x), 2).flatten(1) @ torch.randn(8 * 256, 5)

    info = profile_kinds(run, lambda: None, torch.device("cpu"))
    assert info["busy_s"] is None and info["wall_s"] > 0
    assert {"convolution", "matmul", "normalization"} <= set(info["kinds"])
    assert all(seconds >= 0 for seconds in info["kinds"].values())
    # The top list holds the ops with the most time, each with its kind.
    assert info["top"] and all(kernel_kind(name) == kind for name, kind, _, _ in info["top"])
    assert [row[2] for row in info["top"]] == sorted((row[2] for row in info["top"]), reverse=True)
    assert kinds_note(info, 1.0).startswith("CPU self time: ")
    assert "convolution" in kinds_table(info)


def test_the_note_gives_the_device_busy_share_and_the_largest_kinds():
    info = {"kinds": {"convolution": 0.6, "matmul": 0.3, "copies": 0.1}, "busy_s": 0.9, "wall_s": 1.4, "top": []}
    assert kinds_note(info, 1.2) == "device busy 75% of the median call; convolution 60%, matmul 30%, copies 10%"
