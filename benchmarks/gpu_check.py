#!/usr/bin/env python
"""Helpers for benchmarks/gpu_check.sh, the one-shot check of forgetscore on a CUDA machine.

    python benchmarks/gpu_check.py env                 versions, the GPU, forgetscore's backends
    python benchmarks/gpu_check.py crosscheck [--max-s S]
                                                       large-shape checks the unit tests do not reach
    python benchmarks/gpu_check.py summary OUT_DIR     the final summary: every step's outcome and the
                                                       benchmark's headline figures against the targets
    python benchmarks/gpu_check.py pack [--custom-run DIR]
                                                       fill .gpu-cache/ with the digits model and training
                                                       set (and letter-h of an `evaluate custom` run)

Every subcommand prints what it can and never raises on a missing piece (no GPU, no
extension, no JSON): the point is useful output when some other step failed.
"""
from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import re
import sys
import time
import traceback

# Importing _common puts the checkout first on sys.path; it imports no torch: `env` must run where torch does not.
from _common import ROOT, positive_float

TARGET_COPY_PCT = 80.0   # add_noise / diffusion_loss: % of measured copy bandwidth
TARGET_GEMM_PCT = 50.0   # fisher: % of the measured matmul rate
TARGET_CPU_NOISE_X = 2.0  # CPU: noising + loss vs eager
TARGET_CPU_FISHER_X = 1.5  # CPU: fisher vs naive
# The exit status of a subcommand that had nothing to check on this machine (crosscheck without a CUDA device):
# gpu_check.sh then records its step as skipped rather than ok, with the reason from its "skipped: ..." line.
SKIPPED = 77


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --------------------------------------------------------------------------- env

def cmd_env(_: argparse.Namespace) -> int:
    print(f"python      {sys.version.split()[0]} ({platform.platform()})")
    try:
        import torch
    except Exception as exc:  # noqa: BLE001
        print(f"torch       import failed: {exc}")
        return 1
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else '-'})")
    for name in ("triton", "cupy-cuda12x", "cupy-cuda13x", "cupy", "diffusers", "pybind11", "numpy", "setuptools",
                 "ninja"):
        v = _version(name)
        if v != "not installed" or name in ("triton", "diffusers"):
            print(f"{name:<11} {v}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"gpu {i}       {p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.1f} GiB, "
                  f"{p.multi_processor_count} SMs")
    else:
        print("gpu         torch sees no CUDA device")
    try:
        from forgetscore import kernels
        from forgetscore.kernels import native
        print(f"forgetscore._C: {'loaded' if native.cpu_available() else native.NATIVE_IMPORT_ERROR}, "
              f"CUDA kernels {'yes' if native.cuda_available() else 'no'}")
        for s in kernels.status():
            print(f"  backend {s.name:<6} {'yes' if s.available else 'no ':<3} {','.join(s.devices):<8} {s.detail}")
    except Exception as exc:  # noqa: BLE001
        print(f"forgetscore import failed: {type(exc).__name__}: {exc}")
    return 0


# --------------------------------------------------------------------------- crosscheck

