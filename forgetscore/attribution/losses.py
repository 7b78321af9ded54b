"""Per-image diffusion losses under a scoring plan: the sweep every score is made of.

A batch of images is expanded into rows (image x version x caption x timestep),
noised once, and run through the UNet once per model variant (the original weights,
or the unlearned weights of one or more queries), so several queries share the
loading and noising of the data. The UNet gets each caption's states once, and its
cross-attention layers project them to keys and values once per caption
(:mod:`.text_kv`), not once per row.

The host side of a batch (memory-mapped reads, text gather, row expansion, pinned
copies on CUDA) is prepared in a background thread while the previous batch runs on
the device (``prefetch``); it is the same work in the same order, so the numbers are
identical either way. ``batch_size="auto"`` sizes the UNet calls to the free GPU
memory, ``compile`` runs the UNet under ``torch.compile``.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .. import kernels
from . import params
from .data import PreparedData
from .memory import largest_fitting, naming_the_batch
from .model import DiffusionModel
from .plan import ScoringPlan
from .text_kv import SharedText

# UNet precision of a sweep: scores are small differences of two losses, so this matters
# (see benchmarks/RESULTS.md, "Precision").
# On CUDA, "fp32" is IEEE float32 throughout: cuDNN would otherwise run convolutions in TF32
# (10 mantissa bits, PyTorch's default), about the size of the loss differences scored.
# "tf32" asks for TF32 convolutions and matmuls (CUDA only).
# Sweep precisions: the autocast dtype of the UNet (None: float32). "mixed" is bfloat16 except the
# UNet's output end, in float32 (TF32 on CUDA); see attribution/mixed.py.
PRECISIONS = {"fp32": None, "tf32": None, "bf16": torch.bfloat16, "fp16": torch.float16, "mixed": torch.bfloat16}
# batch_size="auto" off CUDA: CPU throughput stops growing long before a few hundred rows,
# and there is no out-of-memory error to probe for (the machine would swap instead).
AUTO_BATCH_CPU = 256
# batch_size="auto" on CUDA never goes above this: past it a GPU is saturated anyway, and
# a larger batch only delays the first finished chunk.
AUTO_BATCH_CAP = 4096
# torch.compile modes; "auto" is "max-autotune" (autotuned kernels and CUDA graphs) on CUDA,
# "default" elsewhere.
COMPILE_MODES = ("auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
# Reference noise batches kept made: a sweep walks the unflipped and the flipped half of the
# published pass side by side, each touching one or two batches at a time.
REFERENCE_CACHE_BATCHES = 4


@dataclass
class Rows:
    """The expanded rows of one batch of images."""
    image: torch.Tensor      # position of the row's image within the batch
    version: torch.Tensor    # 0 = as is, 1 = horizontally flipped
    text_row: torch.Tensor   # row into the batch's encoder states
    timestep: torch.Tensor
    sample_id: torch.Tensor  # the image's id in the training set: keys the noise
    draw_id: torch.Tensor
    caption: torch.Tensor    # the caption's index among its image's
    step: torch.Tensor       # the timestep's index in the plan

    def __len__(self) -> int:
        return self.image.shape[0]


def expand_rows(ids: np.ndarray, caption_counts: Sequence[int], plan: ScoringPlan) -> Rows:
    """Rows ordered image-major, then version, caption, timestep (vectorised: no loop per image)."""
    caps = torch.as_tensor(list(caption_counts), dtype=torch.int64)
    n_t, n_v = len(plan.timesteps), plan.versions
    per_image = n_v * caps * n_t
    image = torch.repeat_interleave(torch.arange(len(caps)), per_image)
    start = torch.cumsum(per_image, 0) - per_image
    local = torch.arange(int(per_image.sum())) - start[image]
    span = caps[image] * n_t
    version = local // span
    caption = (local // n_t) % caps[image]
    step = local % n_t
    timestep = torch.tensor(plan.timesteps, dtype=torch.int64)[step]
    text_base = torch.cumsum(caps, 0) - caps
    return Rows(image, version, text_base[image] + caption, timestep,
                torch.as_tensor(np.asarray(ids, dtype=np.int64))[image],
                ScoringPlan.draw_id(version, caption, timestep), caption, step)


def check_noise_device(plan: ScoringPlan) -> None:
    """That the device kind a ``noise="reference"`` plan draws its noise on exists here."""
    if plan.noise == "reference" and torch.device(plan.noise_device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError("noise_device: 'cuda' reference noise needs a CUDA device (torch's CPU and CUDA "
                         "generators give different numbers); run on a GPU or use noise_device='cpu' "
                         "(--noise-device cpu)")


class ReferenceNoise:
    """The published implementation's noise for any row, under a ``noise="reference"`` plan.

    The published loop walks items ``q = 0 .. versions * n - 1``: image ``q % n``, flipped when
    ``q >= n`` (every image as is, then every flip), in batches of ``plan.reference_batch`` items.
    Batch ``b`` lays its rows out item-major, then caption, then timestep, and draws them all
    with one ``torch.randn(rows, *shape)`` from a generator seeded ``plan.seed + b``. The layout
    is that of the whole data set, whatever subset or order a sweep scores, so a row's noise
    is a fixed function of (plan, data set); batches are made whole (torch's stream for a
    tensor depends on its size) and the last few are kept for the rows that follow.
    """

    def __init__(self, plan: ScoringPlan, data: PreparedData, device: torch.device):
        if plan.noise != "reference":
            raise ValueError(f"plan: noise={plan.noise!r}; ReferenceNoise needs noise='reference'")
        check_noise_device(plan)
        dev = torch.device(plan.noise_device)
        if dev.type == "cuda":
            # An explicit index: the prefetch thread has its own current device (cuda:0).
            dev = device if device.type == "cuda" and device.index is not None else \
                torch.device("cuda", torch.cuda.current_device())
        self.device = dev
        self.n, self.n_t = data.n, len(plan.timesteps)
        self.batch, self.seed = plan.reference_batch, plan.seed
        self.shape = tuple(data.input_shape)
        self.n_items = plan.versions * data.n
        # First row of each image within one version's pass (in caption rows; x n_t for rows).
        self.offsets = (np.asarray(data.caption_offsets, dtype=np.int64) if plan.captions == "all"
                        else np.arange(data.n + 1, dtype=np.int64))
        self._made: OrderedDict[int, torch.Tensor] = OrderedDict()

    def item_row(self, q: np.ndarray) -> np.ndarray:
        """First row of item(s) `q` in the whole published pass (``q == n_items``: the row count)."""
        version, image = np.divmod(np.asarray(q, dtype=np.int64), self.n)
        return (version * self.offsets[self.n] + self.offsets[image]) * self.n_t

    def locate(self, sample_id: np.ndarray, version: np.ndarray, caption: np.ndarray,
               step: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(batch index, row within that batch) of each row."""
        q = np.asarray(version, dtype=np.int64) * self.n + np.asarray(sample_id, dtype=np.int64)
        b = q // self.batch
        row = self.item_row(q) + np.asarray(caption, dtype=np.int64) * self.n_t + np.asarray(step, dtype=np.int64)
        return b, row - self.item_row(b * self.batch)

    def batch_noise(self, b: int) -> torch.Tensor:
        """All the noise of published batch `b`: [rows, *shape] float32 on the noise device."""
        if b in self._made:
            self._made.move_to_end(b)
            return self._made[b]
        lo, hi = b * self.batch, min((b + 1) * self.batch, self.n_items)
        if not 0 <= lo < hi:
            raise ValueError(f"reference noise: batch {b} is outside the {self.n_items}-item pass")
        rows = int(self.item_row(hi) - self.item_row(lo))
        gen = torch.Generator(device=self.device).manual_seed(self.seed + b)
        noise = torch.randn((rows, *self.shape), generator=gen, device=self.device)
        self._made[b] = noise
        while len(self._made) > REFERENCE_CACHE_BATCHES:
            self._made.popitem(last=False)
        return noise

    def rows(self, sample_id: np.ndarray, version: np.ndarray, caption: np.ndarray,
             step: np.ndarray) -> torch.Tensor:
        """[len(rows), *shape] noise of the given rows (one gather per published batch they touch)."""
        b, row = self.locate(sample_id, version, caption, step)
        out = torch.empty((len(b), *self.shape), dtype=torch.float32, device=self.device)
        for batch in np.unique(b):
            sel = np.flatnonzero(b == batch)
            out[torch.from_numpy(sel).to(self.device)] = \
                self.batch_noise(int(batch))[torch.from_numpy(row[sel]).to(self.device)]
        return out


