"""``parallelize_gpt``: the reference GPT + MTP made parallel from outside, in torchtitan's order.

:func:`parallelize_gpt` applies, in this order: tensor parallelism (:func:`apply_tp`, below),
context parallelism's K/V all-gather (:func:`~multitoken.parallel.kv_gather.apply_cp`),
``torch.compile`` per layer, then FSDP2 (or HSDP) over the ranks that hold different tokens
(:func:`~multitoken.parallel.fsdp.apply_fsdp`). It returns the cross-entropy the layout needs
(the vocabulary-parallel one under TP), which the training step passes to
:func:`~multitoken.mtp_model.step_loss`: nothing is assigned onto the model.

Tensor parallelism:
The torchtitan plan (``parallelize_module``) on the reference GPT and on every MTP depth:

* attention: ``wq``, ``wk``, ``wv`` column-wise (each rank computes ``n_heads / tp`` query and
  ``n_kv_heads / tp`` key/value heads, so grouped-query attention keeps its head mapping),
  ``wo`` row-wise;
* feed-forward: ``w1``, ``w3`` column-wise, ``w2`` row-wise;
* the embedding vocabulary-parallel (row-wise over the vocabulary, output all-reduced), the
  untied head sharded by vocabulary rows too, and the loss a vocabulary-parallel chunked
  cross-entropy (:class:`~multitoken.parallel.vocab_loss.VocabParallelCrossEntropy`, returned
  for the step): no rank ever holds logits of the whole vocabulary;
* each MTP depth's layer as the main layers, and its ``eh_proj`` split too (below).

With **sequence parallelism** (the default) the activations between the attention and the
feed-forward blocks are split by sequence over the TP ranks, so every norm and every residual
add runs on ``T / tp`` positions and no rank holds the full ``[B, T, H]`` residual stream
inside the layer stack (Megatron-LM's and torchtitan's layout):

* the decoder's first layer takes its (replicated) input as the local sequence shard (a
  slice, no message); each layer's ``attention_norm`` and ``ffn_norm`` are
  ``SequenceParallel``; the attention's and the feed-forward's input is all-gathered over TP,
  and ``wo`` and ``w2`` reduce-scatter their output back to sequence shards;
* the decoder's final ``norm`` runs on the shards and its output ``h^0`` is all-gathered to
  the full sequence as a plain tensor: the MTP depths read ``h^0`` and the embedding at
  positions other ranks' shards hold, and the vocabulary-parallel loss needs every token;
* each MTP depth: ``enorm`` / ``hnorm`` on the full (replicated) inputs, ``eh_proj``
  row-wise (its input split by features locally, its output reduce-scattered to sequence
  shards), its layer as above, its ``final_norm`` gathered like the decoder's.

Per transformer layer that is two all-gathers and two reduce-scatters forward, the same
backward (the same bytes as the two all-reduces each way without it: an all-reduce is a
reduce-scatter plus an all-gather), plus one all-reduce of each norm weight's gradient.
The sequence length each rank holds (``T`` per CP rank) must divide by ``tp``.

Without it (``sequence_parallel=False``): norms are replicated and the activations between
blocks are plain, replicated tensors. Per transformer layer that is two all-reduces forward
(``wo``, ``w2``) and two backward (the gradient of the attention's and the feed-forward's
input: each module takes its input as one replicated DTensor, so ``wq``, ``wk`` and ``wv``
sum their partial gradients before the single all-reduce); each MTP depth's ``eh_proj`` is
column-wise with its output gathered back to the full width as a plain tensor
(``use_local_output=True``: it is added to plain tensors in the depth's layer). Both
layouts keep context parallelism's K/V all-gather (on the local heads) and the MTP halos
unchanged: attention always sees its rank's whole (CP-local) sequence.

The model never imports ``torch.distributed``; this module rewrites it in place. Only
:mod:`multitoken.parallel` building blocks are used; this file holds what names the GPT's parts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    SequenceParallel,
    parallelize_module,
)

from multitoken.errors import ConfigError, InputError
from multitoken.loss import linear_cross_entropy
from multitoken.models.attention import Attention
from multitoken.models.pipeline import GPTStage, needs_embedding_on_last, prune_model
from multitoken.parallel.compile import compile_modules
from multitoken.parallel.dims import ParallelDims
from multitoken.parallel.fsdp import apply_fsdp, apply_fsdp_stages, decoder_layers
from multitoken.parallel.kv_gather import apply_cp
from multitoken.parallel.pipeline import (
    Pipeline,
    rank_stages,
    split_layers,
    stage_rank,
    stages_per_rank,
)
from multitoken.parallel.tensor import SEQ, check_sequence, gathered_norm, sum_weight_gradients
from multitoken.parallel.vocab_loss import VocabParallelCrossEntropy

__all__ = [
    "parallelize_gpt",
    "compile_gpt",
    "apply_tp",
    "check_tp",
    "check_tp_split",
    "check_vocab_split",
    "tp_layers",
    "pipeline_gpt",
]


def parallelize_gpt(
    model: nn.Module,
    dims: ParallelDims,
    *,
    sequence_parallel: bool = True,
    compile: bool = False,
    verbose: bool = True,
    mixed_precision: torch.dtype | None = None,
) -> Callable:
    """Make ``model`` (an :class:`~multitoken.mtp_model.MTPModel` on the reference GPT, on its
    device, the same weights on every rank) parallel over ``dims`` in place: TP -> CP ->
    compile -> FSDP2. Returns the cross-entropy to pass to
    :func:`~multitoken.mtp_model.step_loss` (vocabulary-parallel under TP).

    Args:
        model: the model.
        dims: the built layout (:meth:`~multitoken.parallel.dims.ParallelDims.build`); in one
            process nothing is applied but ``compile``.
        sequence_parallel: with TP, split the activations between blocks by sequence.
        compile: compile every main layer and MTP depth (each its own graph).
        verbose: print why compile cannot run here, when it cannot.
        mixed_precision: the dtype FSDP2 gathers the parameters in (bf16 when the step runs
            under bf16 autocast on CUDA: half the all-gather bytes, no re-cast of every weight
            at every use); None = the parameters' own. Gradients are reduced in fp32.
    """
    cross_entropy: Callable = linear_cross_entropy
    if dims.tp > 1:
        cross_entropy = apply_tp(model, dims.tp_mesh, sequence_parallel=sequence_parallel)
    if dims.cp > 1:
        apply_cp(model, dims.cp_group)
    if compile:
        compile_gpt(model, verbose)
    if dims.token_world_size > 1 and dims.pp == 1:  # under pp: per stage (pipeline_gpt)
        apply_fsdp(model, dims.fsdp_mesh, param_dtype=mixed_precision)
    return cross_entropy


def pipeline_gpt(
    model: nn.Module,
    dims: ParallelDims,
    schedule: str,
    microbatches: int,
    *,
    layers: tuple[int, ...] = (),
    device: torch.device | str = "cpu",
    cross_entropy: Callable = linear_cross_entropy,
    mixed_precision: torch.dtype | None = None,
) -> Pipeline:
    """Cut ``model`` (the whole model, the same weights on every rank, after TP and CP) into
    this rank's pipeline stages: the model is pruned in place to them
    (:func:`~multitoken.models.pipeline.prune_model`, parameter names unchanged) and the
    returned :class:`~multitoken.parallel.pipeline.Pipeline` runs them.

    Args:
        dims: the built layout (``dims.pp > 1``).
        schedule, microbatches: ``parallel.pp_schedule``, ``parallel.pp_microbatches``.
        layers: main layers per stage (``parallel.pp_layers``); empty = an even split.
        device: where the stages run; cross_entropy: the head's loss (``apply_tp``'s).
        mixed_precision: FSDP2's parameter dtype, when the stages are sharded over the
            ranks holding other tokens (``dims.token_world_size > 1``).
    """
    pp, n_stages = dims.pp, dims.pp * stages_per_rank(schedule)
    counts = split_layers(model.decoder.config.n_layers, n_stages, layers)
    stages = rank_stages(schedule, pp, dims.pp_rank)
    apart = stage_rank(schedule, pp, 0) != stage_rank(schedule, pp, n_stages - 1)
    shared = apart and needs_embedding_on_last(model)
    prune_model(model, stages, counts)
    modules = [GPTStage(model, s, n_stages, counts) for s in stages]
    if dims.token_world_size > 1:
        apply_fsdp_stages(modules, dims.fsdp_mesh, param_dtype=mixed_precision)
    return Pipeline(
        modules, stages, n_stages, schedule, microbatches, dims.pp_group,
        dims.embed_group if shared else None, device, cross_entropy,
    )  # fmt: skip


def compile_gpt(model: nn.Module, verbose: bool = True) -> bool:
    """Compile every main layer and MTP depth in place; False where compile cannot run."""
    embedding = model.decoder.tok_embeddings
    if isinstance(embedding.weight, DTensor):
        # Under TP the embedding's output is a view of a DTensor's local tensor, and a
        # compiled layer given that view as an input hands its gradient back as a plain
        # tensor to the DTensor all-reduce's backward, which fails (measured, torch 2.13:
        # "'Tensor' object has no attribute '_local_tensor'"). A copy is an ordinary input.
        embedding.register_forward_hook(lambda module, args, output: output.clone())
    depths = [] if model.mtp is None else list(model.mtp.depths)
    modules = [*model.decoder.layers, *depths]
    return compile_modules(modules, model.head_weight.device.type, verbose)


def tp_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers to shard: the decoder's, then every MTP depth's."""
    mtp = getattr(model, "mtp", None)
    depths = [] if mtp is None else [depth.layer for depth in mtp.depths]
    return decoder_layers(model, "apply_tp") + depths