def cmd_crosscheck(args: argparse.Namespace) -> int:
    """Checks at sizes the unit tests avoid, on every GPU backend.

    - the raw Philox stream of a large batch equals the reference computed on the CPU;
    - the noise of a row does not depend on the batch: the last rows of a batch with more
      than 2**31 elements equal the same rows computed alone (catches 32-bit index overflow);
    - fisher_accumulate on a Stable-Diffusion-sized layer matches a float64 einsum.
    """
    import torch

    from forgetscore import kernels

    if not torch.cuda.is_available():
        print("crosscheck: skipped: no CUDA device, nothing checked")
        return SKIPPED
    dev = torch.device("cuda")
    backends = [s.name for s in kernels.status() if s.available and "cuda" in s.devices and s.name != "torch"]
    if not backends:
        print("crosscheck: no compiled CUDA backend available")
        return 1
    deadline = time.perf_counter() + args.max_s
    failures = 0
    results: list[tuple[str, str, str]] = []

    def record(check: str, backend: str, fn) -> None:
        nonlocal failures
        if time.perf_counter() > deadline:
            results.append((check, backend, "skipped (time)"))
            return
        t0 = time.perf_counter()
        try:
            ok, detail = fn()
        except Exception as exc:  # noqa: BLE001
            ok, detail = False, f"{type(exc).__name__}: {str(exc).splitlines()[0][:150]}"
        failures += not ok
        results.append((check, backend, f"{'pass' if ok else 'FAIL'} ({time.perf_counter() - t0:.1f}s) {detail}"))
        print(f"{check:<28} {backend:<7} {results[-1][2]}", flush=True)

    seed = 0x1234_5678_9ABC_DEF0
    acp = torch.linspace(0.9999, 0.005, 1000, dtype=torch.float64)

    for be in backends:
        def bits_vs_reference(be=be):
            sids = torch.arange(4096, dtype=torch.int64) * 7919 + (1 << 40)
            dids = torch.arange(4096, dtype=torch.int64) % 5
            got = kernels.random_bits(seed, sids.to(dev), dids.to(dev), 1027, backend=be).cpu()
            want = kernels.random_bits(seed, sids, dids, 1027, backend="torch")
            return torch.equal(got, want), "4096 x 1027 uint32 vs CPU reference"
        record("random_bits == reference", be, bits_vs_reference)

    free, _ = torch.cuda.mem_get_info()
    D = 4 * 64 * 64
    B = (1 << 31) // D + 64  # just over 2**31 elements
    need = 3 * B * D * 2 + (1 << 30)  # bf16 x0, out, x_t
    if free < need:
        results.append(("rows > 2**31 elements", "-", f"skipped (needs {need / 2**30:.0f} GiB, {free / 2**30:.0f} free)"))
    else:
        g = torch.Generator(device=dev).manual_seed(1)
        x0 = torch.randn(B, 4, 64, 64, generator=g, device=dev, dtype=torch.bfloat16)
        out = torch.randn(B, 4, 64, 64, generator=g, device=dev, dtype=torch.bfloat16)
        ts = torch.randint(0, 1000, (B,), generator=g, device=dev)
        sids = torch.arange(B, dtype=torch.int64, device=dev) + (1 << 33)
        dids = torch.full((B,), 3, dtype=torch.int64, device=dev)
        acp_d = acp.to(dev)
        tail = slice(B - 5, B)
        for be in backends:
            def big_add_noise(be=be):
                big = kernels.add_noise(x0, ts, acp_d, seed, sids, dids, backend=be)[tail]
                small = kernels.add_noise(x0[tail], ts[tail], acp_d, seed, sids[tail], dids[tail], backend=be)
                ref = kernels.add_noise(x0[tail].cpu(), ts[tail].cpu(), acp, seed, sids[tail].cpu(),
                                        dids[tail].cpu(), backend="torch")
                ok = torch.equal(big, small) and torch.allclose(big.float().cpu(), ref.float(), atol=1e-2, rtol=1e-2)
                return ok, f"B={B}, {B * D} elements, last 5 rows vs same rows alone and vs reference"
            record("add_noise rows > 2**31", be, big_add_noise)

            def big_loss(be=be):
                big = kernels.diffusion_loss(out, x0, ts, acp_d, seed, sids, dids, backend=be)[tail]
                small = kernels.diffusion_loss(out[tail], x0[tail], ts[tail], acp_d, seed, sids[tail], dids[tail],
                                               backend=be)
                ok = torch.allclose(big, small, rtol=1e-5, atol=1e-6) and bool(torch.isfinite(big).all())
                return ok, f"max |diff| {float((big - small).abs().max()):.2e}"
            record("diffusion_loss rows > 2**31", be, big_loss)
        del x0, out
        torch.cuda.empty_cache()

    gx = torch.Generator().manual_seed(2)
    X = torch.randn(64, 77, 768, generator=gx)
    G = torch.randn(64, 77, 1280, generator=gx)
    want = torch.einsum("blo,bli->boi", G.double(), X.double()).square().sum(0)
    for be in backends:
        for dt in (torch.float32, torch.bfloat16):
            def fisher(be=be, dt=dt):
                f = torch.zeros(1280, 768, dtype=torch.float64, device=dev)
                Xd, Gd = X.to(dev, dt), G.to(dev, dt)
                kernels.fisher_accumulate(f, Xd, Gd, backend=be)
                # bf16 inputs: compare with the float64 result of the rounded inputs
                ref = want if dt == torch.float32 else torch.einsum(
                    "blo,bli->boi", Gd.double().cpu(), Xd.double().cpu()).square().sum(0)
                err = float(((f.cpu() - ref).abs() / ref.abs().clamp_min(1e-3)).max())
                return err < 5e-3, f"SD 1280x768 B64 L77, max rel err {err:.1e}"
            record(f"fisher {str(dt).split('.')[-1]}", be, fisher)

    print()
    print(f"crosscheck: {sum(1 for r in results if r[2].startswith('pass'))} pass, {failures} fail, "
          f"{sum(1 for r in results if r[2].startswith('skipped'))} skipped")
    for check, be, res in results:
        if not res.startswith("pass"):
            print(f"  {check} [{be}]: {res}")
    return 1 if failures else 0


