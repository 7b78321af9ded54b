"""Reading a prepared store leaves none of its pages resident in the process.

A sweep over a store of millions of images touches every shard; if the memory-mapped
pages stayed mapped, the process's resident set would grow to the size of the store.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import fresh_seed
from forgetscore.attribution import PreparedData
from forgetscore.attribution.data import CACHE_FORMAT
from forgetscore.attribution.io import write_json, write_npy

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/smaps")

SHARD, SHARDS = 2048, 3
INPUT_SHAPE, TEXT_SHAPE = (4, 8, 8), (4, 16)
MIB = 1 << 20


def _store(root: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    n = SHARD * SHARDS
    inputs = rng.standard_normal((n, 2, *INPUT_SHAPE), dtype=np.float32)
    text = rng.standard_normal((n, *TEXT_SHAPE), dtype=np.float32)
    root.mkdir()
    shards = []
    for s in range(SHARDS):
        entry = {"inputs": f"inputs-{s:05d}.npy", "text": f"text-{s:05d}.npy", "images": [s * SHARD, (s + 1) * SHARD]}
        write_npy(root / entry["inputs"], inputs[s * SHARD:(s + 1) * SHARD])
        write_npy(root / entry["text"], text[s * SHARD:(s + 1) * SHARD])
        shards.append(entry)
    write_npy(root / "caption_offsets.npy", np.arange(n + 1, dtype=np.int64))
    write_json(root / "manifest.json", {"format": CACHE_FORMAT, "encoders_id": "e", "data_id": "d", "n_images": n,
                                        "input_shape": list(INPUT_SHAPE), "shard_size": SHARD,
                                        "text_dtype": "float32", "shards": shards, "complete": True,
                                        "text_shape": list(TEXT_SHAPE)})
    return inputs, text


def _resident(root: Path) -> int:
    """Bytes of the files under `root` mapped into this process and resident (from /proc/self/smaps)."""
    total, inside = 0, False
    prefix = str(root.resolve())
    with open("/proc/self/smaps") as fh:
        for line in fh:
            head = line.split()
            if head and "-" in head[0] and ":" not in head[0]:  # a mapping's first line: range perms offset dev inode path
                inside = len(head) >= 6 and head[5].startswith(prefix)
            elif inside and head and head[0] == "Rss:":
                total += int(head[1]) * 1024
    return total


def test_reads_leave_no_store_pages_resident(tmp_path):
    rng = np.random.default_rng(fresh_seed("data"))
    root = tmp_path / "store"
    inputs, text = _store(root, rng)
    store_bytes = inputs.nbytes + text.nbytes  # 18 MiB, in the page cache since just written

    # The measure sees mapped pages: reading the same files through plain memory maps leaves them resident.
    maps = [np.load(root / f"inputs-{s:05d}.npy", mmap_mode="r") for s in range(SHARDS)]
    assert sum(float(m.sum()) for m in maps) == pytest.approx(float(inputs.sum(dtype=np.float64)), rel=1e-4)
    assert _resident(root) > 0.9 * inputs.nbytes
    del maps
    assert _resident(root) == 0

    data = PreparedData(root)
    peak = 0
    orders = {"in order": np.arange(data.n), "strided": np.arange(5, data.n, 7), "shuffled": rng.permutation(data.n)}
    for name, ids in orders.items():
        for a in range(0, len(ids), 512):
            batch = ids[a:a + 512]
            np.testing.assert_array_equal(data.inputs(batch).numpy(), inputs[batch], err_msg=name)
            got, counts = data.text(batch, "all")
            np.testing.assert_array_equal(got.numpy(), text[batch], err_msg=name)
            assert counts == [1] * len(batch)
            peak = max(peak, _resident(root))
    assert peak <= 64 * 1024, f"{peak / MIB:.1f} MiB of the {store_bytes / MIB:.0f} MiB store stayed resident"
