"""The `forgetscore` command: info, demo, prepare, fisher, score, attribute, report, evaluate."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
import time
import warnings
from pathlib import Path

from . import __version__

EPILOGS = {
    "info": "examples:\n  forgetscore info\n  forgetscore info --no-self-test",
    "demo": "examples:\n  forgetscore demo --out demo-run\n"
            "  forgetscore demo --out run2 --prompt 'a thick handwritten seven' --topk 20",
    "prepare": "example:\n  forgetscore prepare --model my-model/ --train my-images/",
    "fisher": "example:\n  forgetscore fisher --model my-model/ --train my-images/ --fisher-samples 20000",
    "score": "example:\n  forgetscore score --model my-model/ --train my-images/ --timestep-stride 50",
    "attribute": "examples:\n  forgetscore attribute --model m/ --train t/ --query q.png --prompt 'a red bus' --out r/\n"
                 "  forgetscore attribute --model m/ --train t/ --generate-seed 3 --prompt 'a red bus' --out r/ "
                 "--preset custom --region 0,0,32,32\n"
                 "  forgetscore attribute --model m/ --train t/ --queries list.jsonl --out results/",
    "report": "example:\n  forgetscore report --out r/",
    "cache": "examples:\n  forgetscore cache\n  forgetscore cache --remove-stale\n"
             "  forgetscore cache --cache my-cache/\n\n"
             "Lists the folders under the cache root ($FORGETSCORE_CACHE, else ~/.cache/forgetscore); a folder\n"
             "given to --cache in a run is listed with --cache. --remove-stale deletes the folders none of whose\n"
             "training folders still has the contents they were made from (changed or gone) or that record none,\n"
             "and interrupted sweeps of losses the cache holds finished; a folder a running job holds is skipped.",
}


def batch_size_arg(text: str) -> int | str:
    """A batch-size option (--batch-size, --fisher-batch-size): an int >= 1, or `auto`."""
    if text == "auto":
        return text
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is neither an int >= 1 nor 'auto'")
    return value


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model and data")
    g.add_argument("--model", required=True, help="model directory (diffusers save_pretrained layout)")
    g.add_argument("--train", required=True, help="training image folder with metadata.jsonl")
    g.add_argument("--cache", help="cache directory for prepared data, Fisher and losses "
                                   "(default: under $FORGETSCORE_CACHE or ~/.cache/forgetscore)")
    g.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    g.add_argument("--backend", default="auto", choices=["auto", "torch", "cpu", "triton", "cuda"],
                   help="kernel backend (default: auto)")
    g.add_argument("--resize", action="store_true",
                   help="resize images of another size than the model's: scaled to cover it, then the centre "
                   "cut out (proportions kept, as diffusers' training scripts do)")
    g.add_argument("--text-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="how the prepared caption states are stored: a half-width store halves the cache and the "
                        "bytes each sweep reads; under --precision bf16 (fp16) a bfloat16 (float16) store changes "
                        "no sweep loss where the states go straight into linear layers, as in Stable Diffusion's "
                        "UNet (default: float32)")


def _add_weights_arg(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights")
    g.add_argument("--weights", default="kv", help="weights to unlearn: kv, cross-attn, attn, all, or a regex "
                                                   "(default: kv)")


def _add_sweep_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring sweep")
    g.add_argument("--batch-size", type=batch_size_arg, default="auto",
                   help="UNet rows per forward pass, or auto (the default): the largest power of two that fits in "
                        "free GPU memory (probed, at most 4096), 256 on the CPU")
    g.add_argument("--chunk-size", type=int, default=4096,
                   help="images per resumable chunk of a sweep; torchrun ranks share chunks (default: 4096)")
    g.add_argument("--precision", choices=["auto", "fp32", "tf32", "bf16", "fp16", "mixed"], default="auto",
                   help="UNet precision of the scoring sweeps: fp32 is IEEE float32 (on CUDA too), tf32 tensor "
                        "cores (CUDA), bf16/fp16 autocast, mixed (bf16 but the UNet's last up block and output "
                        "layer in float32, TF32 on CUDA); losses stay float32. auto (the default): tf32 on CUDA, "
                        "fp32 elsewhere, as measured in benchmarks/RESULTS.md")
    g.add_argument("--no-prefetch", action="store_true",
                   help="do not prepare the next batch's inputs in a background thread during the current one")
    g.add_argument("--compile", nargs="?", const="auto", default=None,
                   choices=["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"],
                   help="run the sweeps' UNet under torch.compile with this mode; auto (the default when given "
                        "without a mode): max-autotune (with CUDA graphs) on CUDA, default on the CPU")


def _add_version_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("captions and flips (of the scores and the Fisher's samples)")
    g.add_argument("--captions", choices=["all", "first"], default="all", help="captions per image (default: all)")
    g.add_argument("--no-flips", action="store_true", help="do not score horizontal flips")


def _add_plan_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("scoring plan")
    g.add_argument("--timestep-stride", type=int,
                   help="score timesteps 0, s, 2s, ... below the model's num_train_timesteps (default: 50)")
    g.add_argument("--timesteps", help="explicit comma-separated timesteps (instead of --timestep-stride)")
    g.add_argument("--seed", type=int, default=0, help="noise seed of the plan (default: 0)")
    g.add_argument("--noise", choices=["keyed", "reference"], default="keyed",
                   help="keyed: noise per (seed, image, draw), independent of batching (default); reference: "
                        "the published implementation's torch.randn per batch, seeded seed + batch index")
    g.add_argument("--reference-batch", type=int,
                   help="with --noise reference: images per batch of the published loop (its --batch_size / "
                        "(captions x timesteps); MSCOCO: 80)")
    g.add_argument("--noise-device", choices=["cpu", "cuda"],
                   help="with --noise reference: the generator's device kind (default: cuda, as published)")


# The option groups a command may take beyond the model and data; see _command_args.
_GROUPS = (_add_weights_arg, _add_sweep_args, _add_version_args, _add_plan_args)


def _command_args(p: argparse.ArgumentParser, *groups) -> None:
    """The model-and-data options and `groups` of _GROUPS. A group the command does not take is not shown in its
    help; its options keep their defaults (the Attributor is built from them, and nothing the command does reads
    them otherwise)."""
    _add_model_args(p)
    for add in _GROUPS:
        if add in groups:
            add(p)
        else:
            scratch = argparse.ArgumentParser(add_help=False)
            add(scratch)
            p.set_defaults(**vars(scratch.parse_args([])))


def _add_fisher_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Fisher")
    g.add_argument("--fisher-samples", type=int, help="samples (default: 5 x training-set size, as the paper, "
                   "or, when that is not cached, the largest count cached for these settings)")
    g.add_argument("--fisher-batch-size", type=batch_size_arg,
                   help="samples per backward pass, or auto (default: auto: the largest power of two up to 512 "
                        "that fits in free GPU memory, probed; 64 on the CPU)")
    g.add_argument("--fisher-chunk-size", type=int,
                   help="samples per resumable chunk, the unit shared among torchrun ranks (default: 16384)")


def _add_unlearn_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("unlearning")
    g.add_argument("--preset", choices=["mscoco", "custom"], default="mscoco",
                   help="the paper's settings: mscoco (1 step, alpha 0.01, 50000 draws) or custom "
                        "(100 steps, alpha 0.1, 160 draws in backward passes of 16; pair it with "
                        "--timestep-stride 100, and for a model pretrained on more images than --train holds, "
                        "--n-train: 400000000 for Stable Diffusion, as published)")
    g.add_argument("--steps", type=int, help="unlearning steps (default: the preset's)")
    g.add_argument("--alpha", type=float, help="step size (default: the preset's)")
    g.add_argument("--draws", type=int, help="(noise, timestep) draws per step")
    g.add_argument("--micro-batch", type=int,
                   help="draws per backward pass (default: the preset's); each pass draws distinct timesteps, so "
                        "this sets how the timesteps are sampled, and another value gives other draws and scores")
    g.add_argument("--damping", type=float, help="lambda = damping x mean(F) per layer (default 0)")
    g.add_argument("--n-train", type=int,
                   help="N of the Newton step alpha / N: the number of images the model was trained on "
                        "(default: the training folder's size)")
    g.add_argument("--method", choices=["newton", "sgd"],
                   help="newton: the Fisher-preconditioned step; sgd: the ablation without the Fisher "
                        "(default: the preset's, newton)")
    g.add_argument("--reduce", choices=["max", "mean"], default="max", help="over flips (default: max)")
    g.add_argument("--region", help="unlearn only a box of the query: x0,y0,x1,y1 in pixels")


def _plan(args: argparse.Namespace):
    from .attribution import ScoringPlan
    common = {"captions": args.captions, "flips": not args.no_flips, "seed": args.seed, "noise": args.noise,
              "reference_batch": args.reference_batch, "noise_device": args.noise_device}
    if args.timesteps is not None:
        if args.timestep_stride is not None:  # one would be silently ignored
            raise ValueError("--timesteps: give either the timesteps or --timestep-stride, not both")
        try:
            ts = tuple(int(t) for t in args.timesteps.split(","))
        except ValueError:
            raise ValueError(f"--timesteps: {args.timesteps!r} is not a comma-separated list of integers") from None
        return ScoringPlan(timesteps=ts, **common)
    stride = 50 if args.timestep_stride is None else args.timestep_stride
    return ScoringPlan.with_stride(stride, _train_timesteps(args.model), **common)


def _train_timesteps(model: str) -> int:
    """The scheduler's num_train_timesteps of the model folder (1000, the usual, if its config cannot be read:
    loading the model then says why), so that a stride spans the model's own range."""
    try:
        config = json.loads((Path(model) / "scheduler" / "scheduler_config.json").read_text())
        return int(config.get("num_train_timesteps", 1000))
    except (OSError, ValueError, TypeError, AttributeError):
        return 1000