def check_tp(model: nn.Module, tp_size: int) -> None:
    """Refuse, before any collective, a model that ``tp_size`` ranks cannot split evenly.

    Raises:
        ConfigError: query or key/value heads, the feed-forward width or the vocabulary not
            divisible by ``tp_size``; a layer that is not the reference layout.
    """
    check_vocab_split(model.decoder.vocab_size, tp_size)
    for index, layer in enumerate(tp_layers(model)):
        attention = getattr(layer, "attention", None)
        feed_forward = getattr(layer, "feed_forward", None)
        if not isinstance(attention, Attention) or not hasattr(feed_forward, "w1"):
            raise InputError(
                f"apply_tp: layer {index} ({type(layer).__name__}) is not a reference Block "
                "(attention: Attention, feed_forward with w1, w2, w3)"
            )
        check_tp_split(
            attention.n_heads, attention.n_kv_heads, feed_forward.w1.out_features, tp_size
        )


def check_vocab_split(rows: int, tp: int, key: str = "model.vocab_size") -> None:
    """Refuse vocabulary rows ``tp`` cannot split (the embedding and head are split by rows);
    the message names the multiple to set ``key`` to."""
    if rows % tp:
        raise ConfigError(
            f"the vocabulary's {rows} rows are not divisible by parallel.tp={tp} (the "
            f"embedding and head are split by rows): set {key}={-(-rows // tp) * tp}"
        )


