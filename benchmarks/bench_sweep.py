#!/usr/bin/env python
"""Time the scoring sweep and the Fisher on the MSCOCO-scale UNet against plain PyTorch.

The UNet is built from the configuration of the paper's MSCOCO model (block channels
128/256/256/256, 2 layers per block, 4x16x16 latents, cross-attention dim 1024) with
random weights; the text states are random 77x1024 tensors and the prepared set is
synthetic and in memory. Speed does not depend on what the weights are.

Four comparisons, each side by side in one run:

1. Sweep overhead: ``LossSweep.run([None], ids)`` against bare UNet forwards of the same
   rows in the same batch size, inputs made in advance: called as the sweep calls the UNet
   (each caption's cross-attention keys and values once, ``text_kv``; the overhead ratio)
   and called plainly, every row with its own caption states.
2. The published way: a plain loop as the reference implementation writes it (fp32,
   ``torch.randn`` noise from a generator seeded with seed + batch index,
   ``scheduler.add_noise``, ``F.mse_loss(reduction="none").mean(dim=(1, 2, 3))``, batches
   laid out images x captions x timesteps) against ``LossSweep`` on identical work (eager,
   and with ``--compile`` also with its UNet under torch.compile), with a projection to a
   full MSCOCO query from the measured rows/s.
3. Several queries in one sweep (``run([None, w1, w2, w3])``) against one ``run`` each.
4. Fisher: ``compute_fisher`` (hooks + ``kernels.fisher_accumulate`` on the K/V weights)
   against per-sample gradients of all UNet weights with ``torch.func`` (``vmap(grad(...))``
   over ``functional_call``, attention without fused SDPA), each in its own subprocess
   so that their peak memory does not mix, timed on a second call after an untimed first.

And the sweep's precisions: ``LossSweep.run`` in fp32, bf16 and mixed (bf16 but the UNet's
output end in float32; on CUDA also tf32 and fp16) on the same rows.

Timed calls of one comparison are interleaved (round k times one call of each method)
and the median over the rounds is reported, after one warm-up call of each method.

    python benchmarks/bench_sweep.py --device cpu [--quick] [--json out.json] [--threads 2]
    python benchmarks/bench_sweep.py --device cuda --dtype bfloat16 --json out.json
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

# Importing _common puts the checkout first on sys.path, ahead of any installed forgetscore.
from _common import (Results, TimeUp, choice_list, fmt_bytes, int_list, int_range, json_path, make_sync, run_meta,
                     stop_on_sigterm, table, timing_device)
from _profile import kinds_note, kinds_table, profile_kinds, profile_table

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from forgetscore.attribution.losses import COMPILE_MODES, PRECISIONS  # noqa: E402

SEED = 1234
CAPTIONS = 5                      # MSCOCO: five captions per image
TEXT_LEN, TEXT_DIM = 77, 1024     # CLIP-style text states of the MSCOCO model
MSCOCO_IMAGES = 118_287
MSCOCO_ROWS = MSCOCO_IMAGES * 2 * CAPTIONS * 20  # flips x captions x timesteps (stride 50)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}

# Work sizes per device: images per comparison and rows per UNet batch.
#   part12_images: images of the flip plan (1. overhead); the published comparison uses twice as
#     many images without flips, so both have the same rows.
#   published_images: images per batch of the published loop (the paper's batch: 80).
SIZES = {
    "cpu": dict(batch_rows=200, part12_images=1, published_images=2, timesteps=20,
                part3_images=1, part3_timesteps=4, rounds=3, fisher_samples=16, fisher_chunk=16,
                warm_all=False),
    "cuda": dict(batch_rows=2000, part12_images=80, published_images=80, timesteps=20,
                 part3_images=40, part3_timesteps=20, rounds=5, fisher_samples=64, fisher_chunk=16, warm_all=True),
}
QUICK = {
    "cpu": dict(batch_rows=40, part12_images=1, published_images=2, timesteps=4,
                part3_images=1, part3_timesteps=2, rounds=3, fisher_samples=4, fisher_chunk=4, warm_all=False),
    "cuda": dict(batch_rows=1000, part12_images=20, published_images=20, timesteps=20,
                 part3_images=10, part3_timesteps=20, rounds=3, fisher_samples=16, fisher_chunk=16, warm_all=True),
}


# --------------------------------------------------------------------------- the model and data

def build_unet():
    from diffusers import UNet2DConditionModel

    # attention_head_dim=8 is diffusers' (historically named) number of heads: 8 heads of
    # 16/32 channels in the 128/256-channel blocks.
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2, cross_attention_dim=TEXT_DIM,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3, attention_head_dim=8)


def build_model(device: torch.device):
    """A DiffusionModel around the MSCOCO-scale UNet (random weights) with a one-layer text encoder of its width.

    The text encoder and tokenizer only give the model its identity (``encoders_id``): the
    sweep reads prepared text states, which are random 77x1024 tensors here.
    """
    from diffusers import DDPMScheduler
    from transformers import CLIPTextConfig, CLIPTextModel

    from forgetscore.attribution import DiffusionModel
    from forgetscore.attribution.model import quiet_loading
    from forgetscore.digits.tokenizer import build_tokenizer

    torch.manual_seed(SEED)
    with quiet_loading():
        tok = build_tokenizer(words=["a", "photo", "of", "cat", "dog"], max_length=8)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=16, max_position_embeddings=8,
                                            pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                                            eos_token_id=tok.eos_token_id))
        unet = build_unet()
    return DiffusionModel(tok, text, unet, DDPMScheduler()).to(device)


def build_data(model, n: int):
    """A synthetic in-memory prepared set: n images (and flips), five captions each."""
    from forgetscore.attribution.dattri import ArrayData

    g = np.random.default_rng(SEED)
    inputs = g.standard_normal((n, 2, *model.input_shape), dtype=np.float32)
    text = g.standard_normal((n * CAPTIONS, TEXT_LEN, TEXT_DIM), dtype=np.float32)
    offsets = (np.arange(n + 1) * CAPTIONS).astype(np.int64)
    return ArrayData(inputs, text, offsets, model.encoders_id())


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def kv_variants(model, k: int, scale: float = 1e-3) -> list[dict[str, torch.Tensor]]:
    """k sets of slightly perturbed K/V weights (stand-ins for unlearned queries)."""
    from forgetscore.attribution import params

    names = params.select(model.unet, "kv")
    base = params.get(model.unet, names)
    g = torch.Generator().manual_seed(SEED + 7)
    out = []
    for _ in range(k):
        out.append({n: w + scale * w.std() * torch.randn(w.shape, generator=g).to(w.device)
                    for n, w in base.items()})
    return out


# --------------------------------------------------------------------------- timing

def time_interleaved(fns: dict[str, Callable[[], Any]], sync: Callable[[], None], rounds: int,
                     log: Callable[[str], None], warm_all: bool = True,
                     always_warm: tuple[str, ...] = ()) -> dict[str, dict | str]:
    """Warm-up calls, then `rounds` rounds of one timed call of each; median seconds per call.

    With `warm_all` every function gets one warm-up call; without, only the first one does
    (for calls of many seconds whose shapes the first one already ran), and the others'
    first timed round counts as a sample like the rest. Those named in `always_warm` (compiled
    functions, whose first call compiles) get a warm-up call whatever `warm_all` says.
    """
    out: dict[str, dict | str] = {}
    live: dict[str, float | None] = {}
    samples: dict[str, list[float]] = {}
    try:
        for k, (name, fn) in enumerate(fns.items()):
            if k and not warm_all and name not in always_warm:
                live[name] = None
                continue
            try:
                t0 = time.perf_counter()
                fn()
                sync()
                live[name] = time.perf_counter() - t0
                log(f"  warm-up {name}: {live[name]:.2f} s")
            except Exception as exc:  # noqa: BLE001 - report, keep the others
                traceback.print_exc()
                out[name] = f"n/a ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
        samples.update({n: [] for n in live})
        for k in range(rounds):
            for name in list(samples):
                try:
                    t0 = time.perf_counter()
                    fns[name]()
                    sync()
                    samples[name].append(time.perf_counter() - t0)
                except Exception as exc:  # noqa: BLE001 - a function never warmed up may fail here
                    traceback.print_exc()
                    out[name] = f"n/a ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"
                    del samples[name]
            log(f"  round {k + 1}/{rounds}: " + ", ".join(f"{n} {xs[-1]:.2f} s" for n, xs in samples.items()))
    except TimeUp:  # the caller reports the rounds finished; the run then stops (Results.run_steps)
        log("  SIGTERM: reporting the rounds finished so far")
    for name in fns:
        xs = samples.get(name)
        if xs:
            out[name] = {"median_s": statistics.median(xs), "min_s": min(xs), "max_s": max(xs), "rounds": len(xs),
                         "warm_up_s": live[name]}
        elif name not in out:
            out[name] = "n/a (stopped by SIGTERM before a timed round)"
    return out


def cudnn_benchmark(fn: Callable[[], Any]) -> Any:
    """fn() with cuDNN timing its convolution algorithms per shape (torch.backends.cudnn.benchmark), then as before."""
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        return fn()
    finally:
        torch.backends.cudnn.benchmark = before


# --------------------------------------------------------------------------- 1 + 2: sweep, bare, published

def bare_batches(sweep, ids: np.ndarray) -> list[tuple[torch.Tensor, ...]]:
    """The (x_t, t, ctx, captions, text_row) UNet batches the sweep runs for `ids`, made in advance.

    ctx holds every row's caption states; captions each caption once and text_row the row's caption.
    """
    from forgetscore import kernels
    from forgetscore.attribution.losses import expand_rows

    dev, out = sweep.model.device, []
    for batch in sweep.image_batches(ids):
        inputs = sweep.data.inputs(batch)[:, :sweep.plan.versions]
        text, counts = sweep.data.text(batch, sweep.plan.captions)
        rows = expand_rows(batch, counts, sweep.plan)
        x0 = inputs[rows.image, rows.version].to(dev)
        ts = rows.timestep.to(dev)
        x_t = kernels.add_noise(x0, ts, sweep.acp, sweep.plan.seed, rows.sample_id.to(dev), rows.draw_id.to(dev))
        ctx, captions, text_row = text[rows.text_row].to(dev), text.to(dev), rows.text_row.to(dev)
        for lo in range(0, len(rows), sweep.batch_size):
            hi = min(len(rows), lo + sweep.batch_size)
            out.append((x_t[lo:hi].contiguous(), ts[lo:hi].contiguous(), ctx[lo:hi].contiguous(), captions,
                        text_row[lo:hi].contiguous()))
    return out


def bare_compiled(sweep, pre: list[tuple[torch.Tensor, ...]]) -> None:
    """The batches of :func:`bare_batches` through `sweep`'s compiled UNet, called as its sweep calls it
    (the same padding, precision and shared caption keys and values), and nothing else."""
    with torch.inference_mode(), sweep._shared_text.installed() as shared:
        for x_t, t, _, captions, text_row in pre:
            sweep._forward(x_t, t, captions, text_row, shared)


def published_loop(model, data, ids: np.ndarray, images_per_batch: int, timesteps: list[int],
                   seed: int = SEED) -> torch.Tensor:
    """Per-row losses the way the reference implementation computes them (fp32, eager).

    Each batch holds `images_per_batch` images x all captions x all timesteps, noise from
    torch.randn with a generator seeded seed + batch index, the scheduler's add_noise and
    an element-wise MSE averaged per row. Inputs and text states come from the same
    prepared tensors the sweep reads.
    """
    unet, sched, dev = model.unet, model.scheduler, model.device
    t_all = torch.tensor(timesteps, dtype=torch.int64)
    losses = []
    with torch.no_grad():
        for b, lo in enumerate(range(0, len(ids), images_per_batch)):
            batch = ids[lo:lo + images_per_batch]
            x0 = data.inputs(batch)[:, 0]                             # [n, C, H, W], unflipped
            text, counts = data.text(batch, "all")                    # [n * caps, L, D]
            n, caps, nt = len(batch), counts[0], len(timesteps)
            x0 = x0.repeat_interleave(caps * nt, dim=0).to(dev)       # images x captions x timesteps
            ctx = text.repeat_interleave(nt, dim=0).to(dev)
            t = t_all.repeat(n * caps).to(dev)
            gen = torch.Generator(device=dev).manual_seed(seed + b)
            noise = torch.randn(x0.shape, generator=gen, device=dev)
            x_t = sched.add_noise(x0, noise, t)
            pred = unet(x_t, t, encoder_hidden_states=ctx).sample
            losses.append(F.mse_loss(pred, noise, reduction="none").mean(dim=(1, 2, 3)))
    return torch.cat(losses)


def bench_sweep_parts(args, model, data, sizes: dict, emit, log) -> None:
    from forgetscore.attribution import LossSweep, ScoringPlan, losses
    from forgetscore.attribution.text_kv import SharedText

    dev, dtype, sync = model.device, DTYPES[args.dtype], make_sync(model.device)
    ts = tuple(range(0, 1000, 1000 // sizes["timesteps"]))
    B = sizes["batch_rows"]
    flip_plan = ScoringPlan(timesteps=ts, seed=SEED)
    noflip_plan = ScoringPlan(timesteps=ts, flips=False, seed=SEED)
    n1 = sizes["part12_images"]
    ids1 = np.arange(n1)
    ids2 = np.arange(2 * n1)  # same rows without flips
    rows = n1 * 2 * CAPTIONS * len(ts)
    sweep1 = LossSweep(model, data, flip_plan, batch_size=B)
    sweep2 = LossSweep(model, data, noflip_plan, batch_size=B)
    pre = bare_batches(sweep1, ids1)
    pub_images = sizes["published_images"]
    pub_rows_per_batch = pub_images * CAPTIONS * len(ts)

    # The sweep's own math around the bare forwards it is measured against: on CUDA its fp32 precision turns
    # TF32 convolutions off (IEEE), which PyTorch leaves on by default; a ratio of the two would time two kinds
    # of arithmetic. (The compiled bare forwards go through the sweep's _forward, which enters it itself.) The
    # published loop is not one of them: it runs as its authors ran it.
    def same_math(sweep):
        return losses.unet_precision(dev, sweep.precision)

    def bare():
        with torch.inference_mode(), autocast(dev, dtype), same_math(sweep1):
            for x_t, t, ctx, _, _ in pre:
                model.unet(x_t, t, encoder_hidden_states=ctx)

    shared_text = SharedText(model.unet)

    def bare_shared():  # the UNet as the sweep calls it: each caption's keys and values once
        with torch.inference_mode(), autocast(dev, dtype), same_math(sweep1), shared_text.installed() as on:
            assert on, "the MSCOCO UNet's attention layers should all take shared caption states"
            for x_t, t, _, captions, text_row in pre:
                model.unet(x_t, t, encoder_hidden_states=captions, cross_attention_kwargs={"text_index": text_row})

    def ours_flip():
        with autocast(dev, dtype):
            sweep1.run([None], ids1, progress=False)

    def ours_noflip():
        with autocast(dev, dtype):
            sweep2.run([None], ids2, progress=False)

    def published():  # as published: fp32 under PyTorch's default math, whatever the sweep's precision
        published_loop(model, data, ids2, pub_images, list(ts))

    fns = {"bare": bare, "bare_shared": bare_shared, "sweep_flips": ours_flip, "sweep_noflip": ours_noflip,
           "published": published}
    # Each mode in each precision (the sweep's own precision rather than an outer autocast: dynamo traces the
    # UNet under it); by default the precision of --dtype.
    precs = args.compile_precisions or ("bf16" if dtype == torch.bfloat16 else "fp32",)
    compiled = {f"sweep_compiled:{mode}:{prec}": (mode, prec) for mode in args.compile for prec in precs}
    for key, (mode, prec) in compiled.items():
        sweep_c = LossSweep(model, data, noflip_plan, batch_size=B, compile=mode, precision=prec)
        fns[key] = lambda sweep_c=sweep_c: sweep_c.run([None], ids2, progress=False)
        fns[f"bare_{key}"] = lambda sweep_c=sweep_c: bare_compiled(sweep_c, pre)
    # Our sweeps again with cuDNN choosing its convolution algorithms by timing them (the published loop keeps
    # PyTorch's default, heuristics): the same compiled functions, so no second compilation.
    cudnn = {f"{key}+cudnn": key for key in ("sweep_noflip", *compiled)} if args.cudnn_benchmark else {}
    for key, base in cudnn.items():
        fns[key] = lambda fn=fns[base]: cudnn_benchmark(fn)

    log(f"[1+2] {rows} rows per call ({n1} images x 2 flips x {CAPTIONS} captions x {len(ts)} timesteps, "
        f"or {2 * n1} images without flips); UNet batches of {B} rows; published batches of {pub_rows_per_batch} rows")
    times = time_interleaved(fns, sync, sizes["rounds"], log, warm_all=sizes["warm_all"],
                             always_warm=tuple(compiled))
    work1 = f"{n1} img x 2 flips x {CAPTIONS} cap x {len(ts)} t"
    work2 = f"{2 * n1} img x {CAPTIONS} cap x {len(ts)} t"
    labels = {"bare": ("1 overhead", f"bare unet forwards ({args.dtype})", work1, B),
              "bare_shared": ("1 overhead", f"bare forwards, caption K/V once ({args.dtype})", work1, B),
              "sweep_flips": ("1 overhead", f"LossSweep.run ({args.dtype})", work1, B),
              "sweep_noflip": ("2 published", f"LossSweep.run ({args.dtype})", work2, B),
              "published": ("2 published", "published loop (fp32)", work2, pub_rows_per_batch)}
    for key, (mode, prec) in compiled.items():
        labels[key] = ("2 published", f"LossSweep.run (compile {mode}, precision {prec})", work2, B)
        labels[f"bare_{key}"] = ("1 overhead", f"bare forwards, caption K/V once (compile {mode}, "
                                               f"precision {prec})", work1, B)
    for key, base in cudnn.items():
        part, method, work, batch = labels[base]
        labels[key] = (part, f"{method[:-1]}, cudnn.benchmark)", work, batch)
    for key, (part, method, work, batch) in labels.items():
        tm = times[key]
        row = {"part": part, "method": method, "work": work, "rows": rows, "batch_rows": batch}
        if isinstance(tm, str):
            row["skipped"] = tm
        else:
            row.update(median_s=tm["median_s"], rows_per_s=rows / tm["median_s"], timing=tm)
        emit(row)
    overheads = [("sweep_flips", "bare_shared", "ratio sweep / bare, caption K/V once", "<= 1.10x"),
                 ("sweep_flips", "bare", "ratio sweep / bare", "")]
    # The compiled sweep (no flips: the same rows and batch shapes) against its own compiled UNet.
    overheads += [(key, f"bare_{key}", f"ratio sweep / bare, compile {mode}, precision {prec}", "")
                  for key, (mode, prec) in compiled.items()]
    for sweep_key, base, method, target in overheads:
        if all(isinstance(times[k], dict) for k in (base, sweep_key)):
            emit({"part": "1 overhead", "method": method, "work": work1, "rows": rows,
                  "ratio": times[sweep_key]["median_s"] / times[base]["median_s"], "target": target})
    ours = [("sweep_noflip", "sweep", f"LossSweep ({args.dtype})")]
    for key, (mode, prec) in compiled.items():
        ours.append((key, f"sweep compiled {mode} {prec}", f"LossSweep (compile {mode}, precision {prec})"))
    ours += [(key, f"{what}, cudnn.benchmark", f"{method[:-1]}, cudnn.benchmark)")
             for key, base in cudnn.items() for b, what, method in list(ours) if b == base]
    ours = [o for o in ours if isinstance(times[o[0]], dict)]
    if args.sweep_profile:
        for key, _, method in ours:
            if not key.endswith("+cudnn"):
                profile_sweep(fns[key], sync, dev, method, work2, rows, times[key]["median_s"], emit, log)
    if isinstance(times["published"], dict):
        for key, what, _ in ours:
            emit({"part": "2 published", "method": f"speedup published / {what}", "work": work2, "rows": rows,
                  "ratio": times["published"]["median_s"] / times[key]["median_s"], "target": ">= 10x on GPU"})
        for key, method in [(k, m) for k, _, m in ours] + [("published", "published loop (fp32)")]:
            rps = rows / times[key]["median_s"]
            emit({"part": "2 projection", "method": method, "work": f"full MSCOCO query: {MSCOCO_ROWS:,} rows",
                  "rows": MSCOCO_ROWS, "rows_per_s": rps, "projected_h": MSCOCO_ROWS / rps / 3600,
                  "note": "projected from the measured rows/s, one process on this device"})


def profile_sweep(fn: Callable[[], Any], sync: Callable[[], None], dev: torch.device, method: str, work: str,
                  rows: int, median_s: float, emit, log) -> None:
    """One more call of a timed sweep under torch.profiler: its device time by kind of kernel, and how busy
    the device was over the unprofiled median call (what is left is the device waiting on the host)."""
    try:
        info = profile_kinds(fn, sync, dev)
    except Exception as exc:  # noqa: BLE001 - a profiler that cannot run leaves the timings standing
        traceback.print_exc()
        emit({"part": "2 profile", "method": method, "work": work, "rows": rows,
              "skipped": f"n/a ({type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:120]})"})
        return
    log(f"[2] profile of {method}, one call ({info['wall_s']:.2f} s profiled, {median_s:.2f} s median):\n"
        + kinds_table(info))
    emit({"part": "2 profile", "method": method, "work": work, "rows": rows, "median_s": median_s,
          "note": kinds_note(info, median_s), "profile": info})


# --------------------------------------------------------------------------- precisions of the sweep

def bench_precisions(args, model, data, sizes: dict, emit, log) -> None:
    """LossSweep.run in each precision on the same rows, interleaved: what mixed costs beside bf16 and fp32."""
    from forgetscore.attribution import LossSweep, ScoringPlan
    from forgetscore.attribution.losses import cpu_has_bf16

    sync = make_sync(model.device)
    ts = tuple(range(0, 1000, 1000 // sizes["timesteps"]))
    plan = ScoringPlan(timesteps=ts, seed=SEED)
    ids = np.arange(sizes["part12_images"])
    rows = len(ids) * 2 * CAPTIONS * len(ts)
    precisions = ["fp32", "bf16", "mixed"] + (["tf32", "fp16"] if model.device.type == "cuda" else [])
    skipped = {}
    if args.quick and model.device.type == "cpu" and cpu_has_bf16() is False:
        # Emulated bfloat16 products take minutes at these sizes: not a quick run (the full run measures them).
        skipped = {p: "--quick on a CPU without bfloat16 instructions" for p in ("bf16", "mixed")}
    timed = [p for p in precisions if p not in skipped]
    sweeps = {p: LossSweep(model, data, plan, batch_size=sizes["batch_rows"], precision=p) for p in timed}
    log(f"[precisions] {rows} rows per call, UNet batches of {sizes['batch_rows']} rows: {', '.join(timed)}")
    times = time_interleaved({p: (lambda p=p: sweeps[p].run([None], ids, progress=False)) for p in timed},
                             sync, sizes["rounds"], log, warm_all=sizes["warm_all"])
    times.update(skipped)
    work = f"{len(ids)} img x 2 flips x {CAPTIONS} cap x {len(ts)} t"
    for p in precisions:
        row = {"part": "precision", "method": f"LossSweep.run (precision {p})", "work": work, "rows": rows,
               "batch_rows": sizes["batch_rows"]}
        if isinstance(times[p], str):
            row["skipped"] = times[p]
        else:
            row.update(median_s=times[p]["median_s"], rows_per_s=rows / times[p]["median_s"], timing=times[p])
            if isinstance(times["fp32"], dict):
                row["ratio"] = times["fp32"]["median_s"] / times[p]["median_s"]
                row["note"] = "ratio: speed-up over fp32"
        emit(row)


# --------------------------------------------------------------------------- 3: several queries

def bench_variants(args, model, data, sizes: dict, emit, log) -> None:
    from forgetscore.attribution import LossSweep, ScoringPlan

    dev, dtype, sync = model.device, DTYPES[args.dtype], make_sync(model.device)
    ts = tuple(range(0, 1000, 1000 // sizes["part3_timesteps"]))
    plan = ScoringPlan(timesteps=ts, seed=SEED)
    n = sizes["part3_images"]
    ids = np.arange(n)
    sweep = LossSweep(model, data, plan, batch_size=sizes["batch_rows"])
    ws = kv_variants(model, 3)
    variants = [None] + ws
    rows_each = n * 2 * CAPTIONS * len(ts)

    def together():
        with autocast(dev, dtype):
            return sweep.run(variants, ids, progress=False)

    def separately():
        with autocast(dev, dtype):
            return [sweep.run([v], ids, progress=False) for v in variants]

    a, b = together(), np.concatenate(separately())
    same = bool(np.array_equal(a, b))
    log(f"[3] 4 variants x {rows_each} rows; one sweep equals four runs bitwise: {same}")
    # both were just run once (the bitwise check above): that was their warm-up
    times = time_interleaved({"together": together, "separately": separately}, sync, sizes["rounds"], log,
                             warm_all=False)
    work = f"4 variants x {n} img x 2 flips x {CAPTIONS} cap x {len(ts)} t"
    for key, method in (("together", "run([None, w1, w2, w3])"), ("separately", "4 x run([w])")):
        tm = times[key]
        row = {"part": "3 queries", "method": method, "work": work, "rows": 4 * rows_each,
               "batch_rows": sizes["batch_rows"], "bitwise_equal": same}
        if isinstance(tm, str):
            row["skipped"] = tm
        else:
            row.update(median_s=tm["median_s"], rows_per_s=4 * rows_each / tm["median_s"], timing=tm)
        emit(row)
    if all(isinstance(times[k], dict) for k in times):
        emit({"part": "3 queries", "method": "speedup separately / together", "work": work, "rows": 4 * rows_each,
              "ratio": times["separately"]["median_s"] / times["together"]["median_s"]})


# --------------------------------------------------------------------------- 4: Fisher (subprocesses)

def proc_status() -> dict[str, int]:
    """VmRSS / VmHWM of this process in bytes (Linux), {} elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("VmRSS", "VmHWM"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def fisher_child(args) -> dict:
    """Run one Fisher method in this process; returns time and peak memory."""
    from forgetscore.attribution import compute_fisher, select_weights
    from forgetscore.attribution.fisher import sample_draws

    dev = torch.device(args.device)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    sizes = (QUICK if args.quick else SIZES)[dev.type]
    S = args.fisher_samples or sizes["fisher_samples"]
    model = build_model(dev)
    data = build_data(model, max(8, S))
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    status0 = proc_status()
    sync = make_sync(dev)
    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        mem0 = torch.cuda.memory_allocated()
    info: dict[str, Any] = {"samples": S}
    if args.child in ("kv", "all"):  # ours, over the K/V weights or all of them
        names = select_weights(model.unet, args.child)

        batch = args.fisher_batches[0] if args.fisher_batches else S
        info["batch"] = batch

        def run():
            with autocast(dev, DTYPES[args.dtype]):
                return compute_fisher(model, data, names, samples=S, batch_size=batch, progress=False)
        info["weights"] = (f"{'K/V' if args.child == 'kv' else 'all'} {len(names)} tensors, "
                           f"{sum(model.unet.get_parameter(n).numel() for n in names):,} weights")
    else:
        from diffusers.models.attention_processor import AttnProcessor
        from torch.func import functional_call, grad, vmap

        unet, sched = model.unet, model.scheduler
        unet.set_attn_processor(AttnProcessor())  # vmap cannot go through fused SDPA here
        chunk = min(S, args.fisher_chunk or sizes["fisher_chunk"])
        d = sample_draws(SEED, 0, S, data, model.num_train_timesteps, True)
        x0_all = data.inputs(d["image"].numpy())[torch.arange(S), d["version"]].to(dev)
        text, counts = data.text(d["image"].numpy(), "all")
        first = torch.cumsum(torch.as_tensor([0] + counts[:-1]), 0)
        ctx_all = text[first + d["caption"]].to(dev)
        t_all = d["timestep"].to(dev)
        params = {k: v.detach() for k, v in unet.named_parameters()}
        buffers = {k: v.detach() for k, v in unet.named_buffers()}
        info["weights"] = f"all {len(params)} tensors, {sum(p.numel() for p in params.values()):,} weights"
        info["vmap_chunk"] = chunk

        def loss_one(p, x_t, t, ctx, noise):
            pred = functional_call(unet, (p, buffers), (x_t[None], t[None]),
                                   {"encoder_hidden_states": ctx[None]}).sample
            return F.mse_loss(pred, noise[None])

        per_sample = vmap(grad(loss_one), in_dims=(None, 0, 0, 0, 0))

        def run():
            fisher = {k: torch.zeros(v.shape, dtype=torch.float64, device=dev) for k, v in params.items()}
            for b, lo in enumerate(range(0, S, chunk)):
                hi = min(S, lo + chunk)
                gen = torch.Generator(device=dev).manual_seed(SEED + b)
                noise = torch.randn(x0_all[lo:hi].shape, generator=gen, device=dev)
                x_t = sched.add_noise(x0_all[lo:hi], noise, t_all[lo:hi])
                grads = per_sample(params, x_t, t_all[lo:hi], ctx_all[lo:hi], noise)
                for k, g in grads.items():
                    fisher[k] += g.double().square().sum(0)
                del grads
            return {k: f / S for k, f in fisher.items()}
    # One untimed call first: the first call's kernel compilation (Triton), cuDNN and allocator
    # warm-up are not the Fisher's cost. Peak memory is counted over the timed call only.
    t0 = time.perf_counter()
    run()
    sync()
    info["warm_up_s"] = time.perf_counter() - t0
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    run()
    sync()
    info["seconds"] = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    info["peak_rss_bytes"] = rss1 * 1024
    info["baseline_rss_bytes"] = rss0 * 1024
    status1 = proc_status()
    if status0 and status1:  # Linux: the current RSS before the call and this process's own peak (VmHWM)
        info["rss_before_call_bytes"], info["vm_hwm_bytes"] = status0["VmRSS"], status1["VmHWM"]
    if dev.type == "cuda":
        info["peak_cuda_extra_bytes"] = torch.cuda.max_memory_allocated() - mem0
    if args.fisher_profile:
        info["profile"] = profile_table(run, sync, dev)
    return info


def bench_fisher(args, sizes: dict, emit, log) -> None:
    S = args.fisher_samples or sizes["fisher_samples"]
    for name in args.fisher_methods:
        # Batch sizes apply to ours; torch.func goes by --fisher-chunk.
        for batch in (args.fisher_batches or (S,)) if name != "func" else (None,):
            fisher_run(args, name, S, batch, emit, log)


def fisher_run(args, name: str, S: int, batch: int | None, emit, log) -> None:
    """One Fisher method in a subprocess; emits its row (and logs its profile, if asked for)."""
    method = FISHER_METHODS[name] + (f", batches of {batch}" if batch is not None and batch != S else "")
    dtype = "float32" if name == "func" else args.dtype  # the published way stays fp32
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--device", args.device,
           "--dtype", dtype, "--threads", str(args.threads), "--fisher-samples", str(S)] \
        + (["--fisher-chunk", str(args.fisher_chunk)] if args.fisher_chunk else []) \
        + (["--fisher-batches", str(batch)] if batch is not None else []) \
        + (["--fisher-profile"] if args.fisher_profile else []) + (["--quick"] if args.quick else [])
    log(f"[4] {method}: {S} samples in a subprocess")
    row: dict[str, Any] = {"part": "4 fisher", "method": method, "rows": S, "dtype": dtype}
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.fisher_timeout_s)
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            tail = (p.stderr.strip().splitlines() or ["?"])[-1][:160]
            row["skipped"] = f"n/a (child exited {p.returncode}: {tail})"
        else:
            info = json.loads(lines[-1])
            profile = info.pop("profile", None)
            row.update(info, median_s=info["seconds"], rows_per_s=S / info["seconds"],
                       work=f"{S} samples ({info['weights']})")
            if profile:
                log(f"[4] {method}: profile of a third call\n{profile}")
                row["profile"] = {"table": profile}  # a dict: kept in the JSON, left out of the log line
    except subprocess.TimeoutExpired:
        row["skipped"] = f"n/a (over {args.fisher_timeout_s} s)"
    emit(row)