# --------------------------------------------------------------------------- summary

def _load_steps(out_dir: str) -> list[dict]:
    path = os.path.join(out_dir, "gpu_check_steps.tsv")
    steps = []
    try:
        with open(path) as fh:
            for line in fh:
                parts = line.rstrip("\n").split("\t")
                if len(parts) >= 3:
                    steps.append({"name": parts[0], "rc": parts[1], "seconds": parts[2],
                                  "note": parts[3] if len(parts) > 3 else ""})
    except OSError:
        pass
    return steps


# Rows of the reference backend, by name or as what "auto" resolved to: never a kernel's best figure.
REFERENCE_ROWS = (" torch", "(=torch)")


def _rc_word(rc: str) -> str:
    return {"0": "ok", "124": "TIMEOUT", "137": "KILLED", "skipped": "skipped"}.get(rc, f"FAILED (rc {rc})")


def cmd_summary(args: argparse.Namespace) -> int:
    out_dir = args.out_dir
    print("=" * 100)
    print("GPU CHECK SUMMARY")
    print("=" * 100)
    steps = _load_steps(out_dir)
    for s in steps:
        print(f"  {s['name']:<12} {_rc_word(s['rc']):<18} {s['seconds']:>5}s  {s['note']}")
    # Failing lines of the test and self-test logs, if any
    for name, pattern in (("tests", (" passed", " failed", "error")), ("info", ("FAIL", "error"))):
        path = os.path.join(out_dir, f"{name}.log")
        try:
            with open(path) as fh:
                lines = [ln.rstrip() for ln in fh if any(p in ln for p in pattern)]
        except OSError:
            continue
        for ln in lines[-6:]:
            print(f"  {name}: {ln[:160]}")

    _summary_sweep(os.path.join(out_dir, "bench_sweep_gpu.json"))
    precision_paths = [os.path.join(out_dir, n) for n in ("precision_gpu.json", "precision_ft_gpu.json")]
    for path in precision_paths:
        _summary_precision(path)
    print(f"  default by the rule: "
          f"{suggest_default_precision(precision_paths, speed_path=os.path.join(out_dir, 'bench_sweep_gpu.json'))}")

    bench = _load_json(os.path.join(out_dir, args.bench_json))
    if bench is None:
        return 0
    meta, rates = bench.get("meta", {}), bench.get("rates", {})
    cuda = meta.get("device") == "cuda"
    print(f"\nbenchmark: {meta.get('device_name')}, torch {meta.get('torch')}, {meta.get('date')}, "
          f"{meta.get('elapsed_s', float('nan')):.0f}s{'' if 'elapsed_s' in meta else ' (incomplete)'}")
    if rates:
        print("  copy {:.0f} GB/s; matmul fp32 {} / bf16 {} TFLOP/s".format(
            rates.get("copy_GBps", float("nan")),
            f"{rates['matmul_float32_TFLOPs']:.3g}" if "matmul_float32_TFLOPs" in rates else "-",
            f"{rates['matmul_bfloat16_TFLOPs']:.3g}" if "matmul_bfloat16_TFLOPs" in rates else "-"))
    bw = rates.get("copy_GBps")

    # Noising + loss: per shape, eager vs the fastest kernel backend.
    rows: dict[tuple, dict] = {}
    for r in bench.get("noise_loss", []):
        if "total_ms" not in r:
            continue
        key = (r["latent"], r["batch"])
        d = rows.setdefault(key, {})
        if r["method"] == "eager":
            d["eager"] = r
        elif r["method"].startswith("torch.compile"):
            d["compile"] = r
        elif r["method"].startswith("kernels") and not r["method"].endswith(REFERENCE_ROWS):
            if "best" not in d or r["total_ms"] < d["best"]["total_ms"]:
                d["best"] = r
    noise_ok = []
    if rows:
        print("\n  noising + loss        eager ms  compile ms  best kernels         ms    x eager"
              + ("  noise %copy  loss %copy" if cuda else ""))
        for (lat, b), d in rows.items():
            e, c, k = d.get("eager"), d.get("compile"), d.get("best")
            line = (f"  {lat:<8} B={b:<6} {e['total_ms'] if e else float('nan'):>10.3f}"
                    f"  {c['total_ms'] if c else float('nan'):>10.3f}  "
                    f"{k['method'] if k else '-':<20} {k['total_ms'] if k else float('nan'):>8.3f}"
                    f"  {(e['total_ms'] / k['total_ms']) if (e and k) else float('nan'):>7.2f}x")
            if cuda and k and bw:
                pn, pl = 100 * k["noise_GBps"] / bw, 100 * k["loss_GBps"] / bw
                line += f"  {pn:>10.0f}%  {pl:>9.0f}%"
                noise_ok.append(min(pn, pl) >= TARGET_COPY_PCT)
            elif e and k:
                noise_ok.append(e["total_ms"] / k["total_ms"] >= TARGET_CPU_NOISE_X)
            print(line)

    frows: dict[tuple, dict] = {}
    for r in bench.get("fisher", []):
        if "ms" not in r:
            continue
        key = (r["model"], r["d_out"], r["d_in"], r["batch"], r["input_dtype"])
        d = frows.setdefault(key, {})
        if r["method"] == "naive einsum":
            d["naive"] = r
        elif r["method"].startswith("kernels") and not r["method"].endswith(REFERENCE_ROWS):
            if "best" not in d or r["ms"] < d["best"]["ms"]:
                d["best"] = r
    fisher_ok = []
    if frows:
        print("\n  fisher                           naive ms  best kernels         ms    x naive    %GEMM"
              "  naive mem   ours mem")
        for (model, do, di, b, dt), d in frows.items():
            n, k = d.get("naive"), d.get("best")
            pct = k.get("pct_of_gemm") if k else None
            line = (f"  {model:<6} {do}x{di} B={b:<4} {dt:<9} {n['ms'] if n else float('nan'):>8.3f}  "
                    f"{k['method'] if k else '-':<20} {k['ms'] if k else float('nan'):>8.3f}"
                    f"  {(n['ms'] / k['ms']) if (n and k) else float('nan'):>7.2f}x"
                    f"  {pct if pct is not None else float('nan'):>6.0f}%"
                    f"  {_mib(n.get('peak_extra_bytes') if n else None):>9}  {_mib(k.get('peak_extra_bytes') if k else None):>9}")
            print(line)
            if cuda and pct is not None:
                fisher_ok.append(pct >= TARGET_GEMM_PCT)
            elif not cuda and n and k:
                fisher_ok.append(n["ms"] / k["ms"] >= TARGET_CPU_FISHER_X)
    print()
    if cuda:
        print(f"  target add_noise/loss >= {TARGET_COPY_PCT:.0f}% of copy bandwidth: "
              f"{sum(noise_ok)}/{len(noise_ok)} shapes")
        print(f"  target fisher >= {TARGET_GEMM_PCT:.0f}% of same-shape GEMM rate: {sum(fisher_ok)}/{len(fisher_ok)} shapes")
    else:
        print(f"  target noising+loss >= {TARGET_CPU_NOISE_X}x eager: {sum(noise_ok)}/{len(noise_ok)} shapes")
        print(f"  target fisher >= {TARGET_CPU_FISHER_X}x naive: {sum(fisher_ok)}/{len(fisher_ok)} shapes")
    if bench.get("errors"):
        print("  benchmark errors: " + "; ".join(bench["errors"]))
    return 0


