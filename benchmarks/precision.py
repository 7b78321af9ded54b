"""How far the scores of each sweep precision agree with IEEE float32's, and how fast each runs.

Scores are differences of two losses, so the UNet's arithmetic matters. On the embedded
digits model (trained on first use) with the demo's query and plan, this unlearns once, then
computes the before/after losses of every training image in each precision from the same
unlearned weights, and reports the Spearman correlation of the scores with fp32's, the
overlap of the top-10 and top-100, and the sweep time. Rows are written to --json as they
finish, so a run cut short keeps what it measured.

    python benchmarks/precision.py [--precisions fp32,bf16,fp16,mixed] [--json OUT]
    python benchmarks/precision.py --model M --train T --prompt "a <new1>"   # another model, e.g. fine-tuned
    python benchmarks/precision.py --device cuda --precisions fp32,tf32,bf16,fp16,mixed --batch-size auto \\
        --compile reduce-overhead --compile-precisions bf16,mixed --cpu-check 64    # the GPU check's row

--compile adds a row per --compile-precisions entry with the UNet under torch.compile (on CUDA,
"reduce-overhead" replays CUDA graphs); its first sweep, compilation included, is timed apart.
--cpu-check N also sweeps the first N images in fp32 on the CPU and reports the largest
relative difference of each precision's losses from the CPU's on those images.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# _common first: importing it puts the checkout ahead of any installed forgetscore.
from _common import Results, choice_list, int_range, json_path, make_sync, run_meta  # noqa: E402
from forgetscore.attribution.losses import COMPILE_MODES, PRECISIONS  # noqa: E402
from forgetscore.cli import batch_size_arg  # noqa: E402  (--batch-size as the forgetscore CLI takes it)
from forgetscore.kernels.validate import MAX_SEED  # noqa: E402


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra = np.argsort(np.argsort(a)).astype(np.float64)
    rb = np.argsort(np.argsort(b)).astype(np.float64)
    return float(np.corrcoef(ra, rb)[0, 1])


def overlap(a: np.ndarray, b: np.ndarray, k: int) -> float:
    k = min(k, len(a))
    return len(set(np.argsort(-a)[:k]) & set(np.argsort(-b)[:k])) / k


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 rounded to TF32's 10-bit mantissa (to nearest, ties away from zero), as tensor cores take it."""
    if x.dtype != torch.float32:
        return x
    bits = x.contiguous().view(torch.int32)
    return ((bits + 0x1000) & ~0x1FFF).view(torch.float32)


