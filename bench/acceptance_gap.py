"""How well does the training-time acceptance estimate predict ``generate``'s acceptance?

Training logs, per depth k, ``agree_mtp`` (how often depth k's argmax at i equals the
backbone's argmax at i + k) and ``accept_mtp`` (the mean of ``sum_v min(p_v, q_v)``), measured
on the *data* with the true prefix (docs/training.md, "Acceptance while training").
``generate`` reports, per draft step k, the fraction of drafts accepted given that drafts
1..k-1 were, on the model's *own* continuation. This bench trains the tests' tiny phrase model
(D = 3, ``tests/helpers/models.py``: about 2 s), then on held-out prompts compares:

- ``agree_mtp`` on the data vs ``generate``'s acceptance at T = 0 (greedy verification);
- ``accept_mtp`` on the data vs ``generate``'s acceptance at T = 1 (speculative sampling);
- the same estimates measured on the model's own continuations (teacher-forced: greedy ones
  for ``agree``, sampled at T = 1 for ``accept``; only the generated positions count), which
  removes the data-vs-own-text shift and leaves the conditioning on earlier acceptance.

Reported: each estimate, the measured acceptance, the gap in points. Issue 18's target on the
real model: within 3 points. Run: ``python bench/acceptance_gap.py`` (about 30 s).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from _common import base_parser, emit_json, print_table, setup_threads
from multitoken import StepBatch, next_token_labels
from multitoken.decoding.generate import generate
from multitoken.mtp_model import step_loss

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.helpers.models import phrase_stream, train_phrase_model  # noqa: E402


def estimate(model, rows: torch.Tensor, skip: int = 0) -> tuple[list[float], list[float]]:
    """Per depth ``(agree, accept)`` rates of the training-time metric over ``rows`` ``[B, T]``
    (``skip``: only the targets from position ``skip`` on count, the generated ones)."""
    labels = next_token_labels(rows)
    labels[:, : max(skip - 1, 0)] = -100
    with torch.no_grad():
        batch = StepBatch.build(rows, labels, None, model.num_depths, 0)
        out = step_loss(model, batch, 1.0, acceptance=True)
    counts = out.depth_tokens[1:].double()
    return (out.agree / counts).tolist(), (out.accept / counts).tolist()


def measured(model, prompts, new: int, temperature: float, seed: int) -> list[float]:
    gen = torch.Generator().manual_seed(seed)
    stats = None
    for prompt in prompts:
        out = generate(model, prompt, new, speculative=True, temperature=temperature,
                       generator=gen).stats  # fmt: skip
        stats = out if stats is None else stats.merge(out)
    return [a if a is not None else float("nan") for a in stats.acceptance]


def main() -> None:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--new", type=int, default=48)
    args = parser.parse_args()
    setup_threads(args.threads, args.clock)
    model, _ = train_phrase_model()
    held_out = phrase_stream(seed=7)  # another walk over the same phrases
    prompt_len, count = 16, 4 if args.quick else args.prompts
    starts = torch.arange(count) * (prompt_len + args.new)
    prompts = [held_out[s : s + prompt_len] for s in starts.tolist()]
    data_rows = torch.stack([held_out[s : s + prompt_len + args.new] for s in starts.tolist()])
    agree_data, accept_data = estimate(model, data_rows)
    gen = torch.Generator().manual_seed(args.seed + 1)
    own = {0.0: [], 1.0: []}  # the model's own continuations (greedy, sampled), teacher-forced
    for prompt in prompts:
        for temperature, texts in own.items():
            tokens = generate(model, prompt, args.new, temperature=temperature, generator=gen)
            texts.append(torch.cat([prompt, torch.tensor(tokens.tokens)]))
    agree_own, _ = estimate(model, torch.stack(own[0.0]), skip=prompt_len)
    _, accept_own = estimate(model, torch.stack(own[1.0]), skip=prompt_len)
    greedy = measured(model, prompts, args.new, 0.0, args.seed)
    sampled = measured(model, prompts, args.new, 1.0, args.seed)
    rows, payload = [], {}
    for k in range(model.num_depths):
        cases = {
            "T=0 agree (data)": (agree_data[k], greedy[k]),
            "T=0 agree (own text)": (agree_own[k], greedy[k]),
            "T=1 accept (data)": (accept_data[k], sampled[k]),
            "T=1 accept (own text)": (accept_own[k], sampled[k]),
        }
        for name, (est, got) in cases.items():
            rows.append([k + 1, name, f"{est:.3f}", f"{got:.3f}", f"{100 * (est - got):+.1f}"])
            payload[f"depth{k + 1} {name}"] = {"estimate": est, "generate": got}
    print_table(
        f"training-time acceptance vs generate, tiny phrase model D = 3, {count} prompts x "
        f"{args.new} new tokens",
        ["depth", "estimate", "estimate value", "generate", "gap (points)"],
        rows,
    )
    emit_json({"bench": "acceptance_gap", "results": payload, "target_points": 3})


if __name__ == "__main__":
    main()