def _attributor(args: argparse.Namespace):
    from .attribution import Attributor
    from .attribution.io import check_writable
    if args.cache is not None:
        check_writable(args.cache, "--cache")
    fisher = {k: getattr(args, k) for k in ("fisher_batch_size", "fisher_chunk_size")
              if getattr(args, k, None) is not None}  # only the commands that compute a Fisher take these
    return Attributor.load(args.model, args.train, plan=_plan(args), weights=args.weights, cache_dir=args.cache,
                           batch_size=args.batch_size, backend=args.backend, device=args.device,
                           resize=args.resize, chunk_size=args.chunk_size, precision=args.precision,
                           prefetch=not args.no_prefetch, compile=args.compile, text_dtype=args.text_dtype,
                           **fisher)


def _config(args: argparse.Namespace):
    from .attribution import preset
    over = {k: getattr(args, k) for k in ("steps", "alpha", "draws", "micro_batch", "damping", "method", "n_train")
            if getattr(args, k) is not None}
    return preset(args.preset, seed=args.seed, **over)


def _region(text: str | None):
    if text is None:
        return None
    try:
        box = [int(v) for v in text.split(",")]
    except ValueError:
        box = []
    if len(box) != 4:
        raise ValueError(f"--region: {text!r} is not x0,y0,x1,y1")
    return box


