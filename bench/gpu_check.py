"""`make gpu-check`: every CUDA path of multitoken against the CPU fp32 reference.

No GPU has run this project's CUDA code in its tests (they run on CPU). On a machine with at
least one NVIDIA GPU this script runs each CUDA path at cheap sizes and compares it with the
same computation in fp32 on the CPU:

1. ``train_bf16``: a bf16-autocast training step (GPT + MTP, ``step_loss``) on CUDA vs the
   same weights fp32 on CPU (loss, per-depth losses, gradient cosine); also fp32 on CUDA.
2. ``flex_attention``: FlexAttention with the document block mask, forward and backward, vs
   SDPA with the dense mask on CPU; head size 32 (fp32 and bf16) and head size 8.
3. ``compiled_decode``: ``generate(..., compile=True)`` on CUDA vs eager greedy on CPU, plain
   and speculative, identical tokens at temperature 0.
4. ``nccl_parallel``: ``torch.cuda.device_count()`` NCCL ranks (CP 2 when there are >= 2 GPUs,
   else DP; world size 1 on one GPU) through ``multitoken.parallel`` vs one process.
5. ``fsdp2``: FSDP2 (``apply_fsdp``) on NCCL vs one process (loss and every gradient).
6. ``preflight_memory``: ``multitoken.train.preflight.memory_estimate`` vs the step's
   ``torch.cuda.max_memory_allocated`` (the estimate claims to be a lower bound).
8. ``cuda_paths`` (issue 22): the decisions a first GPU run depends on, one row each: local
   ranks against the GPUs (the default run's layout), the attention backend per head size
   (Flex where it compiles and the head is >= 16, else SDPA; a head-8 model's step runs),
   the collective timeout reaching NCCL, the block mask's memory at B = 8, T = 8192, the loss
   chunk per device (time of the head's backward at V = 128k against the CPU-sized chunks),
   FSDP2's bf16 parameters on NCCL, the host syncs of a step with checks off (one: the
   guard's flags), the gradient norm of no gradient on the GPU, ``generate --device`` and
   CUDA-graph decoding (``compiled_decode`` above runs it). HF models on the GPUs are checked
   by the CPU tests only (no HF folder here).
7. ``throughput``: a ~125M GPT (dim 768, 12 layers, 12 heads, vocab 50304, seq 2048) at D = 1,
   bf16 autocast, eager and with ``train.compile``: tokens/s and MFU.

Each check runs in a child process with its own time limit (one check crashing the CUDA
context or hanging cannot take the others down), the whole run within ``--time-limit``
seconds (default 470). Prints one table and one JSON line; exit code 1 if any check FAILs.

Without a GPU it prints one line and exits 0 (every check SKIP); ``--cpu-smoke`` runs the
checks at tiny sizes with the CUDA device replaced by the CPU (fp32, no autocast, gloo), so the
comparison logic itself runs: ``python bench/gpu_check.py --cpu-smoke --only train_bf16``.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

# ---- every multitoken import of this script, in one place (module paths are moving) ----
from multitoken import (
    MTPConfig,
    MTPModel,
    SequenceLayout,
    StepBatch,
    next_token_labels,
    step_loss,
)
from multitoken.decoding import generate
from multitoken.models import GPTConfig
from multitoken.models.attention import AttentionMask
from multitoken.models.parallelize import compile_gpt
from multitoken.parallel import (
    ParallelDims,
    apply_cp,
    apply_fsdp,
    global_normalizer,
    shard_batch,
    sync_gradients,
)
from multitoken.train.config import DataSection, ParallelSection, TrainConfig
from multitoken.train.preflight import memory_estimate

# -----------------------------------------------------------------------------------------

PAD = 0
# Peak dense bf16 tensor-core FLOP/s by device name (first match wins).
PEAK_BF16 = [("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("A100", 312e12)]


@dataclass
class Row:
    """One line of the table."""

    check: str
    case: str = ""
    result: str = ""
    reference: str = ""
    error: str = ""
    tolerance: str = ""
    status: str = "PASS"  # PASS, FAIL or SKIP
    reason: str = ""
    seconds: float = 0.0
    data: dict = field(default_factory=dict)


@dataclass
class Ctx:
    """Where a check runs: ``device`` (CUDA, or the CPU in smoke mode) and how."""

    device: torch.device
    smoke: bool
    perturb: bool = False
    emit: Callable[[Row], None] = print

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    @property
    def amp(self) -> bool:  # bf16 autocast where the trainer uses it (CUDA only)
        return self.cuda

    def autocast(self, enabled: bool | None = None):
        on = self.amp if enabled is None else enabled
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=on and self.cuda)

    def ref(self, x):
        """The reference as the comparison sees it; ``--perturb-reference`` spoils it on
        purpose (tensors flipped and scaled by 1.1, token lists with their last token
        changed) so that a test can see a check FAIL."""
        if not self.perturb:
            return x
        if isinstance(x, torch.Tensor):
            return (x.flip(-1) if x.dim() else x) * 1.1 + 1e-3
        if isinstance(x, list):
            return x[:-1] + [x[-1] + 1] if x else [1]
        if isinstance(x, (int, float)):
            return x * 1.1 + 1e-3
        return x

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)


# ----------------------------------------------------------------------------- helpers
def make_model(depth: int, seed: int = 0, **cfg) -> MTPModel:
    """The reference GPT with ``depth`` MTP depths, built on the CPU from ``seed``."""
    torch.manual_seed(seed)
    base = dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=256)
    base.update(cfg)
    return MTPModel.from_config(
        GPTConfig(**base), MTPConfig(num_depths=depth, loss_weight=0.3), pad_id=PAD
    )


def packed_rows(rows: int, seqlen: int, docs: int, seed: int = 0) -> list[list[int]]:
    """``rows`` lists of ``docs`` random document lengths (>= 1) adding up to ``seqlen``."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(rows):
        cuts = torch.randperm(seqlen - 1, generator=gen)[: docs - 1].add(1).sort().values.tolist()
        bounds = [0, *cuts, seqlen]
        out.append([b - a for a, b in zip(bounds, bounds[1:])])
    return out


