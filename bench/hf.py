"""What the Hugging Face adapter costs, and what heads-only MTP training saves.

1. Step time (forward + backward) of the adapter at D = 0 against the plain transformers
   model's own forward + backward (``model(input_ids, labels=...)``, sdpa, no cache) on the
   same rows and weights. Target: within 10%.
2. At D = 1 and 2: heads-only (``mtp.freeze_base``) against full training, step time and peak
   CPU tensor memory of one step (:class:`_common.PeakMemory`).

Usage: ``python bench/hf.py [--quick] [--repeats N]``; one JSON line at the end.
"""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from _common import (
    PeakMemory,
    base_parser,
    emit_json,
    environment,
    median,
    paired_ratios,
    print_table,
    setup_threads,
    time_interleaved,
)
from multitoken import MTPConfig, MTPModel, SequenceLayout, next_token_labels
from multitoken.batch import StepBatch
from multitoken.hf import HFDecoder, init_mtp_weights
from multitoken.mtp_model import step_loss


def llama(quick: bool, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    size = (
        dict(hidden_size=64, intermediate_size=176, num_hidden_layers=2, vocab_size=512)
        if quick
        else dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, vocab_size=4096)
    )
    config = LlamaConfig(
        num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024, **size
    )
    return LlamaForCausalLM(config).train()


def mtp_model(hf: LlamaForCausalLM, depth: int, freeze: bool) -> MTPModel:
    copy = LlamaForCausalLM(hf.config)
    copy.load_state_dict(hf.state_dict())
    torch.manual_seed(1)
    model = MTPModel(HFDecoder(copy.train()), MTPConfig(num_depths=depth, freeze_base=freeze))
    init_mtp_weights(model)
    return model.train()


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    setup_threads(args.threads)
    hf = llama(args.quick, args.seed)
    batch, seqlen = (2, 128) if args.quick else (2, 512)
    vocab = hf.config.vocab_size
    ids = torch.randint(2, vocab, (batch, seqlen), generator=torch.Generator().manual_seed(0))
    rows = SequenceLayout.rows(batch, seqlen)

    def hf_step() -> None:
        hf(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        hf.zero_grad(set_to_none=True)

    def step_of(model: MTPModel):
        step_batch = StepBatch.build(ids, next_token_labels(ids, rows), rows, model.num_depths)

        def step() -> None:
            step_loss(model, step_batch, 0.3).loss.backward()
            model.zero_grad(set_to_none=True)

        return step

    adapter = mtp_model(hf, 0, False)
    samples = time_interleaved({"hf": hf_step, "adapter": step_of(adapter)}, args.repeats)
    ratio = median(paired_ratios(samples, "adapter", "hf"))
    rows_out = [
        ["transformers forward+backward", f"{median(samples['hf']) * 1e3:.1f}", "1.00"],
        ["adapter, D = 0", f"{median(samples['adapter']) * 1e3:.1f}", f"{ratio:.3f}"],
    ]
    print_table(
        f"step time, Llama {hf.config.hidden_size}x{hf.config.num_hidden_layers}, "
        f"[{batch}, {seqlen}] tokens",
        ["contender", "ms/step", "vs transformers"],
        rows_out,
    )
    result = {"adapter_vs_hf": ratio, "hf_ms": median(samples["hf"]) * 1e3}

    depth_rows = []
    for depth in (1, 2):
        steps = {
            "full": step_of(mtp_model(hf, depth, False)),
            "heads": step_of(mtp_model(hf, depth, True)),
        }
        times = time_interleaved(steps, args.repeats)
        peaks = {}
        for name, step in steps.items():
            meter = PeakMemory()
            with meter.measure():
                step()
            peaks[name] = meter.peak_bytes
        for name in steps:
            depth_rows.append(
                [
                    f"D = {depth}, {name}",
                    f"{median(times[name]) * 1e3:.1f}",
                    f"{peaks[name] / 2**20:.1f}",
                ]
            )
            result[f"d{depth}_{name}_ms"] = median(times[name]) * 1e3
            result[f"d{depth}_{name}_peak_mib"] = peaks[name] / 2**20
        result[f"d{depth}_heads_vs_full_time"] = median(paired_ratios(times, "heads", "full"))
    print_table("heads-only vs full MTP step", ["run", "ms/step", "peak MiB"], depth_rows)
    emit_json({"bench": "hf", **result, **environment()})


if __name__ == "__main__":
    main()
