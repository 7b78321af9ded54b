#!/usr/bin/env python
"""Reading a batch from the prepared cache: PreparedData.inputs / .text against a per-image loop.

A sweep reads each batch's inputs and caption states from the memory-mapped shards (in the
prefetch thread). This times both reads per image, for a batch of consecutive images and a
batch of random ones, against the straightforward loop that takes one image at a time, in
the same run; both return the same arrays (checked).

    python benchmarks/bench_reads.py [--cache PREPARED_DIR] [--batch 1024] [--repeat 20]

Default cache: the embedded digits model's prepared training set (made on first use), one
shard; for random batches that hop between shards, point --cache at a larger store, e.g. the
synthetic one `bench_memory.py --images 200000 --dir D --keep` leaves in D/store.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from _common import int_range  # noqa: E402


def loop_inputs(data, indices: np.ndarray) -> np.ndarray:
    out = np.empty((len(indices), 2, *data.input_shape), dtype=np.float32)
    for k, i in enumerate(indices):
        s, r = divmod(int(i), data.shard_size)
        out[k] = data._inputs[s][r]
    return out


def loop_text(data, indices: np.ndarray, captions: str) -> np.ndarray:
    rows = []
    for i in indices:
        i = int(i)
        s = i // data.shard_size
        base = int(data.caption_offsets[s * data.shard_size])
        lo, hi = int(data.caption_offsets[i]) - base, int(data.caption_offsets[i + 1]) - base
        rows.append(data._text[s][lo:lo + 1 if captions == "first" else hi])
    return np.concatenate(rows).astype(np.float32, copy=False)


def per_image_us(fn, n_images: int, repeat: int) -> float:
    fn()
    t = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - t) / repeat / n_images * 1e6


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="a prepared folder (default: the digits model's, made if missing)")
    parser.add_argument("--batch", type=int_range(1), default=1024)
    parser.add_argument("--repeat", type=int_range(1), default=20)
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)

    from forgetscore.attribution.data import PreparedData

    if args.cache:
        data = PreparedData(args.cache)
    else:
        from forgetscore.attribution import Attributor
        from forgetscore.cache import cache_root
        from forgetscore.digits.data import write_image_folder
        from forgetscore.digits.train import ensure_model

        train_dir = cache_root() / "digits-train"
        if not (train_dir / "metadata.jsonl").is_file():
            write_image_folder(train_dir, overwrite=True)
        data = Attributor.load(ensure_model(log=print), train_dir, progress=False).prepare()
    n = min(args.batch, data.n)
    caps = np.diff(np.asarray(data.caption_offsets))
    print(f"torch {torch.__version__}, {data.n} images in shards of {data.shard_size}, inputs "
          f"{tuple(data.input_shape)} x 2, text {tuple(data._text[0].shape[1:])}, {caps.mean():.1f} captions "
          f"per image; batches of {n}; microseconds per image")
    print(f"{'batch':<10}{'read':<13}{'per-image loop':>16}{'PreparedData':>14}{'x':>7}")
    gen = np.random.default_rng(0)
    for kind, ids in (("in order", np.arange(n)), ("random", gen.permutation(data.n)[:n])):
        reads = (("inputs", lambda: loop_inputs(data, ids), lambda: data.inputs(ids).numpy()),
                 ("text all", lambda: loop_text(data, ids, "all"), lambda: data.text(ids, "all")[0].numpy()),
                 ("text first", lambda: loop_text(data, ids, "first"), lambda: data.text(ids, "first")[0].numpy()))
        for name, loop, ours in reads:
            np.testing.assert_array_equal(ours(), loop())
            a, b = per_image_us(loop, n, args.repeat), per_image_us(ours, n, args.repeat)
            print(f"{kind:<10}{name:<13}{a:>16.2f}{b:>14.2f}{a / b:>7.1f}")


if __name__ == "__main__":
    main()
