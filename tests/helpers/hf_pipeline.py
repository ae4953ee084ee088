"""The heads-only Hugging Face pipeline tests' model, one-process reference and per-rank steps.

A tiny Llama (four decoder layers, ``mtp.freeze_base``) on the pipeline tests' packed rows: a
pipeline rank holds only its stages' modules under the one-process names, so each rank's MTP
gradients are compared with the reference's of the same names.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist

from multitoken import MTPConfig, MTPModel
from multitoken.hf import HFDecoder, init_mtp_weights
from multitoken.hf.parallelize import pipeline_hf
from multitoken.testing.comms import count_comms
from multitoken.testing.tiny_hf import tiny_model

from .batches import packed_batch
from .distributed import grads
from .pipeline import LR, PAD, PP_ROWS, STEPS, VOCAB, local_batch, pp_dims

HF_LAYERS = 4


def hf_pp_model(model_type: str, depth: int, tie: bool = False, zero: bool = False) -> MTPModel:
    """The same weights on every rank and in the reference (seeded); ``zero``: the engines'
    position-0 rule (no token embedding into a depth where a document starts)."""
    hf = tiny_model(model_type, seed=0, num_hidden_layers=HF_LAYERS, tie_word_embeddings=tie)
    torch.manual_seed(1)
    mtp = MTPConfig(num_depths=depth, loss_weight=0.3, freeze_base=True, zero_first_embedding=zero)
    model = MTPModel(HFDecoder(hf), mtp, pad_id=PAD)
    init_mtp_weights(model)
    return model


def _record(out, model) -> dict:
    return dict(loss=out.loss.detach(), depth_loss=out.depth_loss.detach(),
                depth_tokens=out.depth_tokens, grads=grads(model))  # fmt: skip


def hf_pp_reference(model_type: str, depth: int, tie: bool = False, zero: bool = False) -> list:
    """Two AdamW steps of the whole heads-only model on the whole batch."""
    model = hf_pp_model(model_type, depth, tie, zero)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR)
    ids, labels, layout = packed_batch(PP_ROWS, vocab=VOCAB)
    records = []
    for _ in range(STEPS):
        out = model.loss(ids, labels, layout)
        out.loss.backward()
        records.append(_record(out, model))
        optimizer.step()
        optimizer.zero_grad()
    return records


def run_hf_pp(model_type: str, pp: int, schedule: str, depth: int, microbatches: int,
              layers: tuple = (), tie: bool = False, zero: bool = False) -> dict:  # fmt: skip
    """Two steps on every rank of a pp-rank pool; each step's messages counted (the second's
    returned)."""
    dims = pp_dims(pp)
    model = hf_pp_model(model_type, depth, tie, zero)
    pipe = pipeline_hf(model, dims, schedule, microbatches, layers=layers)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=LR) if trainable else None
    batch = local_batch(depth)
    records = []
    for _ in range(STEPS):
        with count_comms() as log:
            out = pipe.step(batch, model.config.loss_weight)
        records.append(_record(out, model))
        pipe.grad_norm()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad()
    embed = model.decoder.base.embed_tokens
    p2p = [r for r in log.records if r.kind == "p2p"]
    return dict(
        records=records,
        sends=sum(r.name in ("send", "isend") for r in p2p),
        recvs=sum(r.name in ("recv", "irecv") for r in p2p),
        sent_bytes=sum(r.nbytes for r in p2p),
        collectives=[r.name for r in log.records if r.kind == "collective"],
        embedding=None if embed is None else embed.weight.detach().clone(),
        layers=sorted(int(i) for i in model.decoder.base.layers),
        trainable=len(trainable),
        rank=dist.get_rank(),
    )


def save_tiny_with_tokenizer(model_type: str, folder, **overrides):
    """A tiny ``model_type`` folder (``save_tiny``, 320 rows) with a 300-token fast tokenizer
    trained on a few sentences: what ``model.hf=FOLDER`` reads."""
    from transformers import PreTrainedTokenizerFast

    from multitoken.data import Document, train_tokenizer
    from multitoken.testing.tiny_hf import save_tiny

    texts = ["def add(a, b):\n    return a + b\n", "The quick brown fox jumps over the dog."]
    docs = [Document(f"d{i}", t) for i, t in enumerate(texts * 4)]
    trained = train_tokenizer(docs, 300, Path(folder).parent / "tok", verbose=False)
    tok = trained.backend
    folder = save_tiny(model_type, folder, vocab_size=320, **overrides)
    PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token=tok.id_to_token(trained.pad_id),
        eos_token=tok.id_to_token(trained.eos_id), clean_up_tokenization_spaces=False,
    ).save_pretrained(folder)  # fmt: skip
    return folder