# precision="auto": per device, the fastest precision whose top-100 overlap with IEEE fp32's stayed
# >= 0.9 on both measured models (benchmarks/RESULTS.md). On an H200, TF32 ran the MSCOCO-scale UNet's
# sweep 2.0x faster than fp32 with overlaps 0.99 and 0.98; bf16 and mixed fell below 0.9 on one model
# each. On the CPU only fp32 passed at a gain worth having.
AUTO_PRECISION = {"cuda": "tf32"}


# CPU feature flags (as /proc/cpuinfo names them) of instructions that compute in bfloat16.
BF16_CPU_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})  # the last: Arm's


@functools.lru_cache(maxsize=1)
def cpu_has_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool | None:
    """Whether this CPU has bfloat16 instructions (None: cannot tell, e.g. no /proc/cpuinfo)."""
    try:
        with open(cpuinfo) as fh:
            flags = {word for line in fh if line.split(":", 1)[0].strip() in ("flags", "Features")
                     for word in line.split(":", 1)[1].split()}
    except (OSError, IndexError):
        return None
    return bool(flags & BF16_CPU_FLAGS) if flags else None


def resolve_precision(precision: str, device: torch.device) -> str:
    """`precision` checked for `device`, with "auto" replaced by the device's default."""
    if precision == "auto":
        precision = AUTO_PRECISION.get(device.type, "fp32")
    check_precision(precision, device)
    if device.type == "cpu":
        native = cpu_has_bf16()
        if precision == "fp16":
            warnings.warn("precision: fp16 on the CPU runs several times slower than fp32 (few CPU kernels take "
                          "float16)" + ("; bf16 is the CPU's fast half precision" if native else ""), stacklevel=2)
        elif precision in ("bf16", "mixed") and native is False:
            # Without them every bfloat16 product is emulated: on a 2-core AVX2 machine the digits model's
            # sweep ran 11x slower in bf16 than in fp32 (benchmarks/RESULTS.md).
            warnings.warn(f"precision: {precision} runs slower than fp32 on this CPU, which has no bfloat16 "
                          "instructions (avx512_bf16, amx_bf16 or Arm's bf16); use fp32 here", stacklevel=2)
    return precision