def make_batch(lengths: list[list[int]], vocab: int, seed: int = 0):
    """``(ids, labels, layout)`` of packed rows on the CPU."""
    layout = SequenceLayout.from_lengths(lengths)
    ids = torch.randint(1, vocab, layout.shape, generator=torch.Generator().manual_seed(seed))
    return ids, next_token_labels(ids, layout), layout


def grads_of(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter's whole gradient, fp32 on the CPU (FSDP2 shards gathered)."""
    out = {}
    for name, param in model.named_parameters():
        if param.grad is not None:
            grad = param.grad
            grad = grad.full_tensor() if hasattr(grad, "full_tensor") else grad
            out[name] = grad.detach().float().cpu()
    return out


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |got - ref| / max |ref|`` (fp64)."""
    got, ref = got.detach().double().cpu(), ref.detach().double().cpu()
    return float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


def abs_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.detach().double().cpu() - ref.detach().double().cpu()).abs().max())


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu().flatten(), b.detach().double().cpu().flatten()
    if float(a.norm()) == 0 and float(b.norm()) == 0:
        return 1.0
    return float(F.cosine_similarity(a, b, dim=0))


def fmt(x: float) -> str:
    return f"{x:.3g}" if isinstance(x, float) else str(x)


def losses_row(
    ctx: Ctx, check: str, case: str, got: dict, ref: dict, loss_rtol: float, grad: tuple
) -> Row:
    """Compare ``{"loss", "depth_loss", "grads"}`` records: loss and per-depth losses by
    relative error; gradients by ``grad = ("cos", min_cos)`` or ``("rel", max_rel)``."""
    ref_loss, ref_depth = ctx.ref(ref["loss"]), ctx.ref(ref["depth_loss"])
    loss_e = max(rel_err(got["loss"], ref_loss), rel_err(got["depth_loss"], ref_depth))
    kind, bound = grad
    missing = sorted(set(ref["grads"]) ^ set(got["grads"]))
    worst_name, worst = "", 1.0 if kind == "cos" else 0.0
    for name, r in ref["grads"].items():
        if name not in got["grads"]:
            continue
        r = ctx.ref(r)
        if kind == "cos":
            v = cosine(got["grads"][name], r)
            if v < worst:
                worst, worst_name = v, name
        else:
            v = rel_err(got["grads"][name], r)
            if v > worst:
                worst, worst_name = v, name
    grad_ok = worst >= bound if kind == "cos" else worst <= bound
    ok = loss_e <= loss_rtol and grad_ok and not missing
    depth = ", ".join(f"{float(x):.4f}" for x in got["depth_loss"])
    ref_depth_s = ", ".join(f"{float(x):.4f}" for x in ref_depth)
    grad_s = f"grad {'min cos' if kind == 'cos' else 'max rel'} {worst:.5g}"
    reason = (
        ""
        if ok
        else "; ".join(
            s
            for s in (
                f"loss rel err {loss_e:.3g} > {loss_rtol}" if loss_e > loss_rtol else "",
                f"{grad_s} ({worst_name})" if not grad_ok else "",
                f"gradients missing on one side: {missing[:3]}" if missing else "",
            )
            if s
        )
    )
    return Row(
        check,
        case,
        result=f"loss {float(got['loss']):.5f} [{depth}]",
        reference=f"loss {float(ref_loss):.5f} [{ref_depth_s}]",
        error=f"loss rel {loss_e:.2e}; {grad_s}",
        tolerance=f"loss rel <= {loss_rtol:g}; grad "
        + (f"cos >= {bound:g}" if kind == "cos" else f"rel <= {bound:g}"),
        status="PASS" if ok else "FAIL",
        reason=reason,
        data={"loss_rel_err": loss_e, "grad_" + kind: worst},
    )


def step_record(model: torch.nn.Module, batch: StepBatch, ctx: Ctx, amp: bool) -> dict:
    """One forward + backward of ``model`` on ``batch`` (on the model's device)."""
    model.zero_grad(set_to_none=True)
    with ctx.autocast(amp):
        out = step_loss(model, batch, 0.3)
    out.loss.backward()
    return {
        "loss": out.loss.detach().float().cpu(),
        "depth_loss": out.depth_loss.detach().float().cpu(),
        "grads": grads_of(model),
    }


# ----------------------------------------------------------------------------- 1. training
def check_train_bf16(ctx: Ctx) -> None:
    """bf16 autocast step on the device vs fp32 on CPU (and fp32 on the device)."""
    if ctx.smoke:
        cfg, lengths = dict(vocab_size=61, dim=32, n_layers=2, n_heads=2), packed_rows(2, 32, 3)
    else:
        cfg = dict(vocab_size=512, dim=128, n_layers=2, n_heads=4, n_kv_heads=2)
        lengths = packed_rows(4, 256, 5)
    depth = 2
    model = make_model(depth, **cfg)
    ids, labels, layout = make_batch(lengths, cfg["vocab_size"])
    batch = StepBatch.build(ids, labels, layout, depth, PAD)
    ref = step_record(model, batch, ctx, amp=False)  # CPU fp32
    dev_model = copy.deepcopy(model).to(ctx.device)
    dev_batch = batch.to(ctx.device)
    cases = [("bf16 autocast" if ctx.amp else "fp32 (smoke: no autocast)", ctx.amp)]
    if ctx.cuda:
        cases.append(("fp32", False))
    for case, amp in cases:
        began = time.perf_counter()
        got = step_record(dev_model, dev_batch, ctx, amp)
        ctx.sync()
        # bf16 keeps 8 bits of mantissa: ~0.4% per rounding, a few of them per loss.
        loss_rtol, grad = (2e-2, ("cos", 0.99)) if amp else (1e-4, ("rel", 1e-3))
        row = losses_row(ctx, "train_bf16", case, got, ref, loss_rtol, grad)
        row.seconds = time.perf_counter() - began
        ctx.emit(row)


# ----------------------------------------------------------------------------- 2. attention
def _attention_layout(seqlen: int) -> SequenceLayout:
    # Packed documents, a one-token document and padding tokens (doc id -1, as the CP
    # sharder makes them) in two rows.
    a = [0] * 37 + [1] * 1 + [2] * (seqlen - 37 - 1 - 5) + [-1] * 5
    b = [3] * (seqlen // 2) + [-1] * 3 + [4] * (seqlen - seqlen // 2 - 3)
    return SequenceLayout.from_doc_ids(torch.tensor([a, b]))


def check_flex_attention(ctx: Ctx) -> None:
    """FlexAttention with the document block mask (forward + backward) vs SDPA on CPU."""
    from torch.nn.attention.flex_attention import flex_attention

    seqlen = 64 if ctx.smoke else 200  # 200: not a multiple of FlexAttention's 128 blocks
    layout = _attention_layout(seqlen)
    cases = [(32, torch.float32), (32, torch.bfloat16), (8, torch.float32)]
    if ctx.smoke:
        cases = [(32, torch.float32), (8, torch.float32)]
    for head_dim, dtype in cases:
        case = f"d={head_dim} {str(dtype).removeprefix('torch.')}"
        began = time.perf_counter()
        gen = torch.Generator().manual_seed(head_dim)
        q = torch.randn(2, 4, seqlen, head_dim, generator=gen)
        k = torch.randn(2, 2, seqlen, head_dim, generator=gen)
        v = torch.randn(2, 2, seqlen, head_dim, generator=gen)
        grad_out = torch.randn(2, 4, seqlen, head_dim, generator=gen)
        # Reference: SDPA with the dense mask, fp32 on CPU, from the inputs rounded to dtype.
        leaves = [t.to(dtype).float().requires_grad_() for t in (q, k, v)]
        ref_out = AttentionMask(layout, backend="sdpa").attend(*leaves)
        ref_out.backward(grad_out.to(dtype).float())
        ref = [ref_out.detach()] + [t.grad for t in leaves]
        dev = [t.to(ctx.device, dtype).requires_grad_(ctx.cuda) for t in (q, k, v)]
        mask = AttentionMask(layout.to(ctx.device), backend="flex")
        try:
            if ctx.cuda:
                out = mask.attend(*dev)  # the model's path: compiled flex_attention
                out.backward(grad_out.to(ctx.device, dtype))
                got = [out.detach()] + [t.grad for t in dev]
            else:  # CPU: uncompiled FlexAttention has a forward only
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = flex_attention(*dev, block_mask=mask.block_mask(), enable_gqa=True)
                got = [out]
            ctx.sync()
        except Exception as err:  # record what the CUDA path does with this head size
            if head_dim >= 16:
                raise
            ctx.emit(
                Row(
                    "flex_attention",
                    case,
                    status="SKIP",
                    seconds=time.perf_counter() - began,
                    reason=f"FlexAttention refused head size {head_dim}: "
                    f"{type(err).__name__}: {_first_line(err)}",
                )  # fmt: skip
            )
            continue
        atol = 5e-3 if dtype == torch.float32 else 3e-2  # fp32 (TF32 allowed) / bf16 output
        errs = [abs_err(g, ctx.ref(r)) for g, r in zip(got, ref)]
        names = ["out", "dq", "dk", "dv"][: len(errs)]
        ok = all(e <= atol for e in errs)
        reason = "" if ok else f"max abs err {max(errs):.3g} > {atol}"
        if not ctx.cuda:
            reason = (reason + "; " if reason else "") + "smoke: forward only (no CPU backward)"
        ctx.emit(
            Row(
                "flex_attention",
                case,
                result=f"flex {'fwd+bwd' if len(errs) == 4 else 'fwd'} |out| "
                f"{float(got[0].float().abs().max()):.3f}",
                reference="SDPA + dense mask, fp32 CPU",
                error=" ".join(f"{n} {e:.2e}" for n, e in zip(names, errs)),
                tolerance=f"abs <= {atol:g}",
                status="PASS" if ok else "FAIL",
                reason=reason,
                seconds=time.perf_counter() - began,
                data=dict(zip(names, errs)),
            )
        )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0][:300] if text else ""


# ----------------------------------------------------------------------------- 3. decoding
def _phrase_stream(vocab: int, length: int = 6000, seed: int = 0) -> torch.Tensor:
    """Short phrases, each followed by one of three others: MTP heads learn to agree with
    the main model inside a phrase, so speculative drafts are accepted and rolled back."""
    gen = torch.Generator().manual_seed(seed)
    words = [torch.randint(2, vocab, (int(n),), generator=gen).tolist()
             for n in torch.randint(2, 6, (8,), generator=gen)]  # fmt: skip
    successors = torch.randint(0, 8, (8, 3), generator=gen)
    stream, current = [], 0
    while len(stream) < length:
        stream += words[current]
        current = int(successors[current, int(torch.randint(0, 3, (1,), generator=gen))])
    return torch.tensor(stream)


def check_compiled_decode(ctx: Ctx) -> None:
    """generate(compile=True) on the device vs eager greedy on CPU, plain and speculative."""
    vocab, depth = 24, 2
    model = make_model(depth, vocab_size=vocab, dim=32, n_layers=2, n_heads=2, n_kv_heads=1,
                       max_seq_len=128).train()  # fmt: skip
    stream = _phrase_stream(vocab)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(1)
    for _ in range(40 if ctx.smoke else 80):  # ~1 s on CPU: heads that agree often
        starts = torch.randint(0, len(stream) - 32, (8,), generator=gen)
        ids = stream[starts[:, None] + torch.arange(32)]
        loss = model.loss(ids, next_token_labels(ids)).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    prompt, new = stream[:9].tolist(), 48
    reference = generate(model, prompt, new).tokens  # eager greedy, fp32 CPU
    dev_model = copy.deepcopy(model).to(ctx.device).eval()
    # Compiling on CPU (a C++ toolchain, ~30 s) is not what smoke mode checks: there the
    # same comparison runs on eager decoding.
    compiled = ctx.cuda
    for case, speculative in (("plain", False), (f"speculative D={depth}", True)):
        began = time.perf_counter()
        out = generate(dev_model, prompt, new, speculative=speculative, compile=compiled)
        ctx.sync()
        ref = ctx.ref(reference)
        same = next((i for i, (a, b) in enumerate(zip(out.tokens, ref)) if a != b), None)
        if same is None and len(out.tokens) != len(ref):
            same = min(len(out.tokens), len(ref))
        ok = same is None
        acc = out.stats.acceptance if speculative else []
        ctx.emit(
            Row(
                "compiled_decode",
                case + ("" if compiled else " (smoke: eager)"),
                result=f"{len(out.tokens)} tokens"
                + (
                    f", acceptance {[round(a, 2) if a is not None else None for a in acc]}"
                    if speculative
                    else ""
                ),  # fmt: skip
                reference="eager greedy, fp32 CPU",
                error="identical" if ok else f"first mismatch at token {same}",
                tolerance="identical tokens",
                status="PASS" if ok else "FAIL",
                reason=""
                if ok
                else f"got {out.tokens[same : same + 4]}, want {ref[same : same + 4]}",
                seconds=time.perf_counter() - began,
                data={"tokens": out.tokens, "reference": ref, "acceptance": acc},
            )
        )


# ----------------------------------------------------------------------------- 4-5. ranks
def _rank_model(spec: dict) -> MTPModel:
    return make_model(spec["depth"], **spec["model"])


def _rank_main(rank: int, world: int, spec: dict) -> None:
    """One rank of checks 4 and 5: join the group, run one step, save what it computed."""
    import torch.distributed as dist

    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    backend, mode, depth = spec["backend"], spec["mode"], spec["depth"]
    if backend == "nccl":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
        torch.set_num_threads(1)
    kwargs = {"device_id": device} if backend == "nccl" else {}
    dist.init_process_group(
        backend, init_method=f"file://{spec['store']}", rank=rank, world_size=world, **kwargs
    )
    try:
        dp, cp = spec["dp"], spec["cp"]
        groups = ParallelDims(dp=dp, cp=cp).build(device.type)
        ids, labels, layout = make_batch(spec["lengths"], spec["model"]["vocab_size"])
        per = len(spec["lengths"]) // dp
        rows = slice(per * groups.dp_rank, per * (groups.dp_rank + 1))
        ids, labels = ids[rows].to(device), labels[rows].to(device)
        local_layout = SequenceLayout.from_lengths(spec["lengths"][rows], device=device)
        model = _rank_model(spec).to(device)
        if cp > 1:
            apply_cp(model, groups.cp_group)
        if mode == "fsdp":
            apply_fsdp(model, groups.fsdp_mesh)
        if cp > 1:
            shard = shard_batch(ids, labels, local_layout, cp, groups.cp_rank, depth, PAD)
            batch = shard.step_batch(global_normalizer(shard, groups.token_group))
        else:
            batch = StepBatch.build(ids, labels, local_layout, depth, PAD)
            normalizer = global_normalizer(batch.depth_labels, groups.token_group)
            batch = StepBatch(batch.input_ids, batch.layout, batch.mtp_input_ids,
                              batch.depth_labels, normalizer, batch.kv_layout)  # fmt: skip
        out = step_loss(model, batch, 0.3)
        out.loss.backward()
        if mode != "fsdp":
            sync_gradients(model, groups.token_group)
        record = {
            "loss": out.loss.detach().float().cpu(),
            "depth_loss": out.depth_loss.detach().float().cpu(),
            "grads": grads_of(model),  # FSDP2: a collective (full_tensor), on every rank
            "local_numel": sum(
                (p.to_local() if hasattr(p, "to_local") else p).numel() for p in model.parameters()
            ),
        }
        torch.save(record, Path(spec["out"]) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _spawn_ranks(ctx: Ctx, mode: str, timeout: float = 120.0) -> tuple[list[dict], dict]:
    """Run :func:`_rank_main` on every rank (spawned); return the records and the layout."""
    import torch.multiprocessing as tmp

    # Spawned ranks unpickle _rank_main by module name: make this folder importable there
    # (spawn hands the children this sys.path) when the script was imported as a module.
    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    world = max(1, torch.cuda.device_count()) if ctx.cuda else 1
    backend = "nccl" if ctx.cuda else "gloo"
    if mode == "fsdp":
        dp, cp = world, 1
    else:
        cp = 2 if world >= 2 and world % 2 == 0 else 1
        dp = world // cp
    depth = 2
    seqlen = 32 if ctx.smoke else 128
    lengths = packed_rows(2 * dp, seqlen, 4, seed=3)
    model = dict(vocab_size=61 if ctx.smoke else 256, dim=64, n_layers=2, n_heads=4, n_kv_heads=2)
    with tempfile.TemporaryDirectory(prefix="gpu-check-ranks-") as tmpdir:
        spec = dict(backend=backend, mode=mode, depth=depth, dp=dp, cp=cp, lengths=lengths,
                    model=model, store=os.path.join(tmpdir, "store"), out=tmpdir)  # fmt: skip
        procs = tmp.start_processes(_rank_main, args=(world, spec), nprocs=world, join=False,
                                    start_method="spawn")  # fmt: skip
        deadline = time.monotonic() + timeout
        try:
            while not procs.join(timeout=1.0):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"the {world} {backend} ranks did not finish in {timeout:.0f}s"
                    )
        finally:
            for p in procs.processes:
                if p.is_alive():
                    p.kill()
        records = [torch.load(Path(tmpdir) / f"rank{r}.pt") for r in range(world)]
    return records, dict(world=world, backend=backend, dp=dp, cp=cp, depth=depth,
                         lengths=lengths, model=model)  # fmt: skip


def _single_process(info: dict) -> dict:
    """The reference: the plain model on the global batch, fp32 on CPU, one process."""
    model = make_model(info["depth"], **info["model"])
    ids, labels, layout = make_batch(info["lengths"], info["model"]["vocab_size"])
    batch = StepBatch.build(ids, labels, layout, info["depth"], PAD)
    out = step_loss(model, batch, 0.3)
    out.loss.backward()
    total = sum(p.numel() for p in model.parameters())
    return {"loss": out.loss.detach(), "depth_loss": out.depth_loss.detach(),
            "grads": grads_of(model), "numel": total}  # fmt: skip


def _ranks_check(ctx: Ctx, check: str, mode: str) -> None:
    began = time.perf_counter()
    records, info = _spawn_ranks(ctx, mode)
    ref = _single_process(info)
    got = {
        "loss": sum(r["loss"] for r in records),  # each rank's share of the global loss
        "depth_loss": sum(r["depth_loss"] for r in records),
    }
    world = info["world"]
    layout = f"{info['backend']} world {world}: " + (
        f"FSDP2 dp={info['dp']}" if mode == "fsdp" else f"dp={info['dp']} cp={info['cp']}"
    )
    if world == 1 and ctx.cuda:
        layout += " (1 GPU: one rank, no inter-GPU traffic tested)"
    # fp32 on both sides: only the order of the sums differs.
    for rank, r in enumerate(records):
        row = losses_row(ctx, check, f"{layout}, rank {rank}", {**got, "grads": r["grads"]},
                         ref, 1e-4, ("rel", 1e-3))  # fmt: skip
        if mode == "fsdp":
            share = r["local_numel"] / ref["numel"]
            row.result += f"; holds {share:.2f} of the params"
            if share > 1 / world + 0.05:
                row.status, row.reason = "FAIL", f"rank holds {share:.2f} of the parameters"
        row.seconds = time.perf_counter() - began
        ctx.emit(row)


def check_nccl_parallel(ctx: Ctx) -> None:
    """NCCL ranks through multitoken.parallel (CP 2 with >= 2 GPUs, else DP) vs 1 process."""
    _ranks_check(ctx, "nccl_parallel", "cp")


def check_fsdp2(ctx: Ctx) -> None:
    """FSDP2 (apply_fsdp) over every rank vs one process: loss and every gradient."""
    _ranks_check(ctx, "fsdp2", "fsdp")


# ----------------------------------------------------------------------------- 6. preflight
class _CPUPeak:
    """Peak CPU tensor bytes allocated inside the block (torch.profiler allocation events)."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self._prof = profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._prof.__enter__()
        return self

    def __exit__(self, *exc):
        self._prof.__exit__(*exc)
        events = sorted(
            (e.start_ns(), e.nbytes())
            for e in self._prof.profiler.kineto_results.events()
            if e.name() == "[memory]"
        )
        live = self.peak = 0
        for _, nbytes in events:
            live += nbytes
            self.peak = max(self.peak, live)
        return False


def check_preflight_memory(ctx: Ctx) -> None:
    """memory_estimate (a claimed lower bound) vs the measured peak of a real step."""
    if ctx.smoke:
        model_cfg = GPTConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2,
                              max_seq_len=128)  # fmt: skip
        rows, seqlen = 2, 128
    else:
        model_cfg = GPTConfig(vocab_size=8192, dim=512, n_layers=4, n_heads=8, n_kv_heads=4,
                              max_seq_len=2048)  # fmt: skip
        rows, seqlen = 8, 2048
    depth = 2
    cfg = TrainConfig(
        model=model_cfg,
        mtp=MTPConfig(num_depths=depth),
        data=DataSection(seq_len=seqlen, batch_size=rows, vocab_size=model_cfg.vocab_size),
        parallel=ParallelSection(dp=1, cp=1),
    )
    parts = memory_estimate(cfg, ctx.device.type)  # counts the attention this device runs
    estimate = sum(parts.values())
    ids, labels, layout = make_batch(packed_rows(rows, seqlen, 4), model_cfg.vocab_size)
    began = time.perf_counter()

    def step() -> None:
        torch.manual_seed(0)
        model = MTPModel.from_config(model_cfg, MTPConfig(num_depths=depth)).to(ctx.device)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batch = StepBatch.build(ids, labels, layout, depth, PAD).to(ctx.device)
        for _ in range(2):  # the second step holds AdamW's state from the first
            with ctx.autocast():
                out = step_loss(model, batch, 0.3)
            out.loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        ctx.sync()

    if ctx.cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(ctx.device)
        base = torch.cuda.memory_allocated(ctx.device)
        step()
        measured = torch.cuda.max_memory_allocated(ctx.device) - base
        how = "torch.cuda.max_memory_allocated"
    else:
        with _CPUPeak() as peak:
            step()
        measured, how = peak.peak, "CPU allocation peak (torch.profiler)"
    gib = 1 << 30
    ok = ctx.ref(estimate) <= measured
    largest = max(parts, key=parts.get)
    ctx.emit(
        Row(
            "preflight_memory",
            f"dim {model_cfg.dim}, {model_cfg.n_layers} layers, {rows}x{seqlen}, D={depth}"
            + (", bf16" if ctx.amp else ""),
            result=f"measured {measured / gib:.3f} GiB ({how})",
            reference=f"estimate {ctx.ref(estimate) / gib:.3f} GiB (largest: {largest} "
            f"{parts[largest] / gib:.3f})",
            error=f"estimate / measured = {ctx.ref(estimate) / max(measured, 1):.2f}",
            tolerance="estimate <= measured (a lower bound)",
            status="PASS" if ok else "FAIL",
            reason=""
            if ok
            else "the 'lower bound' exceeds the real peak: preflight could refuse a run that fits",
            seconds=time.perf_counter() - began,
            data={"estimate": estimate, "measured": measured, "parts": parts},
        )
    )


# ----------------------------------------------------------------------------- 7. throughput
def peak_flops(name: str) -> float | None:
    for key, flops in PEAK_BF16:
        if key.lower() in name.lower():
            return flops
    return None


def _graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def _train_step(ctx: Ctx, model, batch: StepBatch, optimizer) -> torch.Tensor:
    with ctx.autocast():
        out = step_loss(model, batch, 0.3)
    out.loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return out.loss


def check_throughput(ctx: Ctx) -> None:
    """~125M GPT at D = 1: tokens/s and MFU, eager and compiled (train.compile)."""
    if ctx.smoke:
        cfg = dict(vocab_size=256, dim=64, n_layers=2, n_heads=4, n_kv_heads=4, max_seq_len=128)
        rows, seqlen, warmup, steps = 2, 128, 1, 2
    else:
        cfg = dict(vocab_size=50304, dim=768, n_layers=12, n_heads=12, n_kv_heads=12,
                   max_seq_len=2048)  # fmt: skip
        rows, seqlen, warmup, steps = 8, 2048, 3, 10
    depth = 1
    name = torch.cuda.get_device_name(ctx.device) if ctx.cuda else "cpu"
    peak = peak_flops(name) if ctx.cuda else None
    for compiled in [False, True] if ctx.cuda else [False]:
        began = time.perf_counter()
        case = ("compiled (train.compile)" if compiled else "eager") + (
            ", bf16 autocast" if ctx.amp else ", fp32 (smoke)"
        )
        r = rows
        while True:
            try:
                model = make_model(depth, **cfg).to(ctx.device)
                note = ""
                if compiled and not compile_gpt(model, verbose=False):
                    note = "torch.compile cannot run here: eager"
                optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
                lengths = packed_rows(r, seqlen, 4, seed=5)
                ids, labels, layout = make_batch(lengths, cfg["vocab_size"])
                batch = StepBatch.build(ids, labels, layout, depth, PAD).to(ctx.device)

                for _ in range(warmup):
                    _train_step(ctx, model, batch, optimizer)
                ctx.sync()
                graphs = _graphs_compiled()
                start = time.perf_counter()
                for _ in range(steps):
                    loss = _train_step(ctx, model, batch, optimizer)
                ctx.sync()
                elapsed = time.perf_counter() - start
                # Every step builds a new AttentionMask (and block mask): a graph compiled in
                # the timed steps means dynamo recompiles per step (and, past its limit,
                # silently runs the attention eagerly).
                recompiled = _graphs_compiled() - graphs
                break
            except torch.OutOfMemoryError:
                if r == 1:
                    raise
                r //= 2
                model = optimizer = batch = None
                torch.cuda.empty_cache()
        params = sum(p.numel() for p in model.parameters())
        tokens_per_s = steps * r * seqlen / elapsed
        dim, vocab, layers = cfg["dim"], cfg["vocab_size"], cfg["n_layers"] + depth
        # 6 N per token (N counts the tied embedding once, as the main head), the head again
        # for each MTP depth, and causal-attention matmuls over the whole row (PaLM's
        # 12 L H T, document masking not discounted).
        flops_per_token = 6 * params + 6 * depth * vocab * dim + 12 * layers * dim * seqlen
        mfu = tokens_per_s * flops_per_token / peak if peak else None
        finite = math.isfinite(float(loss.detach()))
        problems = [] if finite else [f"loss {float(loss.detach())}"]
        if recompiled:
            problems.append(f"{recompiled} graph(s) compiled during the timed steps")
        ctx.emit(
            Row(
                "throughput",
                case + (f"; {note}" if note else ""),
                result=f"{tokens_per_s:,.0f} tokens/s"
                + (f", MFU {100 * mfu:.1f}%" if mfu is not None else ""),
                reference=f"peak {peak / 1e12:.0f} TFLOP/s bf16 ({name})"
                if peak
                else f"{name}: no peak known, tokens/s only",
                error=f"{params / 1e6:.1f}M params, {r}x{seqlen} tokens/step, "
                f"{steps} steps in {elapsed:.2f}s",
                tolerance="finite loss, no recompilation in the timed steps",
                status="FAIL" if problems else "PASS",
                reason="; ".join(problems),
                seconds=time.perf_counter() - began,
                data={
                    "tokens_per_s": tokens_per_s,
                    "mfu": mfu,
                    "params": params,
                    "rows": r,
                    "seqlen": seqlen,
                    "flops_per_token": flops_per_token,
                    "graphs_compiled_while_timed": recompiled,
                },
            )  # fmt: skip
        )
        model = optimizer = batch = None
        if ctx.cuda:
            torch.cuda.empty_cache()


# ----------------------------------------------------------------------------- 8. issue 22
def _path_row(case: str, ok: bool, result: str, reference: str, began: float, **data) -> Row:
    return Row(
        "cuda_paths", case, result=result, reference=reference, status="PASS" if ok else "FAIL",
        seconds=time.perf_counter() - began, data=data,
    )  # fmt: skip


def check_cuda_paths(ctx: Ctx) -> None:
    """Issue 22's items on the GPU (see the module docstring); rows that need CUDA are SKIP in
    smoke mode."""
    from multitoken.loss import chunk_elements_for, linear_cross_entropy
    from multitoken.models.attention import resolve_backend
    from multitoken.parallel import grad_norm
    from multitoken.train.config_io import load_config
    from multitoken.train.preflight import fit_to_devices

    if not ctx.cuda:
        ctx.emit(Row("cuda_paths", "all", status="SKIP", reason="needs CUDA"))
        return
    began = time.perf_counter()
    cfg = load_config(None, [])
    fitted = fit_to_devices(cfg, cfg.parallel.world, explicit=set())
    gpus = torch.cuda.device_count()
    ok = fitted.parallel.world <= gpus
    ctx.emit(_path_row("1 default layout", ok, f"cp={fitted.parallel.cp}", f"{gpus} GPU(s)", began))
    began = time.perf_counter()
    got = (resolve_backend("auto", "cuda", 64), resolve_backend("auto", "cuda", 8))
    model = make_model(1, dim=32, n_heads=4, n_kv_heads=2).to(ctx.device)  # head size 8
    ids, labels, layout = make_batch(packed_rows(2, 64, 3), 128)
    with ctx.autocast():
        out = step_loss(model, StepBatch.build(ids, labels, layout, 1, PAD).to(ctx.device), 0.3)
    out.loss.backward()
    ok = got == ("flex", "sdpa") and bool(torch.isfinite(out.loss))
    ctx.emit(_path_row("2 backend d=64 / d=8", ok, "/".join(got), "flex/sdpa", began))
    began = time.perf_counter()
    layout = _attention_layout(8192)
    rows8 = SequenceLayout(layout.doc_ids.repeat(4, 1), layout.positions.repeat(4, 1),
                           layout.seq_index.repeat(4, 1))  # fmt: skip
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    AttentionMask(rows8.to(ctx.device), backend="flex").block_mask()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    pairs = 8 * 8192 * 8192
    ctx.emit(_path_row("5 block mask B=8 T=8192", peak * 100 < pairs, f"peak {peak / 2**20:.1f} "
                       "MiB", f"dense path ~{10 * pairs / 2**30:.1f} GiB", began))  # fmt: skip
    began = time.perf_counter()
    gen = torch.Generator(device=ctx.device).manual_seed(0)
    h = torch.randn(8192, 1024, device=ctx.device, generator=gen, requires_grad=True)
    w = torch.randn(128256, 1024, device=ctx.device, generator=gen) * 0.02
    w.requires_grad_()
    t = torch.randint(0, 128256, (8192,), device=ctx.device, generator=gen)
    times = {}
    for chunk in (1 << 23, chunk_elements_for(ctx.device)):
        for _ in range(2):  # the second is timed
            torch.cuda.synchronize()
            start = time.perf_counter()
            with ctx.autocast():
                linear_cross_entropy(h, w, t, chunk_elements=chunk).loss_sum.backward()
            torch.cuda.synchronize()
            times[chunk] = time.perf_counter() - start
            h.grad = w.grad = None
    small, big = times[1 << 23], times[chunk_elements_for(ctx.device)]
    ctx.emit(_path_row("6 loss chunk V=128k", big <= small * 1.05, f"{big * 1e3:.0f} ms at 2^26",
                       f"{small * 1e3:.0f} ms at 2^23", began, speedup=small / big))  # fmt: skip
    began = time.perf_counter()
    norm = grad_norm([], ctx.device)
    ctx.emit(_path_row("11 norm of no gradient", norm.device.type == "cuda", str(norm.device),
                       "cuda", began))  # fmt: skip
    _fsdp_and_syncs(ctx)


def _fsdp_and_syncs(ctx: Ctx) -> None:
    """Items 3, 7 and 8 on a one-rank NCCL group (this check's own process)."""
    import datetime

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from multitoken.parallel import clip_grad_norm, init_distributed
    from multitoken.train.batching import rank_batch
    from multitoken.train.guard import NonFiniteGuard

    began = time.perf_counter()
    os.environ.pop("WORLD_SIZE", None)
    init_distributed("nccl", timeout=datetime.timedelta(seconds=3600))
    try:
        try:
            backend = dist.distributed_c10d._get_default_group()._get_backend(ctx.device)
            seen_timeout = backend.options._timeout.total_seconds()
        except Exception as err:  # a private attribute: report, do not fail
            seen_timeout = f"unreadable ({type(err).__name__})"
        ctx.emit(_path_row("3 NCCL timeout", seen_timeout in (3600, 3600.0), str(seen_timeout),
                           "3600 s (parallel.timeout_s)", began))  # fmt: skip
        model = make_model(1)
        apply_fsdp(model.to(ctx.device), init_device_mesh("cuda", (1,)), param_dtype=torch.bfloat16)
        seen = []
        model.decoder.layers[0].register_forward_pre_hook(
            lambda m, a: seen.append(m.attention.wq.weight.dtype)
        )
        ids, labels, layout = make_batch(packed_rows(2, 128, 3), 128)
        global_batch = {"input_ids": ids, "labels": labels, "cu_seqlens": layout.cu_seqlens()}
        dims = ParallelDims(dp=1, cp=1, tp=1)
        guard = NonFiniteGuard(5, None, ctx.device, False)
        batch = rank_batch(global_batch, dims, 1, PAD, ctx.device)  # the host's part
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught, multitoken_checks(False):
            warnings.simplefilter("always")
            with ctx.autocast():
                out = step_loss(model, batch, 0.3)
            out.loss.backward()
            norm = clip_grad_norm(list(model.parameters()), 1.0, ctx.device)
            guard.check(out.loss, norm, False)
        torch.cuda.set_sync_debug_mode(0)
        syncs = [w for w in caught if "synchroniz" in str(w.message)]
        ctx.emit(_path_row("7 FSDP2 param dtype", seen == [torch.bfloat16], str(seen),
                           "[torch.bfloat16]", began))  # fmt: skip
        ctx.emit(_path_row("8 host syncs, checks off", len(syncs) <= 1, f"{len(syncs)} sync(s)",
                           "1 (the guard's flags)", began,
                           where=[str(w.message)[:120] for w in syncs]))  # fmt: skip
    finally:
        dist.destroy_process_group()


def multitoken_checks(enabled: bool):
    from multitoken.errors import validation

    return validation(enabled)


# ----------------------------------------------------------------------------- driver
# name, function, time limit on the GPU (seconds)
CHECKS: list[tuple[str, Callable[[Ctx], None], int]] = [
    ("train_bf16", check_train_bf16, 90),
    ("flex_attention", check_flex_attention, 120),
    ("compiled_decode", check_compiled_decode, 150),
    ("nccl_parallel", check_nccl_parallel, 90),
    ("fsdp2", check_fsdp2, 90),
    ("preflight_memory", check_preflight_memory, 90),
    ("throughput", check_throughput, 200),
    ("cuda_paths", lambda ctx: check_cuda_paths(ctx), 150),
]
NAMES = [name for name, _, _ in CHECKS]


def run_in_process(name: str, ctx: Ctx) -> list[Row]:
    """Run one check here; an exception becomes a FAIL row (the other checks go on)."""
    rows: list[Row] = []
    emit = ctx.emit

    def collect(row: Row) -> None:
        rows.append(row)
        emit(row)

    fn = dict((n, f) for n, f, _ in CHECKS)[name]
    began = time.perf_counter()
    try:
        fn(Ctx(ctx.device, ctx.smoke, ctx.perturb, collect))
    except Exception as err:
        row = Row(name, "error", status="FAIL", reason=f"{type(err).__name__}: {_first_line(err)}",
                  seconds=time.perf_counter() - began,
                  data={"traceback": traceback.format_exc()[-4000:]})  # fmt: skip
        collect(row)
    return rows


def run_isolated(name: str, args: argparse.Namespace, limit: float) -> list[Row]:
    """Run one check in a child process of this script, killed after ``limit`` seconds; the
    rows it wrote before dying or timing out are kept."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmpdir:
        out = Path(tmpdir) / "rows.jsonl"
        cmd = [
            sys.executable,
            str(Path(__file__).resolve()),
            "--only",
            name,
            "--child-out",
            str(out),
        ]
        if args.cpu_smoke:
            cmd.append("--cpu-smoke")
        if args.perturb_reference:
            cmd.append("--perturb-reference")
        began = time.perf_counter()
        problem = ""
        # Its own session: on a timeout the whole group goes (spawned ranks, compile workers).
        proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
        )
        try:
            stdout, stderr = proc.communicate(timeout=limit)
            if proc.returncode not in (0, 1):
                tail = (stderr or stdout).strip().splitlines()[-3:]
                problem = f"child exited with code {proc.returncode}: {' | '.join(tail)[:400]}"
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            problem = f"timed out after {limit:.0f}s (the check's time limit)"
        rows = []
        if out.exists():
            rows = [Row(**json.loads(line)) for line in out.read_text().splitlines() if line]
        if problem:
            rows.append(Row(name, "child process", status="FAIL", reason=problem,
                            seconds=time.perf_counter() - began))  # fmt: skip
        return rows


def print_table(rows: list[Row]) -> None:
    header = ["check", "case", "device result", "reference", "max abs/rel error", "tolerance",
              "status"]  # fmt: skip

    def cells(r: Row) -> list[str]:
        status = r.status + (f" ({r.reason})" if r.reason else "")
        return [r.check, r.case, r.result, r.reference, r.error, r.tolerance, status]

    table = [header] + [[c[:110] for c in cells(r)] for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def environment() -> dict:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0]}
    if torch.cuda.is_available():
        env["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return env


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Run every CUDA path of multitoken against the CPU fp32 reference "
        "(needs an NVIDIA GPU; --cpu-smoke exercises the comparisons on CPU).",
    )
    parser.add_argument("--list", action="store_true", help="print the check names and exit")
    parser.add_argument("--only", default="", metavar="NAME[,NAME]", help="run only these checks")
    parser.add_argument("--json", default="", metavar="PATH", help="also write the JSON here")
    parser.add_argument(
        "--cpu-smoke",
        action="store_true",
        help="tiny sizes, the CPU in place of the GPU, fp32, gloo: checks the checking code",
    )
    parser.add_argument(
        "--time-limit", type=float, default=470.0, help="seconds for the whole run (GPU)"
    )
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one child process per check, with its time limit (default: on with a GPU, "
        "off with --cpu-smoke)",
    )
    parser.add_argument("--perturb-reference", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    selected = [n.strip() for n in args.only.split(",") if n.strip()] or list(NAMES)
    unknown = [n for n in selected if n not in NAMES]
    if unknown:
        parser.error(f"unknown check(s) {unknown}; choose among {NAMES}")
    args.selected = selected
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.list:
        print("\n".join(NAMES))
        return 0
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", 0) if cuda and not args.cpu_smoke else torch.device("cpu")
    if args.child_out:  # a child of run_isolated: run the check, write its rows, no table
        out = Path(args.child_out)

        def write(row: Row) -> None:
            with out.open("a") as f:
                f.write(json.dumps(asdict(row), default=str) + "\n")

        ctx = Ctx(device, args.cpu_smoke, args.perturb_reference, write)
        rows = [r for name in args.selected for r in run_in_process(name, ctx)]
        return 1 if any(r.status == "FAIL" for r in rows) else 0

    began = time.perf_counter()
    rows: list[Row] = []
    if not cuda and not args.cpu_smoke:
        build = "" if torch.version.cuda else f"; this torch ({torch.__version__}) has no CUDA"
        print(f"no CUDA device{build}: every check SKIP (python bench/gpu_check.py --cpu-smoke "
              "runs the comparisons at tiny sizes on the CPU)")  # fmt: skip
        rows = [Row(n, status="SKIP", reason="no CUDA device") for n in args.selected]
    else:
        if cuda and not args.cpu_smoke:
            torch.cuda.set_device(device)
        isolate = args.isolate if args.isolate is not None else not args.cpu_smoke
        ctx = Ctx(device, args.cpu_smoke, args.perturb_reference, lambda row: None)
        for i, name in enumerate(args.selected):
            left = args.time_limit - (time.perf_counter() - began)
            limit = dict((n, t) for n, _, t in CHECKS)[name]
            # Leave the checks still to come at least 20 s each.
            limit = min(limit, left - 20 * (len(args.selected) - i - 1))
            if isolate and limit < 10:
                rows.append(Row(name, status="SKIP", reason="the run's --time-limit is spent"))
                continue
            print(f"[gpu-check] {name} ...", file=sys.stderr, flush=True)
            rows += run_isolated(name, args, limit) if isolate else run_in_process(name, ctx)
        print_table(rows)
    record = {
        "mode": "cpu-smoke" if args.cpu_smoke else ("cuda" if cuda else "no-cuda"),
        "env": environment(),
        "seconds": round(time.perf_counter() - began, 1),
        "failed": sum(r.status == "FAIL" for r in rows),
        "checks": [asdict(r) for r in rows],
    }
    line = json.dumps(record, default=str)
    if cuda or args.cpu_smoke:
        print(line)
    if args.json:
        Path(args.json).write_text(line + "\n")
    return 1 if record["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