def _load_json(path: str) -> dict | None:
    try:
        with open(path) as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        print(f"\nno results in {path} ({type(exc).__name__})")
        return None


def _summary_sweep(path: str) -> None:
    """The sweep benchmark's rows: timings, and the ratios and projections against their targets."""
    d = _load_json(path)
    if d is None:
        return
    meta = d.get("meta", {})
    print(f"\nsweep benchmark: {meta.get('device_name')}, {meta.get('dtype')}, quick={meta.get('quick')}, "
          f"{meta.get('date')}")
    for r in d.get("rows", []):
        if "ratio" in r:
            figure = f"{r['ratio']:.2f}x" + (f"  (target {r['target']})" if r.get("target") else "")
        elif r.get("part", "").endswith("profile"):
            figure = r.get("note") or r.get("skipped", "")
        elif "projected_h" in r:
            figure = f"projected {r['projected_h'] * 60:.1f} min per MSCOCO query"
        elif "median_s" in r:
            # A Fisher row counts samples, at a fraction of one a second on a CPU: three significant digits.
            unit = "samples/s" if r.get("part", "").endswith("fisher") else "rows/s"
            figure = f"{r['median_s']:.3f}s  {_rate(r.get('rows_per_s', float('nan')))} {unit}"
            if r.get("peak_rss_bytes"):
                figure += f"  peak {_mib(r['peak_rss_bytes'])}"
        else:
            figure = r.get("note", "")
        print(f"  {r.get('part', ''):<13} {r.get('method', '')[:80]:<80} {figure}")
    for e in d.get("errors", []):
        print(f"  error: {e}")


