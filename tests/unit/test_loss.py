import pytest
import torch
import torch.nn.functional as F
from tests.helpers.allocation import LargestAllocation

from multitoken import linear_cross_entropy


def _inputs(n, h, v, seed=0, ignore_every=5):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen, dtype=torch.float64).float().requires_grad_()
    weight = (0.1 * torch.randn(v, h, generator=gen)).requires_grad_()
    targets = torch.randint(0, v, (n,), generator=gen)
    targets[::ignore_every] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("chunk_elements", [1, 7 * 50, 1 << 23])
def test_matches_full_logits_cross_entropy(chunk_elements):
    hidden, weight, targets = _inputs(37, 16, 50)
    stats = linear_cross_entropy(hidden, weight, targets, chunk_elements=chunk_elements)
    stats.loss_sum.backward()
    got_h, got_w = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None

    logits = hidden @ weight.t()
    ref = F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(stats.loss_sum, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got_h, hidden.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_w, weight.grad, rtol=1e-5, atol=1e-6)
    valid = targets != -100
    assert int(stats.num_valid) == int(valid.sum())
    assert int(stats.num_correct) == int(((logits.argmax(-1) == targets) & valid).sum())


@pytest.mark.parametrize("chunk_elements", [1, 7 * 50, 1 << 23])
def test_a_frozen_head_gets_the_hidden_gradient_in_the_forward(chunk_elements):
    """A frozen head (heads-only runs): d loss / d hidden is computed with the forward's chunk
    and scaled by the upstream gradient in the backward; the same values as full logits, and
    no recomputation in the backward (no head matmul runs there)."""
    hidden, weight, targets = _inputs(37, 16, 50)
    weight.requires_grad_(False)
    stats = linear_cross_entropy(hidden, weight, targets, chunk_elements=chunk_elements)
    with torch.profiler.profile() as prof:
        (0.3 * stats.loss_sum).backward()
    assert not [e for e in prof.events() if e.name in ("aten::mm", "aten::matmul")]
    ref_h = hidden.detach().clone().requires_grad_()
    ref = F.cross_entropy(ref_h @ weight.t(), targets, ignore_index=-100, reduction="sum")
    (0.3 * ref).backward()
    torch.testing.assert_close(stats.loss_sum, ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(hidden.grad, ref_h.grad, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # evaluation: nothing computed for a backward that never comes
        linear_cross_entropy(hidden, weight, targets, chunk_elements=chunk_elements)


def test_grad_output_scaling_and_leading_dims():
    hidden, weight, targets = _inputs(24, 8, 11, seed=1)
    stats = linear_cross_entropy(hidden.view(2, 3, 4, 8), weight, targets.view(2, 3, 4))
    (stats.loss_sum * 0.25).backward()
    ref_h = hidden.detach().clone().requires_grad_()
    (0.25 * F.cross_entropy(ref_h @ weight.detach().t(), targets, reduction="sum")).backward()
    torch.testing.assert_close(hidden.grad, ref_h.grad, rtol=1e-5, atol=1e-6)


def test_no_valid_target_gives_zero_loss_and_zero_grad():
    hidden, weight, _ = _inputs(10, 8, 20)
    targets = torch.full((10,), -100)
    stats = linear_cross_entropy(hidden, weight, targets)
    stats.loss_sum.backward()
    assert stats.loss_sum.item() == 0.0 and int(stats.num_valid) == 0
    assert torch.count_nonzero(hidden.grad) == 0 and torch.count_nonzero(weight.grad) == 0


def test_bf16_hidden_under_autocast_with_fp32_head():
    # Under bf16 autocast the MTP hidden states are bf16 and the head fp32; the backward runs
    # outside autocast and must not multiply a bf16 chunk by the fp32 weight.
    hidden, weight, targets = _inputs(37, 16, 50)
    h16 = hidden.detach().bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        stats = linear_cross_entropy(h16, weight, targets, chunk_elements=7 * 50)
        logits = h16 @ weight.t()
    stats.loss_sum.backward()
    assert h16.grad.dtype == torch.bfloat16 and weight.grad.dtype == torch.float32
    got_h, got_w = h16.grad.clone(), weight.grad.clone()
    h16.grad = weight.grad = None
    ref = F.cross_entropy(logits.float(), targets, ignore_index=-100, reduction="sum")
    ref.backward()
    torch.testing.assert_close(stats.loss_sum, ref, rtol=1e-3, atol=1e-3)
    torch.testing.assert_close(got_h.float(), h16.grad.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(got_w, weight.grad, rtol=2e-2, atol=2e-2)


def test_largest_allocation_is_bounded_by_the_chunk():
    # Vocab 32k, 4k tokens: full logits would be 4096 * 32768 = 134M floats (512 MiB).
    tokens, hidden_size, vocab, chunk = 4096, 32, 32768, 1 << 21
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, hidden_size, generator=gen).requires_grad_()
    weight = (0.02 * torch.randn(vocab, hidden_size, generator=gen)).requires_grad_()
    targets = torch.randint(0, vocab, (tokens,), generator=gen)
    with LargestAllocation() as mode:
        stats = linear_cross_entropy(hidden, weight, targets, chunk_elements=chunk)
        stats.loss_sum.backward()
    # Stated bound: max(chunk_elements, vocab * hidden, tokens * hidden) elements.
    bound = max(chunk, vocab * hidden_size, tokens * hidden_size)
    assert mode.largest <= bound, (mode.largest, bound)
    assert mode.largest * 64 <= tokens * vocab


def test_errors_name_the_problem():
    hidden, weight, targets = _inputs(6, 4, 10)
    with pytest.raises(ValueError, match="target id 10 is outside \\[0, 10\\)"):
        linear_cross_entropy(hidden, weight, torch.tensor([1, 2, 10, 3, 4, 5]))
    with pytest.raises(ValueError, match="disagree"):
        linear_cross_entropy(hidden, weight, targets[:5])
    with pytest.raises(ValueError, match="head weight must be"):
        linear_cross_entropy(hidden, weight[:, :3], targets)
    with pytest.raises(ValueError, match="integer tensor"):
        linear_cross_entropy(hidden, weight, targets.float())