def check_tp_split(n_heads: int, n_kv_heads: int, ffn_dim: int, tp: int) -> None:
    """Refuse a layer ``tp`` ranks cannot split evenly (the one copy of this check: the training
    config runs it before any rank starts, :func:`check_tp` on a built model)."""
    for key, size in (("n_heads", n_heads), ("n_kv_heads", n_kv_heads), ("ffn_dim", ffn_dim)):
        if size % tp:
            raise ConfigError(
                f"model.{key}={size} is not divisible by parallel.tp={tp}: every TP rank "
                "computes an equal share of the heads and of the feed-forward width"
            )


def _layer_plan(sequence_parallel: bool) -> dict:
    # The attention and the feed-forward take their input as ONE DTensor (replicated, or
    # gathered from sequence shards): the partial input gradients of wq, wk, wv (w1, w3)
    # then add up as DTensors and are reduced once, instead of once per projection.
    # Attention's other positional arguments (rope, mask, cache) are not tensors to
    # distribute.
    between = SEQ if sequence_parallel else Replicate()
    plan = {
        "attention": PrepareModuleInput(
            input_layouts=(between, None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=False,
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(output_layouts=between),
        "feed_forward": PrepareModuleInput(
            input_layouts=(between,),
            desired_input_layouts=(Replicate(),),
            use_local_output=False,
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(output_layouts=between),
    }
    if sequence_parallel:  # norms on sequence shards; their weights replicated DTensors
        plan["attention_norm"] = SequenceParallel()
        plan["ffn_norm"] = SequenceParallel()
    return plan


def apply_tp(model: nn.Module, tp_mesh: DeviceMesh, *, sequence_parallel: bool = True) -> Callable:
    """Apply tensor parallelism to ``model`` (an :class:`~multitoken.mtp_model.MTPModel` on the
    reference GPT) in place over ``tp_mesh``; returns the vocabulary-parallel cross-entropy
    its loss must use. Every rank must hold the same weights (the same seed): each keeps its
    own shard of them; on a mesh of one rank it changes nothing.

    Args:
        model: the model, on its device.
        tp_mesh: the 1-D tensor-parallel mesh
            (:attr:`~multitoken.parallel.dims.ParallelDims.tp_mesh`), of more than one rank.
        sequence_parallel: split the activations between blocks by sequence (see the module
            docstring); every batch's sequence length must then divide by ``tp_size`` (an
            :class:`~multitoken.errors.InputError` on every rank when the model embeds a batch
            that it does not, before the model's first collective).

    Raises:
        ConfigError: heads, key/value heads, feed-forward width or vocabulary not divisible
            by the TP size (before any collective, the same on every rank).
    """
    tp_size = tp_mesh.size()
    if tp_size == 1:
        return linear_cross_entropy  # nothing to split
    check_tp(model, tp_size)
    # SequenceParallel re-registers a norm's weight as a new Parameter, which requires grad:
    # a frozen base (mtp.freeze_base) must stay frozen.
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    mesh = tp_mesh
    decoder = model.decoder
    # Vocabulary-parallel embedding: each rank looks up the ids of its rows (zeros elsewhere),
    # then one all-reduce sums the rows. It is also the head when tied.
    head_plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate())}
    if decoder.output is not None:
        # Never called as a module (the loss reads the weight): this only shards it by rows.
        head_plan["output"] = ColwiseParallel()
    if sequence_parallel:  # the model embeds first: the check precedes its collectives
        decoder.tok_embeddings.register_forward_pre_hook(check_sequence(tp_size))
    parallelize_module(decoder, mesh, head_plan)
    for layer in tp_layers(model):
        parallelize_module(layer, mesh, _layer_plan(sequence_parallel))
        # The projections now produce this rank's heads only.
        layer.attention.n_heads //= tp_size
        layer.attention.n_kv_heads //= tp_size
    if sequence_parallel:
        # The layer stack starts from the replicated embedding: each rank keeps its slice.
        first = decoder.layers[0]
        to_shards = PrepareModuleInput(
            input_layouts=(Replicate(),), desired_input_layouts=(SEQ,), use_local_output=True
        )
        parallelize_module(first, mesh, to_shards)
        gathered_norm(decoder.norm, mesh)
    if model.mtp is not None:
        for depth in model.mtp.depths:
            if sequence_parallel:
                # Row-wise: the [enorm(e); hnorm(h)] input is split by features locally and
                # the output reduce-scattered to sequence shards for the depth's layer.
                eh_proj = RowwiseParallel(input_layouts=Replicate(), output_layouts=SEQ)
                parallelize_module(depth, mesh, {"eh_proj": eh_proj})
                gathered_norm(depth.final_norm, mesh)
            else:
                # Gathered back to the full width as a plain tensor: the depth's layer adds
                # it to its residual stream, which stays plain and replicated.
                eh_proj = ColwiseParallel(output_layouts=Replicate(), use_local_output=True)
                parallelize_module(depth, mesh, {"eh_proj": eh_proj})
    for name, param in model.named_parameters():
        if name in frozen:
            param.requires_grad_(False)
    if sequence_parallel:
        norms = [
            norm for layer in tp_layers(model) for norm in (layer.attention_norm, layer.ffn_norm)
        ]
        norms.append(decoder.norm)
        norms += [] if model.mtp is None else [depth.final_norm for depth in model.mtp.depths]
        for norm in norms:
            sum_weight_gradients(norm)
    return VocabParallelCrossEntropy(tp_mesh.get_group())