@contextlib.contextmanager
def emulated_tf32():
    """Convolutions, linear layers and attention on TF32-rounded inputs, accumulated in float32 (on the CPU).

    What TF32 tensor cores do to a float32 UNet, for a machine without them: an estimate of
    the tf32 precision's agreement before a GPU measures it.
    """
    import torch.nn.functional as F

    real = {name: getattr(F, name) for name in ("conv2d", "linear", "scaled_dot_product_attention")}

    def conv2d(x, w, *args, **kwargs):
        return real["conv2d"](tf32_round(x), tf32_round(w), *args, **kwargs)

    def linear(x, w, *args, **kwargs):
        return real["linear"](tf32_round(x), tf32_round(w), *args, **kwargs)

    def sdpa(q, k, v, *args, **kwargs):
        return real["scaled_dot_product_attention"](tf32_round(q), tf32_round(k), tf32_round(v), *args, **kwargs)

    F.conv2d, F.linear, F.scaled_dot_product_attention = conv2d, linear, sdpa
    try:
        yield
    finally:
        for name, fn in real.items():
            setattr(F, name, fn)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precisions", type=choice_list(PRECISIONS), default="fp32,bf16,fp16,mixed",
                        help="comma-separated, of " + ", ".join(PRECISIONS) + "; fp32 first is the reference")
    parser.add_argument("--device", default="cpu",
                        help="where the sweeps run: cpu (default), cuda or cuda:N")
    parser.add_argument("--batch-size", type=batch_size_arg, default=1024, help="rows per UNet call, or auto")
    parser.add_argument("--images", type=int_range(1), help="sweep only the first N training images (a quick run)")
    parser.add_argument("--compile", choices=COMPILE_MODES, help="also sweep under torch.compile with this mode")
    parser.add_argument("--compile-precisions", type=choice_list(PRECISIONS), default="fp32",
                        help="precisions of the compiled rows")
    parser.add_argument("--cpu-check", type=int_range(1, zero="no CPU check"), default=0, metavar="N",
                        help="compare every row's losses on the first N images with an fp32 CPU sweep")
    parser.add_argument("--emulate-tf32", action="store_true",
                        help="also a row of fp32 with every convolution, linear layer and attention on TF32-rounded "
                             "inputs (an estimate, on a CPU, of the tf32 precision of a GPU)")
    parser.add_argument("--json", type=json_path, metavar="OUT",
                        help="write the rows as JSON (rewritten after every row, so a run cut short keeps them)")
    parser.add_argument("--model", help="model directory (default: the embedded digits model)")
    parser.add_argument("--train", help="training folder of --model")
    parser.add_argument("--prompt", help="query prompt (default: the demo's)")
    parser.add_argument("--query-seed", type=int_range(0, MAX_SEED - 1), default=0)
    return parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if bool(args.model) != bool(args.train):
        parser.error("--model and --train go together")
    try:
        torch.device(args.device)
    except RuntimeError:
        parser.error(f"--device: {args.device!r} is not a device; give cpu, cuda or cuda:N")
    if "fp32" not in args.precisions:
        parser.error("--precisions: add fp32, the reference every other row is compared with")
    # Refused by the sweep only after the query is made, unlearned and swept in fp32: minutes in.
    if not args.device.startswith("cuda"):
        for option, names in (("--precisions", args.precisions),
                              ("--compile-precisions", args.compile_precisions if args.compile else ())):
            if "tf32" in names:
                parser.error(f"{option}: tf32 is a CUDA tensor-core mode; drop it or pass --device cuda")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    precisions = args.precisions
    # Before the model is trained and the query unlearned: minutes of work before the sweep would find out.
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        print(f"--device {args.device}: no CUDA device here; use --device cpu", file=sys.stderr)
        return 2

    from forgetscore import demo
    from forgetscore.attribution import Attributor, LossSweep, ScoringPlan, UnlearnConfig
    from forgetscore.cache import cache_root
    from forgetscore.digits.data import write_image_folder
    from forgetscore.digits.train import ensure_model

    if args.model:
        model_dir, train_dir = args.model, args.train
    else:
        model_dir = ensure_model(log=print)
        train_dir = cache_root() / "digits-train"
        if not (train_dir / "metadata.jsonl").is_file():
            write_image_folder(train_dir, overwrite=True)
    prompt = args.prompt or demo.DEFAULT_PROMPT
    plan = ScoringPlan.with_stride(demo.DEMO_STRIDE, captions="all", flips=False, seed=0)
    att = Attributor.load(model_dir, train_dir, plan=plan, batch_size=args.batch_size, progress=False,
                          device=args.device)
    dev = att.model.device
    sync = make_sync(dev)
    start = t = time.perf_counter()
    query = att.generate(prompt, args.query_seed, steps=demo.DEMO_SAMPLING_STEPS, guidance_scale=demo.DEMO_GUIDANCE)
    config = UnlearnConfig(steps=1, alpha=0.01, draws=demo.DEMO_DRAWS, micro_batch=250)
    data = att.prepare()
    weights = att.unlearn(query, prompt, config, fisher_samples=5 * data.n)
    sync()
    unlearn_s = time.perf_counter() - t
    indices = np.arange(min(args.images or data.n, data.n))
    captions = np.diff(np.asarray(data.caption_offsets))[indices].sum()
    rows_per_pass = 2 * int(captions) * len(plan.timesteps)
    result = Results(args.json, {**run_meta(dev), "images": len(indices), "rows_per_sweep": rows_per_pass,
                                 "batch_size": att.batch_size, "model": str(model_dir), "prompt": prompt,
                                 "unlearn_s": unlearn_s}, rows=[])
    meta, rows = result["meta"], result["rows"]
    print(f"torch {torch.__version__} on {meta['device_name']}, threads {meta['threads']}, {len(indices)} images, "
          f"{rows_per_pass} rows before + after, batch {att.batch_size}; query made and unlearned in "
          f"{unlearn_s:.1f}s; model {model_dir}, prompt {prompt!r}")

    cpu_losses = None
    if args.cpu_check:
        cpu_att = Attributor.load(model_dir, train_dir, plan=plan, batch_size=256, progress=False,
                                  cache_dir=att.cache_dir)
        cpu_weights = {k: v.cpu() for k, v in weights.items()}
        n = min(args.cpu_check, len(indices))
        cpu_losses = LossSweep(cpu_att.model, cpu_att.prepare(), plan, batch_size=256).run(
            [None, cpu_weights], indices[:n], progress=False)

    scores: dict[str, np.ndarray] = {}

    def measure(label: str, prec: str, compile_mode: str | None, emulate: bool = False) -> None:
        if label != "fp32" and "fp32" not in scores:
            raise RuntimeError("the fp32 row, the reference, failed: nothing to compare with")
        sweep = LossSweep(att.model, data, plan, batch_size=att.batch_size, precision=prec, compile=compile_mode)
        with emulated_tf32() if emulate else contextlib.nullcontext():
            t0 = time.perf_counter()
            sweep.run([None, weights], indices[:64], progress=False)  # warm-up (compilation, CUDA graph capture)
            sync()
            first = time.perf_counter() - t0
            t0 = time.perf_counter()
            losses = sweep.run([None, weights], indices, progress=False)
            sync()
            seconds = time.perf_counter() - t0
        scores[label] = (losses[1] - losses[0]).max(axis=1)
        ref = scores.get("fp32", scores[label])
        row = {"precision": label, "seconds": seconds, "warmup_s": first, "rows_per_s": rows_per_pass / seconds,
               "spearman": spearman(scores[label], ref), "top10": overlap(scores[label], ref, 10),
               "top100": overlap(scores[label], ref, 100)}
        if cpu_losses is not None:
            n = cpu_losses.shape[1]
            row["max_rel_vs_cpu"] = float(np.abs(losses[:, :n] / cpu_losses - 1).max())
        row["speedup"] = rows[0]["seconds"] / seconds if rows else 1.0
        rows.append(row)

    # fp32 first: every other row is compared with it (a row that fails is reported, the rest still run).
    steps = [(p, lambda p=p: measure(p, p, None)) for p in sorted(precisions, key=lambda p: p != "fp32")]
    if args.compile:
        steps += [(f"{p}+{args.compile}", lambda p=p: measure(f"{p}+{args.compile}", p, args.compile))
                  for p in args.compile_precisions]
    if args.emulate_tf32:
        steps.append(("tf32 (emulated)", lambda: measure("tf32 (emulated)", "fp32", None, emulate=True)))
    result.run_steps(steps)
    return result.finish(start, report)