def _summary_precision(path: str) -> None:
    """The engine on the GPU: each precision's speed and agreement with fp32 (and the CPU)."""
    d = _load_json(path) if os.path.exists(path) else None  # precision_ft runs only with a carried model
    meta = (d or {}).get("meta", {})
    if not d:
        return
    print(f"\nprecision: {meta.get('device_name')}, {meta.get('images')} images, batch {meta.get('batch_size')} "
          f"(probed), model {_short_path(meta.get('model', ''))}")
    if isinstance(meta.get("images"), int) and meta["images"] <= 100:
        print(f"  (top-k with k >= {meta['images']} images holds every image: such an overlap is 1 whatever the "
              "scores)")
    for r in d.get("rows", []):
        cpu = f"  rel. vs CPU {r['max_rel_vs_cpu']:.1e}" if "max_rel_vs_cpu" in r else ""
        print(f"  {r['precision']:<24} {r['seconds']:>7.2f}s (warm-up {r['warmup_s']:.1f}s) "
              f"{r['rows_per_s']:>10.0f} rows/s  spearman {r['spearman']:.4f}  top-10 {r['top10']:.2f}  "
              f"top-100 {r['top100']:.2f}{cpu}")


def sweep_speeds(path: str | None) -> dict[str, float]:
    """{precision: rows/s} of the sweep benchmark's precision rows (the MSCOCO-scale UNet), if any."""
    d = _load_json(path) if path and os.path.exists(path) else None
    out = {}
    for r in (d or {}).get("rows", []):
        m = re.fullmatch(r"LossSweep\.run \(precision (\w+)\)", r.get("method", ""))
        if r.get("part") == "precision" and m and r.get("rows_per_s"):
            out[m.group(1)] = r["rows_per_s"]
    return out