def check_precision(precision: str, device: torch.device) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision: {precision!r} is not one of {['auto', *PRECISIONS]}")
    if precision == "tf32" and device.type != "cuda":
        raise ValueError(f"precision: 'tf32' is a CUDA tensor-core mode and the model is on {device.type}; "
                         "use fp32, bf16, fp16 or mixed there")


@contextlib.contextmanager
def _cuda_fp32_math(mode: str) -> Iterator[None]:
    """cuDNN convolutions and CUDA matmuls on float32 inputs in `mode` ("ieee" or "tf32"), then restored.

    Through the long-standing ``allow_tf32`` switches: PyTorch keeps its newer per-operator
    ``fp32_precision`` settings consistent with them, whereas setting only the newer ones leaves
    the older getters raising, and torch.compile's autotuning still reads them.
    """
    flags = [(torch.backends.cudnn, "allow_tf32"), (torch.backends.cuda.matmul, "allow_tf32")]
    saved = [getattr(obj, name) for obj, name in flags]
    try:
        for obj, name in flags:
            setattr(obj, name, mode == "tf32")
        yield
    finally:
        for (obj, name), value in zip(flags, saved):
            setattr(obj, name, value)


@contextlib.contextmanager
def unet_precision(device: torch.device, precision: str) -> Iterator[None]:
    """The UNet's arithmetic in a sweep; noising and the loss stay in float32 whatever it is."""
    check_precision(precision, device)
    with contextlib.ExitStack() as stack:
        if device.type == "cuda":
            stack.enter_context(_cuda_fp32_math("tf32" if precision in ("tf32", "mixed") else "ieee"))
        if PRECISIONS[precision] is not None:
            stack.enter_context(torch.autocast(device.type, dtype=PRECISIONS[precision]))
        yield