# --------------------------------------------------------------------------- report

def fmt_s(v: float | None) -> str:
    if v is None:
        return "-"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:.0f}"


def report(result: dict) -> str:
    meta = result["meta"]
    lines = [f"forgetscore sweep benchmark — {meta['device_name']}, torch {meta['torch']}, diffusers "
             f"{meta['diffusers']}, {meta['threads']} threads, {meta['dtype']}, {meta['date']}",
             f"UNet: MSCOCO config, {format(meta['unet_params'], ',') if 'unet_params' in meta else '57.4 M'} weights (random), text 77x1024, "
             "latents 4x16x16",
             ""]
    hdr = ["part", "method", "work", "batch", "rows", "median s", "rows/s", "ratio", "peak mem", "note"]
    rows = []
    for r in result["rows"]:
        mem = "-"
        if "peak_cuda_extra_bytes" in r:
            mem = fmt_bytes(r["peak_cuda_extra_bytes"]) + " (cuda extra)"
        elif "peak_rss_bytes" in r:
            before = r.get("rss_before_call_bytes", r["baseline_rss_bytes"])
            mem = f"{fmt_bytes(r['peak_rss_bytes'])} (+{fmt_bytes(r['peak_rss_bytes'] - before)})"
        note = r.get("skipped") or r.get("note") or (f"target {r['target']}" if r.get("target") else "")
        if "bitwise_equal" in r and not note:
            note = f"bitwise equal: {r['bitwise_equal']}"
        if "projected_h" in r:
            note = f"projected {r['projected_h']:.1f} h " + note
        batch = r.get("batch_rows", r.get("batch", "-"))  # UNet rows, or a Fisher's samples per batch
        rows.append([r["part"], r["method"], r.get("work", ""), str(batch), f"{r['rows']:,}",
                     fmt_s(r.get("median_s")), f"{r['rows_per_s']:.1f}" if "rows_per_s" in r else "-",
                     f"{r['ratio']:.2f}x" if "ratio" in r else "-", mem, note])
    lines.append(table(hdr, rows, first_numeric=4))
    lines.append("")
    lines.append("rows: UNet rows (image x version x caption x timestep) per call, or Fisher samples; ratio: see "
                 "each line's method; peak mem: peak RSS (ru_maxrss) of the subprocess (+ over its RSS just before "
                 "the call) on CPU, max_memory_allocated beyond the start on CUDA")
    return "\n".join(lines)


