"""Tensor x context parallelism at (tp, cp) = (4, 2) on 8 gloo ranks equals the single process.

The largest layout of the grid, too slow for ``make test`` on a 2-core machine (8 ranks):
``make test-slow`` runs it. Same checks as ``test_tp_model``: the loss and per-depth losses
summed over the token shards, every full gradient and the gradient norm (rtol 1e-5), and the
exact collectives of the step on their groups.
"""

import logging

import pytest
from tests.helpers.distributed import (
    PACKED_ROWS,
    assert_tp_matches,
    expected_calls,
    run_tp,
    tp_reference,
)

TP, CP = 4, 2

logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2])
def test_tp4_cp2_equals_single_process(rank_pool, depth):
    pool = rank_pool(TP * CP)
    ref = tp_reference(depth, PACKED_ROWS)
    results = pool.run(run_tp, 1, CP, TP, depth, PACKED_ROWS, timeout=240)
    # tp innermost: world rank = cp_rank * tp + tp_rank.
    assert [r["coords"] for r in results] == [(0, c, t) for c in range(CP) for t in range(TP)]
    what = f"tp={TP} cp={CP} D={depth}"
    assert_tp_matches(results, ref, what)
    expected = expected_calls(1, CP, TP, depth)
    for r in results:
        assert r["calls"] == expected, (what, r["coords"], r["calls"], expected)