def report(result: dict) -> str:
    rows = result["rows"]
    cpu = any("max_rel_vs_cpu" in r for r in rows)
    lines = [f"{'precision':<24}{'sweep s':>9}{'warm-up s':>10}{'rows/s':>11}{'x fp32':>8}{'spearman':>10}"
             f"{'top-10':>8}{'top-100':>9}" + (f"{'rel. vs CPU':>13}" if cpu else "")]
    for r in rows:
        lines.append(f"{r['precision']:<24}{r['seconds']:>9.2f}{r['warmup_s']:>10.2f}{r['rows_per_s']:>11.0f}"
                     f"{r['speedup']:>8.2f}{r['spearman']:>10.4f}{r['top10']:>8.2f}{r['top100']:>9.2f}"
                     + (f"{r['max_rel_vs_cpu']:>13.2e}" if "max_rel_vs_cpu" in r else ""))
    note = trivial_overlap_note(result["meta"].get("images"))
    return "\n".join(lines + ([note] if note else []))


def trivial_overlap_note(images: int | None) -> str:
    """What the top-k columns cannot tell when k is at least the number of images scored."""
    trivial = [k for k in (10, 100) if images is not None and k >= images]
    if not trivial:
        return ""
    cols = " and ".join(f"top-{k}" for k in trivial)
    return (f"{cols}: {images} images, so the top-k holds every image and the overlap is 1.00 whatever the scores "
            f"(k >= number of images); sweep more images (--images) for a telling overlap")


if __name__ == "__main__":
    sys.exit(main())