def _subset(path: str | None, file_names: list[str], report: bool = True):
    """The ids a --subset file lists (None without one); `report`: say how many lines repeat an image."""
    if not path:
        return None
    import numpy as np

    from .attribution.data import name_key
    position = {name_key(name): i for i, name in enumerate(file_names)}
    try:
        with open(path, encoding="utf-8-sig") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError as exc:
        raise ValueError(f"--subset: cannot read {path!r} ({exc})") from None
    except UnicodeDecodeError as exc:
        raise ValueError(f"--subset: {path!r} is not UTF-8 text ({exc.reason}); give one file name or position "
                         "per line") from None
    ids = []
    for line in lines:
        key = name_key(line)
        if key in position:
            ids.append(position[key])
        elif line.isascii() and line.isdecimal() and int(line) < len(file_names):
            ids.append(int(line))
        elif line.startswith("#"):  # a comment (a file name starting with "#" was taken above)
            continue
        else:
            raise ValueError(f"--subset: {line!r} is neither a file name of the training set nor a position "
                             f"below {len(file_names)}")
    if not ids:
        raise ValueError(f"--subset: {path!r} lists no image")
    repeated = len(ids) - len(set(ids))
    if repeated and report:  # each image is scored once
        kept = len(set(ids))
        print(f"--subset: {repeated} of its {len(ids)} lines name an image listed before; {kept} "
              f"image{' is' if kept == 1 else 's are'} scored", file=sys.stderr)
    return np.array(ids, dtype=np.int64)