PARTS = ("sweep", "queries", "fisher", "precisions")
# --fisher-methods (each runs in a subprocess: --child NAME): their row labels
FISHER_METHODS = {"kv": "compute_fisher: hooks + kernel, K/V weights",
                  "all": "compute_fisher: hooks + kernel, all weights",
                  "func": "torch.func vmap(grad) per-sample, all weights"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="float32",
                   help="autocast dtype of the sweep, the bare forwards and compute_fisher (the published loop "
                        "and the torch.func Fisher stay fp32, as published)")
    p.add_argument("--quick", action="store_true", help="small sizes, for a smoke run")
    p.add_argument("--json", type=json_path, metavar="OUT",
                   help="write all measurements as JSON (rewritten after every row)")
    p.add_argument("--threads", type=int_range(1, zero="torch's default"), default=0,
                   help="torch.set_num_threads(N) first; 0: torch's default")
    p.add_argument("--only", type=choice_list(PARTS), default=PARTS,
                   help="comma-separated parts to run, of sweep, queries, fisher, precisions (default: all; "
                        "sweep: parts 1 and 2; precisions: the sweep in fp32, bf16, mixed and on CUDA tf32, fp16)")
    p.add_argument("--rounds", type=int_range(1, zero="the default"), default=0,
                   help="timed rounds per comparison (default 3 CPU, 5 CUDA)")
    p.add_argument("--fisher-samples", type=int_range(1, zero="the default"), default=0,
                   help="samples per Fisher method (default 16 CPU, 64 CUDA)")
    p.add_argument("--fisher-chunk", type=int_range(1, zero="the default"), default=0,
                   help="samples per vmap call of the torch.func Fisher")
    p.add_argument("--fisher-methods", type=choice_list(tuple(FISHER_METHODS)), default=tuple(FISHER_METHODS),
                   help="comma-separated Fisher methods of part 4: kv, all (ours over K/V or all weights), func "
                        "(torch.func per-sample gradients of all weights, the published way); default: all three")
    p.add_argument("--fisher-batches", type=int_list, default=(),
                   help="comma-separated samples per batch of our Fisher methods, each timed in its own subprocess "
                        "(default: all the samples in one batch)")
    p.add_argument("--fisher-profile", action="store_true",
                   help="profile a third call of each Fisher method (torch.profiler) and print its top ops")
    p.add_argument("--sweep-profile", action="store_true",
                   help="part 2: profile one more call of each of our timed sweeps (torch.profiler): device time "
                        "by kind of kernel and how busy the device was")
    p.add_argument("--fisher-timeout-s", type=int_range(1), default=600,
                   help="give up on a Fisher subprocess after this")
    p.add_argument("--compile", type=choice_list(COMPILE_MODES), default=(),
                   help="comma-separated torch.compile modes of the sweep (" + ", ".join(COMPILE_MODES) + "): "
                        "part 2 also times the sweep compiled in each, after an untimed call that compiles it")
    p.add_argument("--compile-precisions", type=choice_list(tuple(PRECISIONS)), default=(),
                   help="comma-separated sweep precisions (" + ", ".join(PRECISIONS) + ") each --compile mode is "
                        "timed in (default: that of --dtype, bf16 or fp32); each compiles once more")
    p.add_argument("--cudnn-benchmark", action="store_true",
                   help="part 2 also times each of our sweeps with torch.backends.cudnn.benchmark on (CUDA only)")
    p.add_argument("--batch-rows", type=int_range(1, zero="the default"), default=0,
                   help="UNet rows per batch of the sweep and the bare forwards (default 200 CPU, 2000 CUDA)")
    p.add_argument("--child", choices=tuple(FISHER_METHODS), help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = build_parser()
    args = p.parse_args(argv)
    if args.cudnn_benchmark and args.device != "cuda":
        p.error("--cudnn-benchmark: cuDNN runs on CUDA only; drop it or pass --device cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    try:
        args = parse_args(argv)
    except SystemExit as exc:  # an in-process caller reads a refused argument as the status, like the checks below
        return exc.code
    if args.child:
        print(json.dumps(fisher_child(args)), flush=True)
        return 0
    # Under `timeout` (the GPU check): the part being timed reports its finished rounds, then the run ends.
    stop_on_sigterm()
    dev = timing_device(args.device, args.threads)
    if dev is None:
        return 2
    sizes = dict((QUICK if args.quick else SIZES)[dev.type])
    if args.rounds:
        sizes["rounds"] = args.rounds
    if args.batch_rows:
        sizes["batch_rows"] = args.batch_rows
    import diffusers

    start = time.perf_counter()
    # A child's ru_maxrss starts at the RSS its parent had when it was spawned (fork + exec keep
    # the old peak), so the Fisher subprocesses run first, while this process is still small.
    fisher_first = "fisher" in args.only
    model = data = None
    result = Results(args.json, {**run_meta(dev), "diffusers": diffusers.__version__, "dtype": args.dtype,
                                 "quick": args.quick, "sizes": sizes, "seed": SEED}, rows=[])

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - start:7.1f}s] {msg}", flush=True)

    def emit(row: dict) -> None:
        result["rows"].append(row)
        short = {k: v for k, v in row.items() if not isinstance(v, dict)}
        log(", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in short.items()))
        result.save()

    def setup() -> None:
        nonlocal model, data
        model = build_model(dev)
        data = build_data(model, max(2 * sizes["part12_images"], sizes["part3_images"]))
        result["meta"]["unet_params"] = sum(p.numel() for p in model.unet.parameters())

    steps = []
    if fisher_first:
        steps.append(("fisher", lambda: bench_fisher(args, sizes, emit, log)))
    if {"sweep", "queries", "precisions"} & set(args.only):
        steps.append(("setup", setup))
    if "sweep" in args.only:
        steps.append(("sweep", lambda: bench_sweep_parts(args, model, data, sizes, emit, log)))
    if "precisions" in args.only:  # before the queries: a time limit should cut the less telling part
        steps.append(("precisions", lambda: bench_precisions(args, model, data, sizes, emit, log)))
    if "queries" in args.only:
        steps.append(("queries", lambda: bench_variants(args, model, data, sizes, emit, log)))
    result.run_steps(steps)
    return result.finish(start, report)


if __name__ == "__main__":
    sys.exit(main())
