#!/usr/bin/env python
"""Reading a batch from the prepared cache: PreparedData.inputs / .text against a per-image loop.

A sweep reads each batch's inputs and caption states from the memory-mapped shards (in the
prefetch thread). This times both reads per image, for a batch of consecutive images and a
batch of random ones, against the straightforward loop that takes one image at a time, in
the same run; both return the same arrays (checked). The two are timed interleaved (one call of
each per round, the order alternating) and each figure is the median over the rounds, so that
both share whatever else the machine is doing alike.

    python benchmarks/bench_reads.py [--cache PREPARED_DIR] [--batch 1024] [--repeat 20]

Default cache: the embedded digits model's prepared training set (made on first use), one
shard; for random batches that hop between shards, point --cache at a larger store, e.g. the
synthetic one `bench_memory.py --images 200000 --dir D --keep` leaves in D/store.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

# Importing _common puts the checkout first on sys.path, ahead of any installed forgetscore.
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


def interleaved_us(fns: dict[str, Callable[[], object]], n_images: int, repeat: int,
                   clock: Callable[[], float] = time.perf_counter) -> dict[str, float]:
    """Median microseconds per image of each function over `repeat` rounds of one call of each, after a
    warm-up call of each.

    Timed one after the other, a burst of load on a shared machine lands on one method only and moves
    their ratio (15x against 54x between identical runs); the order alternates so that neither always
    runs on the caches the other left.
    """
    for fn in fns.values():
        fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    names = list(fns)
    for r in range(repeat):
        for name in names if r % 2 == 0 else names[::-1]:
            t = clock()
            fns[name]()
            samples[name].append(clock() - t)
    return {name: statistics.median(xs) / n_images * 1e6 for name, xs in samples.items()}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", help="a prepared folder (default: the digits model's, made if missing)")
    parser.add_argument("--batch", type=int_range(1), default=1024,
                        help="images per batch read (default %(default)s; at most the store's images)")
    parser.add_argument("--repeat", type=int_range(1), default=20,
                        help="timed rounds per read, each one call of both ways; the median is reported "
                             "(default %(default)s)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    from forgetscore.attribution.data import PreparedData

    if args.cache:
        try:
            data = PreparedData(args.cache)
        except (ValueError, OSError) as exc:
            why = str(exc).removeprefix("cache: ")
            print(f"--cache: {why} (or give D/store of `bench_memory.py --dir D --keep`)", file=sys.stderr)
            return 2
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
    print(f"{'batch':<10}{'read':<13}{'per-image loop':>16}{'PreparedData':>14}{'x':>7}"
          f"   (medians of {args.repeat} interleaved rounds)")
    gen = np.random.default_rng(0)
    for kind, ids in (("in order", np.arange(n)), ("random", gen.permutation(data.n)[:n])):
        reads = (("inputs", lambda: loop_inputs(data, ids), lambda: data.inputs(ids).numpy()),
                 ("text all", lambda: loop_text(data, ids, "all"), lambda: data.text(ids, "all")[0].numpy()),
                 ("text first", lambda: loop_text(data, ids, "first"), lambda: data.text(ids, "first")[0].numpy()))
        for name, loop, ours in reads:
            np.testing.assert_array_equal(ours(), loop())
            us = interleaved_us({"loop": loop, "ours": ours}, n, args.repeat)
            a, b = us["loop"], us["ours"]
            print(f"{kind:<10}{name:<13}{a:>16.2f}{b:>14.2f}{a / b:>7.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
