"""CP sharding without communication: every rank's shard built in one process and reassembled.

The reference is always the unsharded batch: the global ``mtp_inputs`` / ``lookahead``. The
fallback exchange is simulated here by routing each rank's send buffer to its peers by hand,
so its routing is checked on many random layouts without spawning ranks.
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from multitoken import LayoutError, SequenceLayout, lookahead, mtp_inputs, next_token_labels
from multitoken.parallel import ShardMismatchError, plan_shards, shard_batch
from multitoken.parallel.halo import HaloRoute

PAD, IGNORE = 0, -100


def make_layout(rows: list[list[int]], blank: list[list[bool]] | None = None) -> SequenceLayout:
    """Layout from per-row piece lengths; ``blank`` marks pieces of doc_id -1 (no document)."""
    doc_rows, pos_rows, next_id = [], [], 0
    for r, lengths in enumerate(rows):
        docs, pos = [], []
        for i, length in enumerate(lengths):
            empty = blank is not None and blank[r][i]
            docs += [-1 if empty else next_id] * length
            pos += [0] * length if empty else list(range(length))
            next_id += 1
        doc_rows.append(docs)
        pos_rows.append(pos)
    doc = torch.tensor(doc_rows)
    seqlen = doc.shape[1]
    return SequenceLayout(doc, torch.tensor(pos_rows), torch.arange(seqlen).expand_as(doc))


def make_batch(layout: SequenceLayout, seed: int = 0, vocab: int = 50):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, layout.shape, generator=gen)
    labels = next_token_labels(ids, layout)
    # Some labels masked upstream (e.g. prompt tokens): counts must follow the labels.
    drop = torch.rand(layout.shape, generator=gen) < 0.1
    return ids, torch.where(drop, IGNORE, labels)


def all_shards(ids, labels, layout, cp, depth, **kwargs):
    return [
        shard_batch(ids, labels, layout, cp, r, depth, PAD, IGNORE, **kwargs) for r in range(cp)
    ]


def simulate_exchange(shards):
    """The fallback exchange of every rank, with the all_to_all done by hand."""
    cp, depth = shards[0].cp_size, shards[0].num_depths
    routes = [HaloRoute.build(s.plan, s.cp_rank, depth) for s in shards]
    values = [torch.stack([s.input_ids.reshape(-1), s.labels.reshape(-1)]).long() for s in shards]
    sent = []
    for s, route, v in zip(shards, routes, values):
        buf, splits = route.pack(v, s.plan.fingerprint())
        sent.append(list(torch.split(buf, splits)))
    out = []
    for q, (s, route, v) in enumerate(zip(shards, routes, values)):
        halos = route.local_halos(v, [PAD, IGNORE])
        received = torch.cat([sent[src][q] for src in range(cp)])
        route.unpack(received, halos, s.plan.fingerprint())
        shape = (2 * s.plan.num_pieces, depth)
        out.append(s.with_halo(halos[0].view(shape), halos[1].view(shape)))
    return out


def reassemble(shards, field):
    """``[K, B, T]`` global tensor from every rank's ``field`` (real tokens only), plus the
    number of times each global token was seen."""
    plan = shards[0].plan
    first = getattr(shards[0], field)
    out = torch.full((first.shape[0], plan.batch, plan.seqlen), 12345, dtype=first.dtype)
    seen = torch.zeros(plan.batch, plan.seqlen, dtype=torch.long)
    for s in shards:
        piece, offset = plan.token_pieces(s.cp_rank)
        real = (offset < plan.length[piece]).view(plan.batch, -1)
        rows = torch.arange(plan.batch)[:, None].expand_as(real)[real]
        cols = s.layout.seq_index[real]
        out[:, rows, cols] = getattr(s, field)[:, real]
        seen.index_put_((rows, cols), torch.ones_like(rows), accumulate=True)
    return out, seen


def check_against_global(ids, labels, layout, cp, depth):
    ref_ids, ref_labels = mtp_inputs(ids, labels, layout, depth, PAD, IGNORE)
    halo_way = all_shards(ids, labels, layout, cp, depth)
    exchange_way = simulate_exchange(all_shards(ids, labels, layout, cp, depth, halo=False))
    for shards in (halo_way, exchange_way):
        got_ids, seen = reassemble(shards, "mtp_input_ids")
        got_labels, _ = reassemble(shards, "depth_labels")
        assert torch.equal(seen, torch.ones_like(seen)), "every token on exactly one rank"
        assert torch.equal(got_ids, ref_ids)
        assert torch.equal(got_labels, ref_labels)
        for s in shards:
            pad = s.layout.doc_ids < 0
            assert bool((s.depth_labels[:, pad] == IGNORE).all()), "padding has no target"
            assert bool((s.mtp_input_ids[:, pad] == PAD).all())
        # Nothing lost, nothing invented: the counts match the unsharded ones, per depth, both
        # from the shards' targets and from the halo-free count the normaliser uses.
        ref_counts = (ref_labels != IGNORE).sum((1, 2))
        assert torch.equal(sum((s.depth_labels != IGNORE).sum((1, 2)) for s in shards), ref_counts)
        assert torch.equal(sum(s.target_counts() for s in shards), ref_counts)
    for a, b in zip(halo_way, exchange_way):
        assert torch.equal(a.halo_ids, b.halo_ids) and torch.equal(a.halo_labels, b.halo_labels)
    return halo_way


@st.composite
def layouts(draw):
    batch = draw(st.integers(1, 3))
    seqlen = draw(st.integers(1, 40))
    rows, blanks = [], []
    for _ in range(batch):
        cuts = sorted(draw(st.sets(st.integers(1, seqlen - 1), max_size=8))) if seqlen > 1 else []
        bounds = [0, *cuts, seqlen]
        lengths = [b - a for a, b in zip(bounds, bounds[1:])]
        blank = [draw(st.booleans()) and draw(st.booleans()) for _ in lengths]
        for i in range(1, len(blank)):  # two adjacent blank runs would be one piece
            blank[i] = blank[i] and not blank[i - 1]
        rows.append(lengths)
        blanks.append(blank)
    return make_layout(rows, blanks)


@settings(max_examples=80, deadline=None)
@given(layout=layouts(), cp=st.integers(1, 4), depth=st.integers(0, 4), seed=st.integers(0, 9))
def test_shards_reassemble_to_global_lookahead(layout, cp, depth, seed):
    ids, labels = make_batch(layout, seed)
    shards = check_against_global(ids, labels, layout, cp, depth)
    plan = shards[0].plan
    assert all(s.input_ids.shape == (plan.batch, plan.local_len) for s in shards)
    # kv_layout is every rank's layout in rank order, the same on all ranks.
    kv = shards[0].kv_layout
    for name in ("doc_ids", "positions", "seq_index"):
        joined = torch.cat([getattr(s.layout, name) for s in shards], dim=1)
        assert torch.equal(getattr(kv, name), joined)
        assert all(torch.equal(getattr(s.kv_layout, name), joined) for s in shards)


@pytest.mark.parametrize("cp", [2, 4])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_tiny_documents_and_stripes_shorter_than_depth(cp, depth):
    # Documents of 1..3 tokens next to a long one: stripes of 1 token, halos from far ranks.
    layout = make_layout([[1, 2, 3, 1, 9, 1], [17]])
    ids, labels = make_batch(layout)
    check_against_global(ids, labels, layout, cp, depth)


def test_unpacked_rows():
    ids = torch.randint(1, 50, (3, 13))
    labels = next_token_labels(ids)
    for cp in (1, 2, 4):
        shards = check_against_global(ids, labels, None, cp, 3)
        assert shards[0].plan.local_len == -(-13 // (2 * cp)) * 2


def test_load_balanced_stripes():
    """Rank r keeps stripes r and 2cp-1-r of every document, in order."""
    layout = make_layout([[16, 8]])
    ids = torch.arange(24)[None] + 1
    shards = all_shards(ids, next_token_labels(ids, layout), layout, 4, 1)
    assert shards[0].input_ids.tolist() == [[1, 2, 15, 16, 17, 24]]
    assert shards[1].input_ids.tolist() == [[3, 4, 13, 14, 18, 23]]
    assert shards[3].input_ids.tolist() == [[7, 8, 9, 10, 20, 21]]
    assert shards[1].layout.positions.tolist() == [[2, 3, 12, 13, 1, 6]]


def test_padding_counts_and_documents():
    """Documents whose length is not a multiple of 2*cp: padding carries no target, and the
    valid-target count per depth equals the unsharded count."""
    layout = make_layout([[5, 7, 3], [15]])
    ids, labels = make_batch(layout, seed=3)
    shards = all_shards(ids, labels, layout, 4, 3)
    plan = shards[0].plan
    assert plan.padded.tolist() == [8, 8, 8, 16, 8] and plan.local_len == 6  # row 1: a tail
    ref = mtp_inputs(ids, labels, layout, 3, PAD, IGNORE)[1]
    for k in range(4):
        assert sum(int((s.depth_labels[k] != IGNORE).sum()) for s in shards) == int(
            (ref[k] != IGNORE).sum()
        )
    # No target crosses a document: each valid target is the label k ahead in the same doc.
    doc_ahead = lookahead(layout.doc_ids, layout, [0, 1, 2, 3], fill=-7)
    assert bool(((ref != IGNORE) <= (doc_ahead == layout.doc_ids[None])).all())


def test_cp1_shard_is_the_batch():
    layout = make_layout([[3, 5], [8]])
    ids, labels = make_batch(layout)
    (shard,) = all_shards(ids, labels, layout, 1, 2)
    ref_ids, ref_labels = mtp_inputs(ids, labels, layout, 2, PAD, IGNORE)
    real = shard.layout.doc_ids >= 0  # documents of odd length get one pad token each
    assert shard.input_ids.shape == (2, 10)
    assert torch.equal(shard.input_ids[real], ids[layout.doc_ids >= 0])
    assert torch.equal(shard.mtp_input_ids[:, real], ref_ids[:, layout.doc_ids >= 0])
    assert torch.equal(shard.depth_labels[:, real], ref_labels[:, layout.doc_ids >= 0])


def test_no_padding_requires_multiples():
    layout = make_layout([[8, 6]])
    ids, labels = make_batch(layout)
    with pytest.raises(LayoutError, match="not a multiple of 2\\*cp_size=4"):
        shard_batch(ids, labels, layout, 2, 0, 1, PAD, pad=False)
    with pytest.raises(LayoutError, match="row 0 has 14 tokens"):
        shard_batch(ids, labels, None, 2, 0, 1, PAD, pad=False)
    shard = shard_batch(ids[:, :8], labels[:, :8], None, 2, 1, 1, PAD, pad=False)
    assert shard.input_ids.shape == (1, 4)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(cp_size=0), "cp_size must be an int >= 1"),
        (dict(cp_rank=2), "cp_rank must be an int in \\[0, cp_size=2\\)"),
        (dict(num_depths=-1), "num_depths must be an int >= 0"),
        (dict(labels=torch.zeros(1, 5, dtype=torch.long)), "differ in shape"),
        (dict(input_ids=torch.zeros(1, 6)), "must be int32 or int64"),
        (dict(layout=make_layout([[4]])), "has shape \\(1, 6\\) but the layout is \\[1, 4\\]"),
    ],
)
def test_bad_arguments(change, message):
    args = dict(
        input_ids=torch.ones(1, 6, dtype=torch.long),
        labels=torch.ones(1, 6, dtype=torch.long),
        layout=make_layout([[6]]),
        cp_size=2,
        cp_rank=0,
        num_depths=1,
        pad_id=PAD,
    )
    args.update(change)
    with pytest.raises(LayoutError, match=message):
        shard_batch(**args)


def test_inconsistent_layouts_are_refused():
    good = make_layout([[6]])
    doubled = SequenceLayout(good.doc_ids, good.positions * 2, good.seq_index)
    with pytest.raises(LayoutError, match="positions must count up by one"):
        plan_shards(doubled, 2)
    doc = torch.tensor([[0, 0, 1, 0]])  # document 0 split in two runs
    layout = SequenceLayout(doc, torch.tensor([[0, 1, 0, 2]]), torch.arange(4)[None])
    with pytest.raises(LayoutError, match="two separate runs"):
        plan_shards(layout, 2)
    layout = SequenceLayout(doc * 0, torch.arange(4)[None], torch.arange(4)[None] + 1)
    with pytest.raises(LayoutError, match="already sharded"):
        plan_shards(layout, 2)


def test_exchange_detects_ranks_with_different_plans():
    """Two ranks sharding different batches whose messages happen to have equal sizes: the
    fingerprint in every message turns a silently wrong halo into an error on both ranks."""
    a, b = make_layout([[4, 12]]), make_layout([[12, 4]])
    ids = torch.arange(16)[None] + 1
    rank0 = shard_batch(ids, next_token_labels(ids, a), a, 2, 0, 1, PAD, halo=False)
    rank1 = shard_batch(ids, next_token_labels(ids, b), b, 2, 1, 1, PAD, halo=False)
    with pytest.raises(ShardMismatchError, match="different plans"):
        simulate_exchange([rank0, rank1])


def test_step_batch_needs_a_halo():
    layout = make_layout([[6]])
    ids, labels = make_batch(layout)
    shard = shard_batch(ids, labels, layout, 2, 0, 1, PAD, halo=False)
    counts = torch.tensor([5, 4])
    with pytest.raises(RuntimeError, match="no halo yet"):
        shard.step_batch(counts)
    full = shard_batch(ids, labels, layout, 2, 0, 1, PAD)
    batch = full.step_batch(counts)
    assert batch.kv_layout is full.kv_layout and batch.normalizer is counts
    assert torch.equal(batch.mtp_input_ids, full.mtp_input_ids) and batch.num_depths == 1
