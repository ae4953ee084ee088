"""``apply_tp(model, groups)``: tensor parallelism with DTensor, applied from outside.

The torchtitan plan (``parallelize_module``) on the reference GPT and on every MTP depth:

* attention: ``wq``, ``wk``, ``wv`` column-wise (each rank computes ``n_heads / tp`` query and
  ``n_kv_heads / tp`` key/value heads, so grouped-query attention keeps its head mapping),
  ``wo`` row-wise (its output all-reduced);
* feed-forward: ``w1``, ``w3`` column-wise, ``w2`` row-wise;
* the embedding vocabulary-parallel (row-wise over the vocabulary, output all-reduced), the
  untied head sharded by vocabulary rows too, and the loss a vocabulary-parallel chunked
  cross-entropy (:class:`~.vocab_loss.VocabParallelCrossEntropy`, set as
  ``MTPModel.cross_entropy``): no rank ever holds logits of the whole vocabulary;
* each MTP depth's ``eh_proj`` column-wise with its output gathered back to the full width
  and returned as a plain tensor (``use_local_output=True``: it is added to plain tensors in
  the depth's layer).

No sequence parallelism: norms are replicated and the activations between blocks are plain,
replicated tensors, so the model code, context parallelism's K/V all-gather (on the local
heads) and the halos are unchanged. Per transformer layer that is two all-reduces forward
(``wo``, ``w2``) and two backward (the gradient of the attention's and the feed-forward's
input: each module takes its input as one replicated DTensor, so ``wq``, ``wk`` and ``wv``
sum their partial gradients before the single all-reduce).

The model never imports ``torch.distributed``; this module rewrites it in place.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.tensor import Replicate
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    PrepareModuleInput,
    RowwiseParallel,
    parallelize_module,
)

from multitoken.errors import ConfigError, InputError
from multitoken.models.attention import Attention
from multitoken.parallel.vocab_loss import VocabParallelCrossEntropy

__all__ = ["apply_tp", "check_tp", "tp_layers"]


def tp_layers(model: nn.Module) -> list[nn.Module]:
    """The transformer layers to shard: the decoder's, then every MTP depth's."""
    decoder = getattr(model, "decoder", None)
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise InputError(
            f"apply_tp needs model.decoder.layers (an nn.ModuleList of transformer layers); "
            f"{type(decoder).__name__} has none"
        )
    mtp = getattr(model, "mtp", None)
    return list(layers) + ([] if mtp is None else [depth.layer for depth in mtp.depths])


def check_tp(model: nn.Module, tp_size: int) -> None:
    """Refuse, before any collective, a model that ``tp_size`` ranks cannot split evenly.

    Raises:
        ConfigError: query or key/value heads, the feed-forward width or the vocabulary not
            divisible by ``tp_size``; a layer that is not the reference layout.
    """
    decoder = model.decoder
    vocab = decoder.vocab_size
    if vocab % tp_size:
        raise ConfigError(
            f"model.vocab_size={vocab} is not divisible by parallel.tp={tp_size}: the head and "
            f"the embedding are split by vocabulary rows (pad the vocabulary to a multiple of tp)"
        )
    for index, layer in enumerate(tp_layers(model)):
        attention = getattr(layer, "attention", None)
        feed_forward = getattr(layer, "feed_forward", None)
        if not isinstance(attention, Attention) or not hasattr(feed_forward, "w1"):
            raise InputError(
                f"apply_tp: layer {index} ({type(layer).__name__}) is not a reference Block "
                "(attention: Attention, feed_forward with w1, w2, w3)"
            )
        sizes = (
            ("model.n_heads", attention.n_heads),
            ("model.n_kv_heads", attention.n_kv_heads),
            ("model.ffn_dim", feed_forward.w1.out_features),
        )
        for key, size in sizes:
            if size % tp_size:
                raise ConfigError(
                    f"{key}={size} is not divisible by parallel.tp={tp_size}: every TP rank "
                    "computes an equal share of the heads and of the feed-forward width"
                )


def _layer_plan() -> dict:
    # The attention and the feed-forward take their (replicated) input as ONE DTensor: the
    # partial input gradients of wq, wk, wv (w1, w3) then add up as DTensors and are
    # all-reduced once, instead of once per projection. Attention's other positional
    # arguments (rope, mask, cache) are not tensors to distribute.
    return {
        "attention": PrepareModuleInput(
            input_layouts=(Replicate(), None, None, None),
            desired_input_layouts=(Replicate(), None, None, None),
            use_local_output=False,
        ),
        "attention.wq": ColwiseParallel(),
        "attention.wk": ColwiseParallel(),
        "attention.wv": ColwiseParallel(),
        "attention.wo": RowwiseParallel(),
        "feed_forward": PrepareModuleInput(
            input_layouts=(Replicate(),),
            desired_input_layouts=(Replicate(),),
            use_local_output=False,
        ),
        "feed_forward.w1": ColwiseParallel(),
        "feed_forward.w3": ColwiseParallel(),
        "feed_forward.w2": RowwiseParallel(),
    }


def apply_tp(model: nn.Module, groups) -> nn.Module:
    """Apply tensor parallelism to ``model`` (an :class:`~multitoken.model.MTPModel` on the
    reference GPT) in place over ``groups.tp_mesh`` and return it; ``tp_size == 1`` is a no-op.

    Apply it first, then context parallelism (:func:`~multitoken.parallel.parallelize`), then
    FSDP2 (:func:`~multitoken.parallel.apply_fsdp`): torchtitan's order. Every rank must hold
    the same weights (the same seed): each keeps its own shard of them.

    Args:
        model: the model, on its device.
        groups: a :class:`~multitoken.parallel.mesh.ParallelGroups` (``tp_mesh``, ``tp_group``,
            ``tp_size``).

    Raises:
        ConfigError: heads, key/value heads, feed-forward width or vocabulary not divisible
            by the TP size (before any collective, the same on every rank).
    """
    tp_size = groups.tp_size
    if tp_size == 1:
        return model
    check_tp(model, tp_size)
    mesh = groups.tp_mesh
    decoder = model.decoder
    # Vocabulary-parallel embedding: each rank looks up the ids of its rows (zeros elsewhere),
    # then one all-reduce sums the rows. It is also the head when tied.
    head_plan = {"tok_embeddings": RowwiseParallel(input_layouts=Replicate())}
    if decoder.output is not None:
        # Never called as a module (the loss reads the weight): this only shards it by rows.
        head_plan["output"] = ColwiseParallel()
    parallelize_module(decoder, mesh, head_plan)
    for layer in tp_layers(model):
        parallelize_module(layer, mesh, _layer_plan())
        # The projections now produce this rank's heads only.
        layer.attention.n_heads //= tp_size
        layer.attention.n_kv_heads //= tp_size
    if model.mtp is not None:
        for depth in model.mtp.depths:
            # Gathered back to the full width as a plain tensor: the depth's layer adds it to
            # its residual stream, which stays plain and replicated.
            eh_proj = ColwiseParallel(output_layouts=Replicate(), use_local_output=True)
            parallelize_module(depth, mesh, {"eh_proj": eh_proj})
    model.cross_entropy = VocabParallelCrossEntropy(groups.tp_group)
    return model
