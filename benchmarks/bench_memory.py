#!/usr/bin/env python
"""Peak memory of a sweep over a large prepared store: does it stay bounded?

Writes a synthetic prepared store (default 1,000,000 images of 4x8x8 float32 latents,
each with its flip and one 4x16 caption state) in the layout ``prepare`` writes (shards
of ``inputs-*.npy`` / ``text-*.npy``, ``caption_offsets.npy`` and ``manifest.json``), so
that ``PreparedData(dir)`` opens it, then measures in separate subprocesses (so their
peaks do not mix):

- ``sweep``: opens the store and runs a ``LossSweep`` of a tiny UNet through
  ``run_sweep`` (chunked, into a directory) over a strided subset of the images spread
  over the whole store, which reads from every shard;
- ``scan``: opens the store and reads every image and caption state of every shard
  through ``PreparedData.inputs`` / ``.text``, block by block;
- ``random``: reads ten times ``--sweep-images`` images in shuffled order (a candidate list
  in no particular order), 1024 at a time, each batch from nearly every shard.

Each reports its peak resident set size (``resource.getrusage(RUSAGE_SELF).ru_maxrss``),
the same before the store is opened, and at the end the process's anonymous and
file-backed resident memory (``RssAnon`` / ``RssFile`` in Linux's ``/proc/self/status``).
File-backed pages of the memory-mapped shards would count in the RSS while they stay
mapped; ``PreparedData`` unmaps each shard's pages once a read has copied its rows, so
neither kind should grow with the store.

    python benchmarks/bench_memory.py [--images 1000000] [--sweep-images 20000] [--json out.json]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Importing _common puts the checkout first on sys.path; it imports no torch: this process stays numpy-only.
from _common import int_range, json_path, spread_timesteps  # noqa: E402

SEED = 4321
INPUT_SHAPE = (4, 8, 8)
TEXT_SHAPE = (4, 16)  # tokens x width of the tiny text encoder


def build_model():
    """A tiny latent text-to-image model (8x8x4 latents, UNet channels 8/16), deterministic."""
    import torch
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from forgetscore.attribution import DiffusionModel
    from forgetscore.attribution.model import quiet_loading
    from forgetscore.digits.tokenizer import build_tokenizer

    torch.manual_seed(SEED)
    with quiet_loading():
        tok = build_tokenizer(words=["a", "b", "c"], max_length=TEXT_SHAPE[0])
        text = CLIPTextModel(CLIPTextConfig(vocab_size=len(tok), hidden_size=TEXT_SHAPE[1], intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            max_position_embeddings=TEXT_SHAPE[0], pad_token_id=tok.pad_token_id,
                                            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
        unet = UNet2DConditionModel(
            sample_size=INPUT_SHAPE[1], in_channels=INPUT_SHAPE[0], out_channels=INPUT_SHAPE[0], layers_per_block=1,
            block_out_channels=(8, 16), down_block_types=("CrossAttnDownBlock2D",) * 2,
            up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=TEXT_SHAPE[1], attention_head_dim=4,
            norm_num_groups=4)
    return DiffusionModel(tok, text, unet, DDPMScheduler()).to("cpu")


def store_bytes(n: int) -> int:
    per_image = 2 * int(np.prod(INPUT_SHAPE)) * 4 + int(np.prod(TEXT_SHAPE)) * 4 + 8
    return n * per_image


def write_store(store: Path, n: int, shard_size: int) -> dict:
    """The prepared-cache layout of ``forgetscore.attribution.data.prepare``, filled with random data."""
    from forgetscore.attribution.data import CACHE_FORMAT
    from forgetscore.attribution.io import write_json, write_npy

    model = build_model()
    store.mkdir(parents=True, exist_ok=True)
    header = {"format": CACHE_FORMAT, "encoders_id": model.encoders_id(), "data_id": f"synthetic-{n}-{SEED}",
              "n_images": n, "input_shape": list(INPUT_SHAPE), "shard_size": shard_size, "text_dtype": "float32",
              "train_dir": "<synthetic>", "model": "<in memory>"}
    write_npy(store / "caption_offsets.npy", np.arange(n + 1, dtype=np.int64))  # one caption per image
    rng = np.random.default_rng(SEED)
    shards = []
    t0 = time.perf_counter()
    for s in range(0, (n + shard_size - 1) // shard_size):
        lo, hi = s * shard_size, min(n, (s + 1) * shard_size)
        entry = {"inputs": f"inputs-{s:05d}.npy", "text": f"text-{s:05d}.npy", "images": [lo, hi]}
        write_npy(store / entry["text"], rng.standard_normal((hi - lo, *TEXT_SHAPE), dtype=np.float32))
        write_npy(store / entry["inputs"], rng.standard_normal((hi - lo, 2, *INPUT_SHAPE), dtype=np.float32))
        shards.append(entry)
    write_json(store / "manifest.json", {**header, "shards": shards, "complete": True,
                                         "text_shape": list(TEXT_SHAPE)})
    return {"seconds": time.perf_counter() - t0, "shards": len(shards),
            "bytes": sum(f.stat().st_size for f in store.iterdir())}


def rss_now() -> dict[str, int]:
    """The process's current anonymous and file-backed resident bytes (Linux), {} elsewhere."""
    out = {}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                key = line.split(":", 1)[0]
                if key in ("RssAnon", "RssFile", "VmRSS", "VmHWM"):
                    out[key] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def maxrss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def child(args) -> dict:
    import torch

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    from forgetscore.attribution import LossSweep, PreparedData, ScoringPlan
    from forgetscore.attribution.sweep import run_sweep

    info: dict[str, Any] = {}
    if args.child == "sweep":
        model = build_model()
        # one warm-up forward so that the allocator's and the UNet's first-call memory is in the baseline
        with torch.inference_mode():
            model.unet(torch.zeros(2, *INPUT_SHAPE), torch.zeros(2, dtype=torch.long),
                       encoder_hidden_states=torch.zeros(2, *TEXT_SHAPE))
    info["rss_before_open"] = maxrss()
    t0 = time.perf_counter()
    data = PreparedData(args.store)
    info["open_s"] = time.perf_counter() - t0
    info["rss_after_open"] = maxrss()
    info["n_images"], info["shards"] = data.n, len(data._inputs)
    t0 = time.perf_counter()
    if args.child == "sweep":
        stride = max(1, data.n // args.sweep_images)
        ids = np.arange(0, data.n, stride)[:args.sweep_images]
        plan = ScoringPlan(timesteps=spread_timesteps(args.timesteps), seed=SEED)
        sweep = LossSweep(model, data, plan, batch_size=args.batch_rows)
        out_dir = tempfile.mkdtemp(prefix="bench_memory_sweep_")
        try:
            losses = run_sweep(sweep, [None], out_dir, indices=ids, chunk_size=args.chunk_size, progress=False)
        finally:
            shutil.rmtree(out_dir, ignore_errors=True)
        shards_read = len({int(i) // data.shard_size for i in ids})
        info.update(images=len(ids), stride=stride, rows=len(ids) * plan.versions * len(plan.timesteps),
                    timesteps=len(plan.timesteps),
                    shards_read=shards_read, finite=bool(np.isfinite(losses).all()),
                    batch_rows=args.batch_rows, chunk_size=args.chunk_size)
    elif args.child == "scan":  # read everything, block by block
        total = 0.0
        block = 8192
        for lo in range(0, data.n, block):
            idx = np.arange(lo, min(data.n, lo + block))
            total += float(data.inputs(idx).sum()) + float(data.text(idx, "all")[0].sum())
        info.update(images=data.n, shards_read=len(data._inputs), checksum=total, block=block)
    else:  # random: a shuffled subset, as a candidate list in no particular order, in batches
        ids = np.random.default_rng(SEED).permutation(data.n)[:args.sweep_images * 10]
        total = 0.0
        block = 1024
        for lo in range(0, len(ids), block):
            idx = ids[lo:lo + block]
            total += float(data.inputs(idx).sum()) + float(data.text(idx, "all")[0].sum())
        info.update(images=len(ids), shards_read=len({int(i) // data.shard_size for i in ids}), checksum=total,
                    block=block)
    info["seconds"] = time.perf_counter() - t0
    info["peak_rss"] = maxrss()
    info.update({f"end_{k}": v for k, v in rss_now().items()})
    return info


def gib(v: float) -> str:
    return f"{v / (1 << 30):.2f} GiB" if v >= 1 << 30 else f"{v / (1 << 20):.0f} MiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int_range(1), default=1_000_000, help="images in the synthetic store")
    p.add_argument("--shard-size", type=int_range(1), default=4096, help="images per shard (prepare's default)")
    p.add_argument("--sweep-images", type=int_range(1), default=20_000, help="images swept, strided over the store")
    # N timesteps spread over the scheduler's 1000: there are no more than 1000 to take.
    p.add_argument("--timesteps", type=int_range(1, 1000), default=1,
                   help="timesteps per image and version in the plan, spread evenly over [0, 1000)")
    p.add_argument("--batch-rows", type=int_range(1), default=1024, help="UNet batch size in rows")
    p.add_argument("--chunk-size", type=int_range(1), default=1024, help="images per run_sweep chunk")
    p.add_argument("--dir", help="where to write the store (default: a fresh temporary folder, removed after)")
    p.add_argument("--keep", action="store_true",
                   help="keep the store (its folder is printed and kept in the JSON's meta as store_dir)")
    p.add_argument("--json", type=json_path, metavar="OUT",
                   help="write the measurements as JSON (rewritten after every step)")
    p.add_argument("--threads", type=int_range(1, zero="torch's default"), default=0,
                   help="torch.set_num_threads(N) in the subprocesses")
    p.add_argument("--child", choices=("write", "sweep", "scan", "random"), help=argparse.SUPPRESS)
    p.add_argument("--store", help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    if args.child == "write":
        print(json.dumps(write_store(Path(args.store), args.images, args.shard_size)), flush=True)
        return 0
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return 0

    parent = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="bench_memory_"))
    if parent.exists() and not parent.is_dir():
        print(f"--dir: {str(parent)!r} is a file; give a folder", file=sys.stderr)
        return 2
    parent.mkdir(parents=True, exist_ok=True)
    store = parent / "store"
    if store.exists():  # it is written here and deleted afterwards: never someone's own folder
        print(f"--dir: {str(store)!r} exists; give a folder without a store/ in it (the benchmark writes one and "
              "deletes it afterwards)", file=sys.stderr)
        return 2
    n = args.images
    free = shutil.disk_usage(parent).free
    notes = []
    if store_bytes(n) * 1.5 > free:
        n_old, n = n, 200_000
        notes.append(f"scaled down from {n_old:,} to {n:,} images: {gib(free)} free, the store needs "
                     f"{gib(store_bytes(n_old))}")
        if store_bytes(n) * 1.5 > free:
            print(f"not enough disk: {gib(free)} free in {parent}", file=sys.stderr)
            return 2
    result: dict[str, Any] = {
        "meta": {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                 "argv": sys.argv, "images": n, "input_shape": list(INPUT_SHAPE), "text_shape": list(TEXT_SHAPE),
                 "shard_size": args.shard_size, "disk_free_bytes": free, "notes": notes,
                 "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
                 # --keep without --dir leaves it in a fresh temporary folder: where is said, or it is lost
                 "store_dir": str(store.resolve()) if args.keep else None},
        "store": {}, "children": {}}
    if args.keep:
        print(f"--keep: the store stays in {store.resolve()}", flush=True)

    def save() -> None:
        if args.json:  # whole or not at all: written beside, then renamed
            tmp = f"{args.json}.tmp"
            with open(tmp, "w") as fh:
                json.dump(result, fh, indent=1, default=str)
            os.replace(tmp, args.json)

    def run_child(name: str) -> dict:
        # Everything runs in subprocesses: this process stays small (numpy only), because a
        # child's ru_maxrss starts at its parent's RSS when it was spawned.
        cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--store", str(store),
               "--images", str(n), "--shard-size", str(args.shard_size), "--threads", str(args.threads),
               "--sweep-images", str(args.sweep_images), "--timesteps", str(args.timesteps),
               "--batch-rows", str(args.batch_rows), "--chunk-size", str(args.chunk_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
        if proc.returncode != 0 or not lines:
            print(proc.stderr[-3000:], file=sys.stderr)
            return {"error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
        return json.loads(lines[-1])

    try:
        print(f"writing a synthetic store of {n:,} images ({gib(store_bytes(n))}) ...", flush=True)
        result["store"] = run_child("write")
        if "error" in result["store"]:
            print(f"writing failed: {result['store']['error']}", file=sys.stderr)
            save()
            return 1
        print(f"  {result['store']['shards']} shards, {gib(result['store']['bytes'])} in "
              f"{result['store']['seconds']:.1f} s", flush=True)
        save()
        for name in ("sweep", "scan", "random"):
            print(f"{name} ...", flush=True)
            result["children"][name] = run_child(name)
            print(f"  {result['children'][name]}", flush=True)
            save()
    finally:
        if not args.keep:
            shutil.rmtree(store, ignore_errors=True)
            if not args.dir:
                shutil.rmtree(parent, ignore_errors=True)
    result["meta"]["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None

    # The report first, then the record: a record that cannot be written must not take the figures with it.
    size = result["store"]["bytes"]
    print()
    print(f"store: {n:,} images, {result['store']['shards']} shards, {gib(size)} on disk"
          + (f" ({'; '.join(notes)})" if notes else ""))
    hdr = ("what", "images read", "shards read", "seconds", "peak RSS", "RSS before open", "peak - before",
           "RssAnon end", "RssFile end", "peak / store")
    rows = []
    for name, c in result["children"].items():
        if "error" in c:
            rows.append((name, "-", "-", "-", "-", "-", "-", "-", "-", c["error"][:80]))
            continue
        what = {"sweep": f"sweep (stride {c.get('stride')}, {c.get('rows', 0):,} rows)", "scan": "scan (all)",
                "random": f"random reads (batches of {c.get('block')})"}[name]
        rows.append((what, f"{c['images']:,}", str(c["shards_read"]), f"{c['seconds']:.1f}", gib(c["peak_rss"]),
                     gib(c["rss_before_open"]), gib(c["peak_rss"] - c["rss_before_open"]),
                     gib(c.get("end_RssAnon", 0)), gib(c.get("end_RssFile", 0)), f"{c['peak_rss'] / size:.2f}"))
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(hdr)]
    print("  ".join(h.ljust(w) for h, w in zip(hdr, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    if args.keep:
        print(f"store kept in {store.resolve()} (e.g. bench_reads.py --cache {store.resolve()}); remove it when done")
    try:
        save()
    except OSError as exc:
        print(f"--json: could not write {args.json!r} ({type(exc).__name__}: {exc}); the report above is all "
              "there is of this run", file=sys.stderr)
        return 1
    return 0 if all("error" not in c for c in result["children"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