def call_unet(unet: torch.nn.Module, x_t: torch.Tensor, ts: torch.Tensor, ctx: torch.Tensor, text_row: torch.Tensor,
              shared: bool) -> torch.Tensor:
    """The UNet's prediction for rows (x_t, ts) whose caption states are ctx[text_row].

    shared: the attention layers take each caption once (:meth:`.text_kv.SharedText.installed`);
    otherwise every row is given its own copy of its caption's states.
    """
    if shared:
        return unet(x_t, ts, encoder_hidden_states=ctx, cross_attention_kwargs={"text_index": text_row},
                    return_dict=False)[0]
    return unet(x_t, ts, encoder_hidden_states=ctx.index_select(0, text_row), return_dict=False)[0]


@torch.inference_mode()
def probe_batch_size(model: DiffusionModel, precision: str = "fp32", *, cap: int = AUTO_BATCH_CAP) -> int:
    """The largest power-of-two row batch up to `cap` whose UNet forward fits on the model's device.

    Each try runs one forward of random inputs and text states of the prepared shapes, under
    the sweep's precision, the way the sweep calls the UNet; an out-of-memory error halves it.
    """
    dev = model.device
    check_precision(precision, dev)
    dtype = next(model.unet.parameters()).dtype
    states = model.encode_text([""]).to(dtype)  # [1, L, D]: the shape of every prepared caption
    shared_text = SharedText(model.unet)
    tail = float32_tail(model.unet, precision)

    def fits(n: int) -> None:
        x = torch.randn((n, *model.input_shape), device=dev).to(dtype)
        t = torch.full((n,), model.num_train_timesteps - 1, dtype=torch.int64, device=dev)
        rows = torch.zeros(n, dtype=torch.int64, device=dev)
        with unet_precision(dev, precision), shared_text.installed() as shared, tail():
            call_unet(model.unet, x, t, states, rows, shared)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    return largest_fitting(fits, cap)


def float32_tail(unet: torch.nn.Module, precision: str) -> Callable[[], contextlib.AbstractContextManager]:
    """What installs the UNet's float32 output end for a call: for "mixed" only (else nothing)."""
    if precision != "mixed":
        return contextlib.nullcontext
    dtype = next(unet.parameters()).dtype
    if dtype != torch.float32:
        raise ValueError(f"precision: 'mixed' runs the UNet's output end in float32 and needs float32 weights; "
                         f"this UNet's are {dtype}: use bf16 or fp16, or load the model in float32")
    from .mixed import Float32Tail

    return Float32Tail(unet).installed


def auto_batch_size(model: DiffusionModel, precision: str = "fp32", *, cap: int = AUTO_BATCH_CAP) -> int:
    """Rows per UNet call for ``batch_size="auto"``: probed on CUDA, :data:`AUTO_BATCH_CPU` elsewhere."""
    if model.device.type == "cuda":
        return probe_batch_size(model, precision, cap=cap)
    return AUTO_BATCH_CPU


def compile_mode(mode: str | None, device: torch.device) -> str | None:
    """The torch.compile mode a sweep on `device` uses for `mode` (None: no compilation)."""
    if mode is None:
        return None
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile: {mode!r} is not one of {list(COMPILE_MODES)} (or None: no compilation)")
    if mode == "auto":
        return "max-autotune" if device.type == "cuda" else "default"
    return mode


@dataclass
class _Batch:
    """The host side of one image batch, made ready for the device (pinned on CUDA)."""
    n_images: int
    rows: Rows
    x0: torch.Tensor            # [rows, C, H, W] float32
    ctx: torch.Tensor           # [captions, L, D] as stored (cast on the device): each caption once (rows.text_row)
    noise: torch.Tensor | None  # reference noise of the rows; None: keyed noise, made in-kernel
    # The rows' text_row, timestep, sample_id, draw_id and (image, version) group, stacked: one copy to the device
    index: torch.Tensor         # [5, rows] int64
    counts: torch.Tensor        # [images * versions] float64: rows per (image, version), for the mean


def _thread_device(device: torch.device) -> Callable[[], None] | None:
    """What a worker thread runs first so that its CUDA work (pinning) uses `device`, not cuda:0.

    A thread starts on cuda:0 whatever the launching thread chose; pinning there would open a
    context on the first GPU from every torchrun rank.
    """
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return lambda: torch.cuda.set_device(index)