def _print_timings(att, started: float) -> None:
    print("\ntime per stage:")
    for line in att.timings.lines(total=time.perf_counter() - started):
        print(line)


# --- subcommands ------------------------------------------------------------------------------
def _info(args: argparse.Namespace) -> int:
    from .info import report
    text, ok = report(run_self_test=not args.no_self_test)
    print(text)
    return 0 if ok else 1


def _prepare(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _attributor(args) as att:
        data = att.prepare()
    if att.rank == 0:
        print(f"prepared {data.n} images into {data.dir}")
        _print_timings(att, started)
    return 0


def _fisher(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _attributor(args) as att:
        fisher = att.fisher(args.fisher_samples)
    if att.rank:
        return 0
    total = sum(f.numel() for f in fisher.values())
    print(f"Fisher of {len(fisher)} tensors ({total:,} weights); mean per tensor "
          f"{min(float(f.mean()) for f in fisher.values()):.2e} .. {max(float(f.mean()) for f in fisher.values()):.2e}; "
          f"cached in {att.cache_dir}")
    _print_timings(att, started)
    return 0


def _score(args: argparse.Namespace) -> int:
    started = time.perf_counter()
    with _attributor(args) as att:
        before = att.before_losses()
    if att.rank:
        return 0
    versions = "2 versions (as is and flipped)" if before.shape[1] == 2 else "1 version (no flips)"
    print(f"before-unlearning losses of {before.shape[0]} images x {versions}: "
          f"mean {before.mean():.4e}; cached in {att.cache_dir}")
    _print_timings(att, started)
    return 0


def _attribute(args: argparse.Namespace) -> int:
    # What the run holds until it ends, however it ends: its claim on --out, the cache folder.
    with contextlib.ExitStack() as held:
        return _attribute_holding(args, held)


def _attribute_holding(args: argparse.Namespace, held: contextlib.ExitStack) -> int:
    from .attribution.attributor import generation_record
    from .attribution.io import check_writable
    from .attribution.locks import claim_folder
    from .attribution.results import RESULT_FILES, check_output_dir
    from .attribution.ranks import agree, distributed_env
    started = time.perf_counter()
    rank = distributed_env()[0]

    def options():  # checked before the model loads and the long stages run (on every rank: see ranks.agree)
        specs = _query_specs(args)
        outs = [Path(args.out) / s.name if args.queries else Path(args.out) for s in specs]
        if rank == 0:  # the rank that writes the results
            check_writable(args.out, "--out")
            # Claimed first: a second run into the same --out is refused now, not when it saves hours later.
            held.enter_context(claim_folder(Path(args.out), "--out"))
            for out in outs:
                check_output_dir(out, args.overwrite)
        if args.topk < 1:
            raise ValueError(f"--topk: {args.topk} must be >= 1")
        return specs, outs, _config(args), _region(args.region)

    specs, outs, config, region = agree(options)
    att = held.enter_context(_attributor(args))

    def queries_and_subset():
        subset = _subset(args.subset, att.train.file_names, report=att.rank == 0)  # before the queries are made
        for s in specs:
            if s.query is not None and args.queries:  # read before any is generated; a bad one named by its line
                try:
                    att.query_inputs(s.query)
                except ValueError as exc:
                    raise ValueError(f"--queries: line {s.line}: {str(exc).removeprefix('query: ')}") from None
        return subset

    subset = agree(queries_and_subset)
    queries = [(s.query if s.query is not None else att.generate(s.prompt, s.generate_seed), s.prompt)
               for s in specs]
    # All queries in one pass over the training set.
    # The pass's chunks stay in the cache until the results are saved: a save that fails (a full disk) then
    # costs a rerun the unlearning steps, not the sweep.
    results = att.attribute_many(queries, k=args.topk, config=config, region=region, reduce=args.reduce,
                                 fisher_samples=args.fisher_samples, indices=subset, keep_sweeps=True)

    def save() -> None:
        for spec, result, out in zip(specs, results, outs) if att.rank == 0 else ():
            if spec.generate_seed is not None:  # what makes the query again (query.png is only its 8-bit picture)
                result.metadata["generated"] = generation_record(spec.generate_seed)
            result.save(out, train_dir=args.train, k=args.topk, overwrite=args.overwrite)

    try:
        agree(save)
    except ValueError:
        # A refusal (results that appeared in --out during the run, a training folder changed under it, whose
        # rerun would sweep other data): the sweep's chunks are not kept for a rerun that may never come. A
        # failure of the disk (full, a quota) or an interruption keeps them: the same command, run again once
        # there is room, reads them rather than sweep again.
        att.forget_sweeps()
        raise
    att.forget_sweeps()
    if att.rank:
        return 0
    for spec, result in zip(specs, results):
        if args.queries:
            print(f"\n{spec.name}:", end="")
        _print_top(result, args.topk)
    where = f"{args.out}/<name>/" if args.queries else f"{args.out}/"
    print(f"\nresults in {where} ({', '.join(RESULT_FILES)})")
    _print_timings(att, started)
    return 0


def _query_specs(args: argparse.Namespace) -> list:
    """The run's queries: those of --queries, or the one of --query / --generate-seed with --prompt."""
    from .query_list import QuerySpec, read_queries

    if args.queries is not None:
        given = [flag for flag, value in (("--query", args.query), ("--generate-seed", args.generate_seed),
                                          ("--prompt", args.prompt)) if value is not None]
        if given:
            raise ValueError(f"--queries: the list gives each query and prompt; drop {', '.join(given)}")
        return read_queries(args.queries)
    if (args.query is None) == (args.generate_seed is None):
        raise ValueError("--query/--generate-seed: give exactly one: an image file, or a seed to generate the "
                         "query from the prompt (or --queries: a list of them)")
    if args.generate_seed is not None and not 0 <= args.generate_seed < 2 ** 64:
        raise ValueError(f"--generate-seed: {args.generate_seed} is outside [0, 2**64); give a non-negative seed")
    if args.prompt is None:
        raise ValueError("--prompt: required with --query or --generate-seed: the words the picture was made from")
    if not args.prompt.strip():
        raise ValueError(f"--prompt: {args.prompt!r} has no words; give the words the picture was made from, e.g. "
                         "--prompt 'a red bus'")
    # The query's path as recorded in attribution.json: absolute, as the model's and training folder's are.
    return [QuerySpec(name="", prompt=args.prompt, query=Path(args.query).resolve() if args.query else None,
                      generate_seed=args.generate_seed)]


def _print_top(result, k: int) -> None:
    records = result.top_records(k)  # fewer when fewer images were scored
    print(f"\ntop {len(records)} training images for {result.prompt!r}:")
    for rec in records:
        # The last caption, as the demo prints: the digits' last is their fullest.
        print(f"  {rec['rank']:>3}. {rec['file_name']:<16} score {rec['score']:+.4e}  {rec['captions'][-1]}")


# The Python names of redraw's arguments and the report options that give them.
_REPORT_FLAGS = {"out": "--out", "train": "--train", "train_dir": "--train", "k": "--topk",
                 "report_dir": "--report-dir"}


def _report_flag(message: str) -> str:
    """`message` with a leading Python argument name written as the report option that gives it."""
    name, sep, rest = message.partition(": ")
    return f"{_REPORT_FLAGS[name]}: {rest}" if sep and name in _REPORT_FLAGS else message


def _report(args: argparse.Namespace) -> int:
    from .attribution.io import check_writable
    from .attribution.locks import claim_folder
    from .attribution.results import check_result_dir, redraw

    if args.topk is not None and args.topk < 1:
        raise ValueError(f"--topk: {args.topk} must be >= 1")
    check_result_dir(args.out)  # a file or a missing folder said as such, not as a place that cannot be written
    to = Path(args.out if args.report_dir is None else args.report_dir)
    check_writable(to, "--out" if args.report_dir is None else "--report-dir")
    shown = warnings.showwarning

    def show(message, category, *rest):
        shown(_report_flag(str(message)), category, *rest)

    warnings.showwarning = show
    try:
        # Not while an `attribute` run is to write into the folder (each clears what killed saves left there).
        with claim_folder(to, "--out" if args.report_dir is None else "--report-dir"):
            result, k = redraw(args.out, args.topk, args.train, args.report_dir)
    except ValueError as exc:
        raise ValueError(_report_flag(str(exc))) from None
    except OSError as exc:
        named = OSError(_report_flag(str(exc)))
        named.errno = exc.errno
        raise named from None
    finally:
        warnings.showwarning = shown
    _print_top(result, k)
    print(f"\nrewrote {to / 'gallery.png'} and {to / 'report.html'}")
    return 0


def _cache(args: argparse.Namespace) -> int:
    from .attribution.cache_index import describe, fmt_size, remove_stale, run_entry, scan
    from .cache import cache_root

    if args.cache is not None:  # one folder of a job's own, outside the cache root
        folder = Path(args.cache)
        if not folder.is_dir():
            raise ValueError(f"--cache: {args.cache!r} is not a folder; give a folder that --cache named in a run")
        root, entries = folder.resolve().parent, [run_entry(folder.resolve())]
        e = entries[0]
        print(f"{e.path} ({fmt_size(e.size)}): {e.what}")
    else:
        root = cache_root()
        if root.exists() and not root.is_dir():
            named = "FORGETSCORE_CACHE" if "FORGETSCORE_CACHE" in os.environ else "cache"
            raise ValueError(f"{named}: {str(root)!r} is a file, not a folder; point {named} at a folder")
        if not root.is_dir():
            print(f"cache {root}: nothing cached yet ($FORGETSCORE_CACHE moves it)")
            return 0
        entries = scan(root)
        for line in describe(entries, root):
            print(line)
    if args.remove_stale:
        removed, busy, failed = remove_stale(entries)
        for e in removed:
            print(f"removed {e.path.relative_to(root)}")
        for e in busy:
            print(f"left {e.path.relative_to(root)}: a job is working in it; run again once it is done")
        for why in failed:
            print(f"forgetscore cache: error: {why}; check its permissions (or what holds its files open) and run "
                  "again", file=sys.stderr)
        if not removed and not busy and not failed:
            print("nothing stale to remove")
        return 1 if failed else 0
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .attribution.io import check_writable
    from .demo import run_demo

    check_writable(args.out, "--out")
    return run_demo(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="forgetscore",
        description="Find which training images a text-to-image diffusion model drew on to make a picture, "
                    "by unlearning the picture and measuring whose training loss rises.",
        epilog="Start with `forgetscore demo --out demo-run`. Each command has --help.",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def add(name: str, help_: str, func) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=EPILOGS[name],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("info", "versions, kernel backends and a self-test of each against the PyTorch reference", _info)
    p.add_argument("--no-self-test", action="store_true", help="only list versions and backends")

    p = add("demo", "run the whole method on the embedded digits model (trained on first use, then cached)",
            _demo)
    p.add_argument("--out", required=True, help="output directory (must not hold results already)")
    p.add_argument("--prompt", default=None,
                   help="the query prompt, in the digit captions' words (default: a slanted seven)")
    p.add_argument("--query-seed", type=int, default=0, help="seed of the generated query (default: 0)")
    p.add_argument("--topk", type=int, default=10, help="how many top training images to print and save "
                                                        "(default: 10)")
    p.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p.add_argument("--retrain", action="store_true", help="train the digits model again even if cached")

    p = add("prepare", "encode the training images (and flips) and captions once, into the cache", _prepare)
    _command_args(p)
    p = add("fisher", "compute the diagonal Fisher of the selected weights over the training data", _fisher)
    _command_args(p, _add_weights_arg, _add_version_args)
    _add_fisher_args(p)
    p = add("score", "compute the original model's per-image losses under the plan (cached)", _score)
    _command_args(p, _add_sweep_args, _add_version_args, _add_plan_args)
    p = add("attribute", "unlearn a query image and rank the training set by loss increase", _attribute)
    _command_args(p, *_GROUPS)
    _add_fisher_args(p)
    _add_unlearn_args(p)
    g = p.add_argument_group("query and output")
    g.add_argument("--prompt", help="the query's prompt")
    g.add_argument("--query", help="query image file (the model's image size)")
    g.add_argument("--generate-seed", type=int, help="instead of --query: generate the query from --prompt")
    g.add_argument("--queries", help="instead: a JSON-lines list of queries, one result folder each under --out, "
                                     'all scored in one pass; lines like {"query": "q.png", "prompt": "a red bus"} '
                                     'or {"generate_seed": 3, "prompt": "a red bus", "name": "bus-3"}')
    g.add_argument("--topk", type=int, default=10, help="how many top training images to print and save "
                                                        "(default: 10)")
    g.add_argument("--subset", help="score only these training images: a file with one file name (or image id: "
                                    "0 for the first image metadata.jsonl lists) per line, e.g. the top-M of a "
                                    "cheaper ranking")
    g.add_argument("--out", required=True, help="output directory")
    g.add_argument("--overwrite", action="store_true", help="replace results already in --out")
    p = add("report", "redraw gallery.png and report.html of a result directory", _report)
    p.add_argument("--out", required=True, help="a directory written by attribute or demo")
    p.add_argument("--topk", type=int, help="how many images to show (default: as saved)")
    p.add_argument("--train", help="the training folder, if it moved since (default: as saved)")
    p.add_argument("--report-dir", help="write gallery.png and report.html into this folder instead, leaving --out "
                                        "as it is (a result on a read-only disk); --train is then not recorded")
    p = add("cache", "list what the cache holds, by training folder, with sizes; remove what nothing reads", _cache)
    p.add_argument("--remove-stale", action="store_true",
                   help="delete the cache folders whose training folders all changed or are gone since (or that "
                        "record none), and interrupted sweeps whose losses are cached")
    p.add_argument("--cache", help="a folder given to --cache in a run: list (and with --remove-stale, delete if "
                                   "stale) that one instead of the cache root's")
    from .evaluation.cli import add_parser as add_evaluate
    add_evaluate(sub)
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM (what batch schedulers and Kubernetes send to stop a job), raised where the command is so that its
    clean-ups run (locks released, temporary files removed), as they do on Ctrl-C."""


def _terminated(signum, frame) -> None:
    raise Terminated()


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # A line at a time, redirected too: the lines a long command printed are in its log even if it is killed.
    with contextlib.suppress(AttributeError, ValueError, OSError):
        sys.stdout.reconfigure(line_buffering=True)
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    shown = warnings.showwarning
    warnings.showwarning = _warning_line(args.command, shown)
    # Only the main thread may set a handler (a caller may run main() in another). Not under torchrun: a rank
    # waiting in a collective (on a GPU, for a rank that is gone) would run a Python handler only once that wait
    # ends, after torchrun's grace period and its SIGKILL; ended by the signal at once, its locks go with it.
    handles = threading.current_thread() is threading.main_thread() and int(os.environ.get("WORLD_SIZE", "1")) <= 1
    stopping = signal.signal(signal.SIGTERM, _terminated) if handles else None
    try:
        _join_ranks(args)
        return args.func(args)
    except ValueError as exc:
        _close_bars()
        print(f"forgetscore {args.command}: error: {_as_flag(str(exc), parser, argv)}", file=sys.stderr)
        return 2
    except OSError as exc:  # the filesystem: a full disk, permissions, a path that went away
        _close_bars()
        print(f"forgetscore {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except RuntimeError as exc:
        from .attribution.memory import BatchOutOfMemory, is_out_of_memory, summary

        if not is_out_of_memory(exc):
            raise
        _close_bars()
        message = (_as_flag(str(exc), parser, argv) if isinstance(exc, BatchOutOfMemory) else
                   f"out of GPU memory ({summary(exc)}); free GPU memory, or give smaller batches (--batch-size, "
                   "--fisher-batch-size, --micro-batch)")
        print(f"forgetscore {args.command}: error: {message}", file=sys.stderr)
        return 1
    except Exception as exc:
        # safetensors' own error type carries a failed write's OS error (a full disk) as text.
        if type(exc).__name__ != "SafetensorError" or "os error" not in str(exc):
            raise
        _close_bars()
        print(f"forgetscore {args.command}: error: could not write model weights ({exc}); free space where they "
              "go (the cache: FORGETSCORE_CACHE, --cache; or --out) and run again", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:
        _close_bars()
        if isinstance(exc, Terminated):
            print("terminated by SIGTERM; finished stages are cached and a rerun resumes from them", file=sys.stderr)
            return 128 + int(signal.SIGTERM)
        print("interrupted; finished stages are cached and a rerun resumes from them", file=sys.stderr)
        return 130
    finally:
        if handles:  # before the last clean-up: a second SIGTERM there ends the process as it used to
            signal.signal(signal.SIGTERM, signal.SIG_DFL if stopping is None else stopping)
        warnings.showwarning = shown
        from .attribution.ranks import leave_distributed

        leave_distributed()


# The commands that share their work between torchrun's ranks; the others run in one process.
RANK_COMMANDS = ("prepare", "fisher", "score", "attribute")


def _join_ranks(args: argparse.Namespace) -> None:
    """Under torchrun, join the ranks before any check: a check failing on one rank alone then stops every
    rank at once (see ranks.agree), where a rank that stopped before joining left the others waiting."""
    from .attribution.ranks import distributed_env, init_distributed, rank_device

    world = distributed_env()[1]
    if world <= 1 or args.command == "info":
        return
    if args.command not in RANK_COMMANDS:
        raise ValueError(f"{args.command} runs in one process, but torchrun started {world}; run it without "
                         f"torchrun (only {', '.join(RANK_COMMANDS)} share their work between ranks)")
    import torch

    try:
        device = torch.device(rank_device(args.device))
    except (RuntimeError, ValueError):
        raise ValueError(f"--device: {args.device!r} is not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device: {args.device!r}, but torch sees no CUDA device here; use --device cpu")
    init_distributed(device)


def _warning_line(command: str, shown):
    """Show this package's own warnings as one line, as its errors are (a warning is advice to the user, whose
    source line in this package would mean nothing to them); other packages' warnings as `shown` does."""
    package = str(Path(__file__).resolve().parent)

    def show(message, category, filename, lineno, file=None, line=None):
        ours = issubclass(category, (UserWarning, RuntimeWarning))  # RuntimeWarning: the kernels' fallback notice
        if ours and str(Path(filename).resolve()).startswith(package + os.sep):
            print(f"forgetscore {command}: warning: {message}", file=file or sys.stderr)
        else:
            shown(message, category, filename, lineno, file, line)
    return show


# The library names its arguments as Python does; these are its names for options spelt otherwise here.
_PY_NAMES = {"samples": "fisher_samples", "stride": "timestep_stride", "indices": "subset"}


def _as_flag(message: str, parser: argparse.ArgumentParser, argv: list[str] | None) -> str:
    """`message` with a leading "name: " that is one of the command's options written as its flag (--name)."""
    name, sep, rest = message.partition(": ")
    if not sep or not name.isidentifier():
        return message
    flags = {a.dest: a.option_strings[0] for p in _command_parsers(parser, argv) for a in p._actions
             if a.option_strings and a.option_strings[0].startswith("--")}
    flag = flags.get(_PY_NAMES.get(name, name))
    return f"{flag}: {rest}" if flag else message


def _command_parsers(parser: argparse.ArgumentParser, argv: list[str] | None) -> list[argparse.ArgumentParser]:
    """The parser and the subcommand parsers `argv` went through."""
    out, words = [parser], list(sys.argv[1:] if argv is None else argv)
    while True:
        subs = [a for a in out[-1]._actions if isinstance(a, argparse._SubParsersAction)]
        nxt = next((subs[0].choices[w] for w in words if subs and w in subs[0].choices), None)
        if nxt is None:
            return out
        out.append(nxt)


def _close_bars() -> None:
    """Close the progress bars a failed stage left open, so that its message starts on a line of its own and no
    bar is redrawn after it when the stage's objects are freed."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is not None:
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


if __name__ == "__main__":
    sys.exit(main())
