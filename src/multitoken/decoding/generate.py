"""Decoding with a KV cache, and self-speculative decoding with the MTP heads.

The MTP depths are draft models for free (docs/design.md#speculative-decoding). One speculative
step, with ``L`` committed tokens ``t_0 .. t_{L-1}`` and the main model cached up to position
``L - 2``:

1. **Draft.** Depth 1 at position ``L - 2`` reads ``h^0_{L-2}`` and ``t_{L-1}`` and proposes
   ``t_L``; depth k reads depth k-1's hidden state and the token depth k-1 just proposed, and
   proposes ``t_{L-1+k}``. Each depth first catches up on the positions it has not cached, so
   its attention sees what it saw in training (with drafts where the future is not known yet).
2. **Verify.** One main-model forward over ``[t_{L-1}, d_L, .., d_{L-1+n}]`` gives the main
   model's own prediction after every prefix.
3. **Accept** the longest prefix of drafts the main model agrees with, plus the main model's
   token after it (so every forward yields at least one token), and roll the caches back to
   the accepted positions (:meth:`multitoken.decoding.state.DecodeState.commit`).

With ``draft_steps`` N larger than the D' depths that draft, drafting goes on recursively as the
serving engines do: step s runs depth ``((s - 1) mod D') + 1`` on step s - 1's hidden state and
token (each step keeps its own cache, :mod:`multitoken.decoding.state`).

With ``temperature == 0`` the output is token for token plain greedy decoding. With
``temperature > 0`` drafts are sampled from the depths' distributions and accepted with the
speculative-sampling rule (accept ``d`` with probability ``min(1, p(d) / q(d))``, else sample
from ``max(0, p - q)``, normalised), so the output distribution is the main model's.

**Context.** Prompt and new tokens must fit ``max_seq_len``: a longer prompt keeps its last
``max_seq_len - max_new_tokens`` tokens (plain and speculative decoding see the same ones), and
``max_new_tokens`` above ``max_seq_len - 1`` is refused. An empty prompt starts from
``start_id`` (the tokenizer's end-of-document id in ``multitoken generate``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from multitoken.decoding.draft_vocab import DraftVocab
from multitoken.decoding.rules import DraftRule, rule_depths
from multitoken.decoding.state import DecodeState
from multitoken.decoding.static import StaticDecodeState
from multitoken.decoding.stats import GenerationStats
from multitoken.errors import InputError, renamed_kwarg
from multitoken.mtp_model import MTPModel

__all__ = [
    "Generation",
    "GenerationStats",
    "accept_drafts",
    "fit_prompt",
    "generate",
    "teacher_forced_accuracy",
]


@dataclass
class Generation:
    """What :func:`generate` returns.

    Attributes:
        prompt_ids: the prompt the model conditioned on (after :func:`fit_prompt`).
        tokens: the new tokens.
        stats: counters and timing.
        state: the final caches (for inspection; drop it to free them).
    """

    prompt_ids: list[int]
    tokens: list[int]
    stats: GenerationStats
    state: DecodeState | None = field(default=None, repr=False)


def fit_prompt(
    prompt_ids: Sequence[int], max_new_tokens: int, max_seq_len: int, start_id: int
) -> list[int]:
    """The prompt that decoding conditions on: non-empty, and leaving room for the new tokens.

    Example::

        >>> fit_prompt([5, 6, 7, 8], max_new_tokens=6, max_seq_len=8, start_id=1)
        [7, 8]
        >>> fit_prompt([], max_new_tokens=6, max_seq_len=8, start_id=1)
        [1]
    """
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens > max_seq_len - 1:
        raise InputError(
            f"max_new_tokens={max_new_tokens} does not fit the model's context: with "
            f"max_seq_len={max_seq_len} at most {max_seq_len - 1} new tokens follow a prompt"
        )
    ids = [int(i) for i in prompt_ids] or [int(start_id)]
    # Keep the end of a long prompt: it is what the next tokens depend on most.
    return ids[-(max_seq_len - max_new_tokens) :]


def accept_drafts(
    target_logits: Tensor,
    drafts: Sequence[int],
    draft_probs: Sequence[Tensor] | None = None,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[int, int]:
    """How many drafts the main model accepts, and the token that follows them.

    Args:
        target_logits: ``[n + 1, V]`` main-model logits; row i predicts the token that the
            i-th draft proposes (row n the token after the last draft).
        drafts: the n drafted tokens.
        draft_probs: n ``[V]`` draft distributions the drafts were sampled from
            (``temperature > 0`` only).
        temperature: 0 for greedy (accept while the draft is the argmax).
        generator: random source for ``temperature > 0``.

    Returns:
        ``(a, token)``: the first ``a`` drafts are accepted and ``token`` comes next (the main
        model's own choice, or the resampled replacement of the first rejected draft).
    """
    n = len(drafts)
    if temperature == 0:
        target = target_logits[: n + 1].argmax(-1).tolist()
        accepted = 0
        while accepted < n and drafts[accepted] == target[accepted]:
            accepted += 1
        return accepted, target[accepted]
    probs = torch.softmax(target_logits[: n + 1].float() / temperature, dim=-1)  # (n + 1, V)
    for i, token in enumerate(drafts):
        q = draft_probs[i]
        u = torch.rand((), generator=generator, device=q.device)
        if u * q[token] < probs[i, token]:  # u < p/q without dividing
            continue
        residual = (probs[i] - q).clamp(min=0)
        # p == q up to rounding can leave no mass; p itself is then the right law.
        residual = residual if float(residual.sum()) > 0 else probs[i]
        return i, int(torch.multinomial(residual, 1, generator=generator))
    return n, int(torch.multinomial(probs[n], 1, generator=generator))


def _pick(
    logits: Tensor, temperature: float, generator: torch.Generator | None
) -> tuple[int, Tensor | None]:
    if temperature == 0:
        return int(logits.argmax()), None
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator)), probs


def _draft(
    model: MTPModel,
    hidden: Tensor,
    vocab: DraftVocab | None,
    temperature: float,
    generator: torch.Generator | None,
) -> tuple[int, Tensor | None]:
    """One draft token from a depth's ``[H]`` hidden state (and its ``[V]`` law when sampling),
    over the whole vocabulary or over ``vocab``."""
    if vocab is None:
        return _pick(hidden @ model.head_weight.t(), temperature, generator)
    index, probs = _pick(vocab.logits(hidden), temperature, generator)
    return int(vocab.ids[index]), None if probs is None else vocab.full_probs(probs)


@renamed_kwarg("draft_depth", "draft_depths")
def generate(
    model: MTPModel,
    prompt_ids: Sequence[int] | Tensor,
    max_new_tokens: int,
    speculative: bool = False,
    draft_depths: int | None = None,
    temperature: float = 0.0,
    *,
    eos_id: int | None = None,
    start_id: int | None = None,
    generator: torch.Generator | None = None,
    compile: bool = False,
    capacity: int | None = None,
    draft_steps: int | None = None,
    draft_vocab: Sequence[int] | Tensor | None = None,
    verify_tokens: int = 0,
    draft_rule: DraftRule | None = None,
) -> Generation:
    """Generate up to ``max_new_tokens`` after a prompt, one row, with KV caches.

    Args:
        model: the :class:`~multitoken.mtp_model.MTPModel` (put it in eval mode).
        prompt_ids: token ids (a list or a 1-D tensor); see :func:`fit_prompt` for long and
            empty prompts.
        max_new_tokens: at most this many new tokens (fewer when ``eos_id`` comes first).
        speculative: draft with the MTP heads and verify with the main model.
        draft_depths: MTP depths to draft with, 1..D; None = all D.
        temperature: 0 = greedy; > 0 samples from ``softmax(logits / temperature)``.
        eos_id: stop after generating this token.
        start_id: the token an empty prompt starts from; None = ``model.pad_id``.
        generator: random source for sampling.
        compile: run the decode steps as compiled static-shape graphs
            (:class:`~multitoken.decoding.static.StaticDecodeState`; reference GPT only). The first
            call per process pays the compilation; the tokens are those of eager decoding.
        capacity: positions the caches hold (at least prompt + new tokens); a warm-up call
            with the capacity of the real one compiles the graphs the real one will use.
        draft_steps: drafts per verification, N >= 1 (None = ``draft_depths``; ignored
            without ``speculative``). Past the depths, step s runs depth
            ``((s - 1) mod draft_depths) + 1`` on the previous step's hidden state and token.
        draft_vocab: token ids the drafts are chosen among (:mod:`.draft_vocab`; None = the
            whole vocabulary). Verification still scores the whole vocabulary.
        verify_tokens: pad every verification forward to at least this many tokens (the
            extra rows are computed and dropped): on a CPU whose matrix kernels take a few
            rows far faster than fewer (docs/decoding.md#verify-shape); 0 = no padding.
        draft_rule: draft as a serving engine will (:class:`~multitoken.decoding.rules.DraftRule`:
            the depths it loads, position-0 embedding zeroed); None = multitoken's own rule.

    Returns:
        A :class:`Generation`; ``stats.acceptance`` per draft step when speculative.

    Raises:
        InputError: speculative decoding of a model without MTP heads (D = 0), a draft depth
            outside 1..D, draft steps below 1, a negative temperature, prompt ids outside the
            vocabulary, or ``max_new_tokens`` that does not fit the context.
    """
    if speculative:
        draft_depths = rule_depths(draft_rule, draft_depths, model.num_depths)
    draft_depths = _draft_depths(model, speculative, draft_depths)
    steps = _draft_steps(draft_depths, draft_steps)
    vocab = _draft_vocab(model, steps, draft_vocab, verify_tokens)
    if not temperature >= 0 or temperature == float("inf"):  # also refuses NaN
        raise InputError(f"temperature must be a finite number >= 0, got {temperature}")
    prompt = _checked_prompt(model, prompt_ids, max_new_tokens, start_id)
    stats = GenerationStats(
        draft_depths=draft_depths,
        reached=[0] * steps,
        accepted=[0] * steps,
        accepted_histogram=[0] * (steps + 1),
        draft_steps=steps,
    )
    capacity = max(capacity or 0, len(prompt) + max_new_tokens + verify_tokens)
    state_cls = StaticDecodeState if compile else DecodeState
    zero_first = model.config.zero_first_embedding or bool(
        draft_rule and draft_rule.zero_first_position
    )
    state = state_cls(model, capacity, draft_depths, draft_steps=steps, zero_first=zero_first)
    state.tokens = list(prompt)
    new: list[int] = []
    began = time.perf_counter()
    with torch.inference_mode():
        if len(prompt) > 1 and max_new_tokens > 0:
            state.forward_main(prompt[:-1])
        while len(new) < max_new_tokens:
            seq = state.tokens
            # Drafting needs h^0 of the second-to-last token, and no more drafts than tokens wanted.
            n_draft = min(steps, max_new_tokens - len(new) - 1) if len(seq) > 1 else 0
            out, n_acc = _speculative_step(
                model, state, n_draft, temperature, generator, stats, vocab, verify_tokens
            )
            if eos_id is not None and eos_id in out:
                out = out[: out.index(eos_id) + 1]
            new += out
            state.commit(seq + out, exact_upto=len(seq) + n_acc)
            if eos_id is not None and out[-1] == eos_id:
                break
    stats.seconds = time.perf_counter() - began
    stats.new_tokens = len(new)
    return Generation(prompt, new, stats, state)


def _draft_vocab(
    model: MTPModel, steps: int, draft_vocab: Sequence[int] | Tensor | None, verify_tokens: int
) -> DraftVocab | None:
    """The checked draft vocabulary (None: the whole one, or nothing drafts); checks
    ``verify_tokens`` too."""
    if isinstance(verify_tokens, bool) or not isinstance(verify_tokens, int) or verify_tokens < 0:
        raise InputError(f"verify_tokens must be an integer >= 0, got {verify_tokens!r}")
    return None if draft_vocab is None or not steps else DraftVocab(draft_vocab, model.head_weight)


def _draft_depths(model: MTPModel, speculative: bool, draft_depths: int | None) -> int:
    """How many depths draft each step: 0 without speculation, else 1..D (None = D)."""
    num_depths = model.num_depths
    if speculative and num_depths == 0:
        raise InputError(
            "speculative decoding drafts with the MTP heads, and this model has none "
            "(mtp.num_depths = 0): train it with mtp.num_depths >= 1, or decode without "
            "--speculative"
        )
    if not speculative:
        return 0
    if draft_depths is None:
        return num_depths
    if not 1 <= draft_depths <= num_depths:
        raise InputError(
            f"draft_depths must be in 1..{num_depths} (the model's MTP depths), got {draft_depths}"
        )
    return draft_depths


def _draft_steps(draft_depths: int, draft_steps: int | None) -> int:
    """Drafts per verification: 0 without speculation, else N >= 1 (None = the depths)."""
    if draft_depths == 0 or draft_steps is None:
        return draft_depths
    if isinstance(draft_steps, bool) or not isinstance(draft_steps, int) or draft_steps < 1:
        raise InputError(f"draft_steps must be an integer >= 1, got {draft_steps!r}")
    return draft_steps


def _checked_prompt(
    model: MTPModel, prompt_ids: Sequence[int] | Tensor, max_new_tokens: int, start_id: int | None
) -> list[int]:
    """The prompt as ids that fit the context (:func:`fit_prompt`), checked against the
    vocabulary."""
    decoder = model.decoder
    if isinstance(prompt_ids, Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    start_id = model.pad_id if start_id is None else start_id
    prompt = fit_prompt(prompt_ids, max_new_tokens, decoder.max_seq_len, start_id)
    bad = [i for i in prompt if not 0 <= i < decoder.vocab_size]
    if bad:
        raise InputError(f"prompt id {bad[0]} is outside the vocabulary [0, {decoder.vocab_size})")
    return prompt


def _speculative_step(
    model: MTPModel,
    state: DecodeState,
    n_draft: int,
    temperature: float,
    generator: torch.Generator | None,
    stats: GenerationStats,
    vocab: DraftVocab | None = None,
    verify_tokens: int = 0,
) -> tuple[list[int], int]:
    """Draft ``n_draft`` tokens with the depths, verify them with one main forward; returns the
    tokens to commit (the accepted drafts and one token of the main model) and how many drafts
    were accepted. With ``n_draft = 0`` it is one plain decoding step."""
    seq = state.tokens
    length = len(seq)
    extended, draft_probs = list(seq), []
    for k in range(1, n_draft + 1):
        h = state.forward_depth(k, extended, end=length - 1)  # (T_k, H)
        token, probs = _draft(model, h[-1], vocab, temperature, generator)
        extended.append(token)
        draft_probs.append(probs)
    drafts = extended[length:]
    verified = [seq[-1], *drafts]
    # Filler rows (the last token again) only shape the matrix products; the cache keeps
    # them no longer than a rejected draft (commit rolls back past the accepted prefix).
    padded = verified + verified[-1:] * (max(0, verify_tokens - len(verified)) if drafts else 0)
    h0 = state.forward_main(padded)[: len(verified)]  # (n_draft + 1, H)
    n_acc, token = accept_drafts(
        h0 @ model.head_weight.t(), drafts, draft_probs, temperature, generator
    )
    stats.forwards += 1
    stats.accepted_histogram[n_acc] += 1
    for k in range(min(n_acc + 1, n_draft)):
        stats.reached[k] += 1
        stats.accepted[k] += k < n_acc
    return [*drafts[:n_acc], token], n_acc


def teacher_forced_accuracy(
    model: MTPModel, ids: Sequence[int], start: int
) -> list[tuple[int, int]]:
    """Unconditional teacher-forced accuracy of each MTP depth on a finished sequence.

    Depth k at position j predicts ``ids[j + k + 1]`` from the true tokens; counted for the
    targets at index ``>= start`` (the generated part). With greedy decoding the targets are the
    main model's own choices, so this is how often depth k agrees with the main model when
    every earlier token is right.

    Returns:
        ``[(hits, targets)]`` for depths 1..D.
    """
    num_depths = model.num_depths
    with torch.inference_mode():
        x = torch.tensor([list(ids)], dtype=torch.long, device=model.head_weight.device)
        hidden = model(x)
        result = []
        for k in range(1, num_depths + 1):
            first = max(start - k - 1, 0)  # first position whose target is generated
            # Empty when the sequence is too short to hold a target of depth k.
            positions = torch.arange(first, max(first, len(ids) - k - 1), device=x.device)
            predicted = (hidden[k][0, positions] @ model.head_weight.t()).argmax(-1)
            hits = int((predicted == x[0, positions + k + 1]).sum())
            result.append((hits, positions.numel()))
    return result