def _pad(a: torch.Tensor, n: int) -> torch.Tensor:
    """`a` with its last row repeated up to n rows (a fresh tensor, even when nothing is added)."""
    return torch.cat([a, a[-1:].expand(n - a.shape[0], *a.shape[1:])])


class LossSweep:
    """Computes per-(image, version) losses under `plan` for one or more weight variants.

    Keyed noise is made inside the fused kernels; under a ``noise="reference"`` plan each row takes
    its published noise (:class:`ReferenceNoise`), the scheduler's ``add_noise`` and a per-row MSE,
    as the published code computes them.

    batch_size: UNet rows per call, or ``"auto"`` (:func:`auto_batch_size`).
    prefetch: prepare the next batch's inputs in a background thread while the current one runs
        (identical numbers; False does everything in the calling thread).
    compile: None, or a torch.compile mode of :data:`COMPILE_MODES` for the UNet forward. Every call is
        then padded to `batch_size` rows so that one graph (and on CUDA one CUDA graph) serves the sweep;
        compiled kernels change the last bits of the losses, as a different batch size does.
    compile_backend: torch.compile's backend (tests use a cheap one).
    """

    def __init__(self, model: DiffusionModel, data: PreparedData, plan: ScoringPlan, *,
                 batch_size: int | str = 256, backend: str = "auto", precision: str = "fp32",
                 prefetch: bool = True, compile: str | None = None,
                 compile_backend: str | Callable = "inductor"):
        for arg, value, attr, hint in (("model", model, "encoders_id", "DiffusionModel.load(folder)"),
                                       ("data", data, "model_id", "Attributor.prepare() or prepare(...)"),
                                       ("plan", plan, "check_model", "a ScoringPlan")):
            if not hasattr(value, attr):
                raise ValueError(f"{arg}: expected {hint}, got {type(value).__name__}")
        if tuple(data.input_shape) != tuple(model.input_shape):  # first: the encoders' id holds the shape too
            raise ValueError(f"cache: prepared inputs have shape {data.input_shape}, the UNet takes "
                             f"{model.input_shape}; prepare again for this model")
        if data.model_id != model.encoders_id():
            raise ValueError("cache: the prepared data was made with another tokenizer, text encoder or VAE "
                             "than this model's; prepare again for this model")
        plan.check_model(model.num_train_timesteps)
        precision = resolve_precision(precision, model.device)
        if isinstance(batch_size, str):
            if batch_size != "auto":
                raise ValueError(f"batch_size: {batch_size!r} must be an int >= 1 or 'auto'")
            batch_size = auto_batch_size(model, precision)
        elif not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size: {batch_size!r} must be >= 1 (an int, or 'auto')")
        self.precision = precision
        self.model, self.data, self.plan = model, data, plan
        self.batch_size = batch_size
        self.backend = backend
        self.prefetch = bool(prefetch)
        self.compile = compile_mode(compile, model.device)
        self.acp = model.alphas_cumprod.to(model.device)
        self._dtype = next(model.unet.parameters()).dtype
        self._noise = ReferenceNoise(plan, data, model.device) if plan.noise == "reference" else None
        # dynamo keeps compiled code with the UNet's forward, so a new wrapper per sweep compiles nothing again.
        self._unet = model.unet if self.compile is None else torch.compile(
            model.unet, mode=None if self.compile == "default" else self.compile, backend=compile_backend,
            dynamic=False)
        self._shared_text = SharedText(model.unet)
        self._tail = float32_tail(model.unet, precision)
        # Compiled calls get this many caption rows (padded): a batch of whole images has at most one
        # caption per versions x timesteps rows.
        self._caption_rows = max(1, -(-batch_size // (plan.versions * len(plan.timesteps))))

    def _precision(self):
        return unet_precision(self.model.device, self.precision)

    def rows_per_image(self, caption_count: int) -> int:
        return self.plan.versions * caption_count * len(self.plan.timesteps)

    def image_batches(self, indices: np.ndarray) -> list[np.ndarray]:
        """Split the image ids so that each batch expands to at most `batch_size` rows (at least one image).

        Greedy in order, found with a cumulative sum and one search per batch rather than a
        Python step per image.
        """
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if self.plan.captions == "first":
            caps = np.ones(len(indices), dtype=np.int64)
        else:
            offsets = np.asarray(self.data.caption_offsets, dtype=np.int64)
            caps = offsets[indices + 1] - offsets[indices]
        ends = np.cumsum(caps * (self.plan.versions * len(self.plan.timesteps)))
        out, start, done = [], 0, 0
        while start < len(indices):
            stop = max(int(np.searchsorted(ends, done + self.batch_size, side="right")), start + 1)
            out.append(indices[start:stop])
            done, start = int(ends[stop - 1]), stop
        return out

    def _load(self, ids: np.ndarray) -> _Batch:
        """Everything one batch needs before the device: memory-mapped inputs, text rows, reference noise."""
        inputs = self.data.inputs(ids)[:, :self.plan.versions]
        text, counts = self.data.text(ids, self.plan.captions, stored=True)
        rows = expand_rows(ids, counts, self.plan)
        x0 = inputs[rows.image, rows.version]
        ctx = text
        noise = None
        if self._noise is not None:
            noise = self._noise.rows(rows.sample_id.numpy(), rows.version.numpy(), rows.caption.numpy(),
                                     rows.step.numpy())
        group = rows.image * self.plan.versions + rows.version
        index = torch.stack([rows.text_row, rows.timestep, rows.sample_id, rows.draw_id, group])
        counts = torch.bincount(group, minlength=len(ids) * self.plan.versions).double()
        if self.model.device.type == "cuda":  # pinned, so that the copies to the GPU can be asynchronous
            x0, ctx, index = x0.pin_memory(), ctx.pin_memory(), index.pin_memory()
            if noise is not None and noise.device.type == "cpu":
                noise = noise.pin_memory()
        return _Batch(len(ids), rows, x0, ctx, noise, index, counts)

    def _loaded(self, batches: list[np.ndarray]) -> Iterator[_Batch]:
        """The batches made ready in order; with prefetch, batch k + 1 is made while batch k is used."""
        if not self.prefetch or len(batches) < 2:
            for ids in batches:
                yield self._load(ids)
            return
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="forgetscore-prefetch",
                                initializer=_thread_device(self.model.device)) as pool:
            pending = pool.submit(self._load, batches[0])
            for k in range(len(batches)):
                ready = pending.result()
                if k + 1 < len(batches):
                    pending = pool.submit(self._load, batches[k + 1])
                yield ready

    def _forward(self, x_t: torch.Tensor, ts: torch.Tensor, ctx: torch.Tensor, text_row: torch.Tensor,
                 shared: bool) -> torch.Tensor:
        n = x_t.shape[0]
        if self.compile is not None:
            # One static shape: a compiled graph (and a CUDA graph) per shape would recompile and
            # re-record for nearly every image batch, whose row counts vary with the captions. The
            # copy also makes every input a fresh inference tensor, as dynamo's guards expect.
            x_t, ts, text_row = (_pad(a, self.batch_size) for a in (x_t, ts, text_row))
            ctx = _pad(ctx, max(self._caption_rows, ctx.shape[0]))
        with self._precision():
            return call_unet(self._unet, x_t, ts, ctx, text_row, shared)[:n]

    def _reference_target(self, x0: torch.Tensor, noise: torch.Tensor, ts: torch.Tensor) -> torch.Tensor:
        kind = self.model.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.model.scheduler.get_velocity(x0, noise, ts)
        return x0

    @torch.inference_mode()
    def _compute(self, batch: _Batch, variants: Sequence[dict[str, torch.Tensor] | None]) -> torch.Tensor:
        # Nothing here waits for the device until the means of every variant are read back at the end: every
        # copy is from pinned memory, the row counts are the host's, and the kernels run unchecked (the rows
        # are the plan's own; a non-finite loss is caught in the means and explained by _non_finite).
        m, dev = self.model, self.model.device
        rows, async_copy = batch.rows, dev.type == "cuda"
        x0 = batch.x0.to(dev, non_blocking=async_copy)
        ctx = batch.ctx.to(dev, non_blocking=async_copy).to(self._dtype)
        text_row, ts, sids, dids, group = batch.index.to(dev, non_blocking=async_copy).unbind(0)
        if batch.noise is None:
            x_t = kernels.add_noise(x0, ts, self.acp, self.plan.seed, sids, dids, backend=self.backend, check=False)
            target = None
        else:  # as the published code: the scheduler's add_noise and an MSE against the drawn noise
            noise = batch.noise.to(dev, non_blocking=async_copy)
            x_t = m.scheduler.add_noise(x0, noise, ts)
            target = self._reference_target(x0, noise, ts)
        x_t = x_t.to(self._dtype)
        n_groups = batch.n_images * self.plan.versions
        sums = torch.empty(len(variants), n_groups, dtype=torch.float64, device=dev)
        for v, weights in enumerate(variants):
            with m.swapped(weights), self._shared_text.installed() as shared, self._tail():
                losses = torch.empty(len(rows), dtype=torch.float32, device=dev)
                for lo in range(0, len(rows), self.batch_size):
                    hi = min(len(rows), lo + self.batch_size)
                    pred = self._forward(x_t[lo:hi], ts[lo:hi], ctx, text_row[lo:hi], shared)
                    if target is None:
                        losses[lo:hi] = kernels.diffusion_loss(pred, x0[lo:hi], ts[lo:hi], self.acp, self.plan.seed,
                                                               sids[lo:hi], dids[lo:hi], backend=self.backend,
                                                               prediction_type=m.prediction_type, check=False)
                    else:
                        losses[lo:hi] = F.mse_loss(pred.float(), target[lo:hi], reduction="none").mean(
                            dim=tuple(range(1, pred.dim())))
            sums[v] = torch.zeros(n_groups, dtype=torch.float64, device=dev).index_add_(0, group, losses.double())
        out = (sums.cpu() / batch.counts).view(len(variants), batch.n_images, self.plan.versions)  # the one wait
        for v in range(len(variants)):
            if not bool(torch.isfinite(out[v]).all()):
                self._non_finite(v, batch)
        return out

    def _non_finite(self, variant: int, batch: _Batch) -> None:
        bad = ~torch.isfinite(batch.x0.flatten(1)).all(dim=1)
        if bool(bad.any()):
            images = batch.rows.sample_id[bad].unique().tolist()
            raise ValueError(f"data: the prepared inputs of images {images[:10]} are NaN or infinite; prepare the "
                             "training set again (delete its prepared folder in the cache)")
        where = f"the UNet's outputs for variant {variant} are NaN or infinite"
        if self.precision == "fp16":
            raise ValueError(f"precision: {where} under fp16, whose range (up to 65504) the UNet's activations "
                             "exceeded; use bf16 or mixed (bfloat16's range), or fp32")
        raise ValueError(f"losses: {where} (precision {self.precision}); check the model, and for unlearned "
                         "weights the step's size (alpha, damping)")

    def batch_losses(self, ids: np.ndarray, variants: Sequence[dict[str, torch.Tensor] | None]) -> torch.Tensor:
        """[len(variants), len(ids), versions] float64 mean losses of one batch of images."""
        return self._compute(self._load(np.asarray(ids, dtype=np.int64)), variants)

    def run(self, variants: Sequence[dict[str, torch.Tensor] | None], indices: np.ndarray | None = None, *,
            progress: bool = True, desc: str = "score") -> np.ndarray:
        """[len(variants), len(indices), versions] float64 losses."""
        from tqdm.auto import tqdm

        if indices is None:
            indices = np.arange(self.data.n)
        else:
            given = np.asarray(indices)
            if given.dtype.kind not in "iu" and given.size:
                raise ValueError(f"indices: must be integer image ids, got {given.dtype}")
            indices = given.astype(np.int64).reshape(-1)
            if indices.size and (indices.min() < 0 or indices.max() >= self.data.n):
                raise ValueError(f"indices: must lie in [0, {self.data.n}), got values in "
                                 f"[{indices.min()}, {indices.max()}]")
        for w in variants:
            params.check_values(self.model.unet, w, "variants")
        out = np.empty((len(variants), len(indices), self.plan.versions), dtype=np.float64)
        batches = self.image_batches(indices)
        pos = 0
        with tqdm(total=len(indices), desc=desc, unit="img", disable=not progress) as bar, \
                contextlib.closing(self._loaded(batches)) as loaded:  # closing: an error stops the prefetch
            for ids, batch in zip(batches, loaded):
                with naming_the_batch("batch_size", self.batch_size, "rows", "the sweep"):
                    out[:, pos:pos + len(ids)] = self._compute(batch, variants).numpy()
                pos += len(ids)
                bar.update(len(ids))
        return out