def suggest_default_precision(paths: list[str], bar: float = 0.9, speed_path: str | None = None) -> str:
    """The fastest precision (uncompiled rows) whose top-100 overlap with fp32 is >= `bar` on every model
    measured, with why.

    Speed comes from the sweep benchmark's precision rows (`speed_path`) when they hold fp32 and a
    passing precision: the demo models are small enough that a GPU runs them at the speed of its
    kernel launches, whatever the precision, which says nothing about a real model. The passing
    precisions that benchmark did not time are named. Otherwise speed comes from the first file's
    rows (the digits model).
    """
    tables = [d for d in (_load_json(p) if os.path.exists(p) else None for p in paths) if d]
    if not tables:
        return "no precision table"
    rows = [{r["precision"]: r for r in d.get("rows", []) if "+" not in r["precision"]} for d in tables]
    passing = [p for p in rows[0] if all(p in t and t[p]["top100"] >= bar for t in rows)]
    if not passing:
        return f"none keeps top-100 >= {bar} (fp32 is the reference)"
    speeds, basis = sweep_speeds(speed_path), "the MSCOCO-scale UNet"
    untimed = [p for p in passing if p not in speeds]
    if "fp32" not in speeds or len(untimed) == len(passing):
        speeds, basis, untimed = {p: r["rows_per_s"] for p, r in rows[0].items()}, "the first model", []
    best = max((p for p in passing if p in speeds), key=lambda p: speeds[p])
    speed = speeds[best] / speeds["fp32"] if "fp32" in speeds else float("nan")
    worst = min(t[best]["top100"] for t in rows)
    return (f"{best} ({speed:.2f}x fp32's speed on {basis}, top-100 >= {worst:.2f} on {len(rows)} model(s); "
            f"passing: {', '.join(passing)}" + (f"; not timed there: {', '.join(untimed)}" if untimed else "") + ")")


def cmd_pack(args: argparse.Namespace) -> int:
    """Copy what the precision step measures into .gpu-cache/, to be carried to the GPU machine."""
    import shutil
    from pathlib import Path

    from forgetscore.cache import cache_root
    from forgetscore.digits.data import write_image_folder
    from forgetscore.digits.train import ensure_model

    dest = Path(ROOT) / ".gpu-cache"
    dest.mkdir(exist_ok=True)
    model = ensure_model(log=print)
    train = cache_root() / "digits-train"
    if not (train / "metadata.jsonl").is_file():
        write_image_folder(train, overwrite=True)
    copies = [(model, dest / model.name), (train, dest / "digits-train")]
    if args.custom_run:
        concept = Path(args.custom_run) / "concepts" / "letter-h"
        if not (concept / "model").is_dir() or not (concept / "pool").is_dir():
            print(f"--custom-run: {concept} holds no model/ and pool/; give a finished `evaluate custom` run")
            return 2
        copies += [(concept / "model", dest / "letter-h" / "model"), (concept / "pool", dest / "letter-h" / "pool")]
    for src, dst in copies:
        if dst.exists():
            shutil.rmtree(dst)
        shutil.copytree(src, dst)
    size = sum(f.stat().st_size for f in dest.rglob("*") if f.is_file())
    print(f"{dest}: {', '.join(str(d.relative_to(dest)) for _, d in copies)} ({size / 2**20:.1f} MiB)")
    return 0


def _short_path(path: object) -> str:
    """The last two parts of a path: enough to tell the digits model from letter-h/model."""
    return "/".join(str(path).rstrip("/").split("/")[-2:])


def _rate(v: float) -> str:
    """A rate with at least three significant digits: 0.134, 12.5, 342, 32000."""
    return f"{v:.0f}" if not v < 100 else f"{v:.3g}"


def _mib(v) -> str:
    return "-" if v is None else f"{v / 2**20:.1f}MiB"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("env", help="versions, GPU and backends")
    c = sub.add_parser("crosscheck", help="large-shape checks on the GPU backends")
    c.add_argument("--max-s", type=positive_float(), default=60.0, help="start no new check after this many seconds")
    s = sub.add_parser("summary", help="summarise a gpu_check.sh output folder")
    s.add_argument("out_dir")
    s.add_argument("--bench-json", default="bench_gpu.json")
    k = sub.add_parser("pack", help="fill .gpu-cache/ with the models the precision step measures")
    k.add_argument("--custom-run", help="an `evaluate custom` output folder holding concepts/letter-h/")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    fn = {"env": cmd_env, "crosscheck": cmd_crosscheck, "summary": cmd_summary, "pack": cmd_pack}[args.cmd]
    try:
        return fn(args)
    except Exception:  # noqa: BLE001 - a helper must never hide the other steps' output
        traceback.print_exc()
        return 1


if __name__ == "__main__":
    sys.exit(main())
