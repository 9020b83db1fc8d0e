"""BigBird's block-sparse attention: the linear path equals the pattern written out and the dense reference, padded
batches and per-head random blocks included, and its memory grows linearly in length."""

from __future__ import annotations

import math

import pytest
import torch

from bunmyaku.models import sparse_attention as sa
from bunmyaku.models.big_bird import BigBirdConfig, BigBirdModel
from bunmyaku.models.sparse_attention import BlockSparsePattern, block_sparse_attention, block_sparse_reference
from tests.unit.test_sparse_attention import largest_tensor_mode


def _written_out(q, k, v, b, random_blocks, valid):
    """The pattern as loops: a global query block (the first, the last) sees every real key once; another block i
    sees the blocks {0, i - 1, i, i + 1, n - 1} once each and then its random blocks, each listing adding that block's
    real keys to the softmax again."""
    B, H, T, D = q.shape
    n = -(-T // b)
    out = torch.zeros_like(q)
    for row in range(B):
        for h in range(H):
            listed = random_blocks[h if random_blocks.size(0) > 1 else 0]
            for i in range(T):
                block = i // b
                if block in (0, n - 1):
                    blocks = list(range(n))
                else:
                    blocks = sorted({0, block - 1, block, block + 1, n - 1}) + listed[block - 1].tolist()
                keys = [j for kb in blocks for j in range(kb * b, min(kb * b + b, T)) if valid[row, j]]
                s = q[row, h, i] @ k[row, h, keys].T / math.sqrt(D)
                out[row, h, i] = s.softmax(-1) @ v[row, h, keys]
    return out


def _valid(T, lengths):
    return torch.arange(T)[None] < torch.tensor(lengths)[:, None]  # (B, T) right padding


CASES = [
    # T, block size, random blocks: "eval" (all block 0, as transformers in eval mode) or (heads, r) drawn; lengths
    (31, 4, ("eval", 2), [31, 20]),  # the last block short, one row padded by more than two blocks
    (40, 3, ((3, 3), None), [40, 33]),  # per-head random blocks, repeats and window blocks among them
    (29, 5, ((1, 1), None), [29, 29]),  # the same random blocks for every head, nothing padded
    (9, 3, ("eval", 1), [9, 7]),  # three blocks: the one middle block's window is the two global blocks
    (32, 4, ((3, 2), None), [32, 30]),  # a whole number of blocks
    (30, 3, ("eval", 0), [30, 25]),  # no random block: no block listed twice (a plain key mask)
]


def _pattern(T, b, random, lengths, seed):
    valid = _valid(T, lengths)
    if random[0] == "eval":
        return BlockSparsePattern.eval_mode(b, random[1], T, valid.long())
    heads, r = random[0]
    n = -(-T // b)
    blocks = torch.randint(0, n, (heads, n - 2, r), generator=torch.Generator().manual_seed(seed))
    return BlockSparsePattern(b, blocks, valid)


@pytest.mark.parametrize("T, b, random, lengths", CASES)
def test_block_sparse_equals_written_out_and_dense_reference(T, b, random, lengths):
    B, H, D = len(lengths), 3, 4
    pattern = _pattern(T, b, random, lengths, seed=T)
    g = torch.Generator().manual_seed(T)
    # (B, H, T, D) views of (B, T, H, D) tensors, as a model's projections hand them over
    q, k, v = (torch.randn(B, T, H, D, generator=g).transpose(1, 2).requires_grad_() for _ in "qkv")
    q2, k2, v2 = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = block_sparse_attention(q, k, v, pattern)
    expected = block_sparse_reference(q2, k2, v2, pattern)
    written = _written_out(q.detach(), k.detach(), v.detach(), b, pattern.random_blocks, _valid(T, lengths))
    torch.testing.assert_close(expected, written, atol=1e-5, rtol=1e-5)  # the dense path is the pattern
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)  # every position, padding queries included
    grad = torch.randn_like(out)
    (out * grad).sum().backward()
    (expected * grad).sum().backward()
    for ours, theirs in ((q, q2), (k, k2), (v, v2)):
        torch.testing.assert_close(ours.grad, theirs.grad, atol=1e-5, rtol=1e-5)


def test_random_blocks_change_the_output():
    """The random blocks are really read: other random blocks, other outputs in the middle blocks only."""
    T, b = 40, 4
    q, k, v = (torch.randn(1, 2, T, 8, generator=torch.Generator().manual_seed(i)) for i in range(3))
    zeros = BlockSparsePattern(b, torch.zeros(1, 8, 1, dtype=torch.long))
    fives = BlockSparsePattern(b, torch.full((1, 8, 1), 5, dtype=torch.long))
    diff = (block_sparse_attention(q, k, v, zeros) - block_sparse_attention(q, k, v, fives)).abs().amax((0, 1, 3))
    assert diff[:b].max() == 0 and diff[-b:].max() == 0  # the global query blocks see everything either way
    assert diff[b:-b].min() > 1e-4


def _largest(T, b, r):
    q, k, v = (torch.randn(1, 2, T, 4, requires_grad=True) for _ in "qkv")
    pattern = BlockSparsePattern.eval_mode(b, r, T)
    with largest_tensor_mode() as mode:
        block_sparse_attention(q, k, v, pattern).sum().backward()
    return mode.most


def test_memory_is_linear_in_length():
    b, r = 16, 2
    small, large = _largest(512, b, r), _largest(4096, b, r)
    assert large <= 8.5 * small  # 8x the tokens: about 8x the largest tensor, never the 64x of (T, T) scores
    assert large <= 2 * 4096 * (5 + r) * 4  # the gathered keys: (5 + r) D numbers per token and head (2 heads)
    assert large < 4096 * 4096 // 16


def test_big_bird_model_never_builds_a_quadratic_tensor():
    """The whole block-sparse model (embeddings, layers, pooler) at two lengths past its full-attention limit."""
    config = BigBirdConfig(
        vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=4096,
        block_size=16, num_random_blocks=2,
    )  # fmt: skip
    model = BigBirdModel(config).eval()
    most = []
    for T in (1024, 4096):
        with torch.no_grad(), largest_tensor_mode() as mode:
            model(input_ids=torch.randint(3, 99, (1, T)))
        most.append(mode.most)
    assert most[1] <= 4.3 * most[0]  # 4x the tokens
    assert most[1] < 4096 * 4096 // 4


def test_bad_block_sparse_patterns_are_refused():
    q = torch.zeros(1, 1, 20, 4)
    with pytest.raises(ValueError, match="block_size 0"):
        BlockSparsePattern(0, torch.zeros(1, 3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="expected \\(heads or 1, blocks - 2, r\\)"):
        BlockSparsePattern(4, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="lists 2 query blocks; a sequence of 5 blocks of 4 has 3"):
        block_sparse_attention(q, q, q, BlockSparsePattern(4, torch.zeros(1, 2, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="outside 0 .. 4"):
        block_sparse_attention(q, q, q, BlockSparsePattern(4, torch.full((1, 3, 1), 5, dtype=torch.long)))
    with pytest.raises(ValueError, match="for 2 heads; the attention has 1"):
        block_sparse_attention(q, q, q, BlockSparsePattern(4, torch.zeros(2, 3, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="needs at least 3 blocks"):
        block_sparse_attention(q, q, q, BlockSparsePattern(10, torch.zeros(1, 0, 1, dtype=torch.long)))
    with pytest.raises(ValueError, match="9 blocks with num_random_blocks=2: random blocks are drawn past"):
        BlockSparsePattern.eval_mode(4, 2, 36).redrawn(2)  # 36 tokens: the model attends fully there
    with pytest.raises(ValueError, match="query block 2 has fewer than num_random_blocks=1 blocks to draw from"):
        BlockSparsePattern.eval_mode(256, 1, 3072).redrawn(2)  # the older rule: block 2 has nothing outside its window


@pytest.mark.parametrize("T, b, random, lengths", CASES)
def test_flex_route_equals_dense_reference_on_cpu(T, b, random, lengths, flex_on_cpu):
    """The CUDA route (a BlockMask of the listed blocks, log(times listed) as a score term) run eagerly on the CPU:
    every position equals the dense reference, repeated random blocks and padding included."""
    B, H, D = len(lengths), 3, 4
    pattern = _pattern(T, b, random, lengths, seed=T)
    g = torch.Generator().manual_seed(T + 1)
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in "qkv")
    with torch.no_grad():
        out = block_sparse_attention(q, k, v, pattern)
    assert flex_on_cpu == ["sparse"]
    torch.testing.assert_close(out, block_sparse_reference(q, k, v, pattern), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("T, b, random", [(1000, 64, ("eval", 3)), (700, 32, ((4, 2), None))])
def test_flex_block_sparse_equals_dense_reference_on_cuda(T, b, random):
    pattern = _pattern(T, b, random, [T, T - 77], seed=0)
    pattern.valid, pattern.random_blocks = pattern.valid.cuda(), pattern.random_blocks.cuda()
    q, k, v = (torch.randn(2, 4, T, 64, device="cuda") for _ in "qkv")
    out = block_sparse_attention(q, k, v, pattern)
    assert sa._compiled_flex is not None  # the flex path ran
    torch.testing.assert_close(out, block_sparse_reference(q, k, v, pattern), atol=2e-4, rtol=2e-4)


# training mode: a fresh draw of random blocks per layer and forward, from torch's generator
TRAIN_CONFIG = dict(
    vocab_size=99, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=37, max_seq_len=128,
    block_size=4, num_random_blocks=2, dropout=0.0, attention_dropout=0.0,
)  # fmt: skip


def _record_patterns(monkeypatch, replace=None):
    """Every pattern the model hands to block-sparse attention, in call order; ``replace(q, k, v, pattern)`` computes
    the attention instead when given."""
    import bunmyaku.models.big_bird as big_bird

    seen = []

    def attend(q, k, v, pattern, dropout_p=0.0, scale=None):
        seen.append(pattern)
        if replace is not None:
            return replace(q, k, v, pattern)
        return block_sparse_attention(q, k, v, pattern, dropout_p=dropout_p, scale=scale)

    monkeypatch.setattr(big_bird, "block_sparse_attention", attend)
    return seen


def test_training_draws_fresh_random_blocks_per_layer_and_forward(monkeypatch):
    seen = _record_patterns(monkeypatch)
    model = BigBirdModel(BigBirdConfig(**TRAIN_CONFIG)).train()
    ids = torch.randint(3, 99, (2, 80), generator=torch.Generator().manual_seed(0))  # 20 blocks of 4: past 36 tokens
    outs = []
    for seed in (0, 1, 0):
        torch.manual_seed(seed)
        outs.append(model(input_ids=ids).last_hidden_state)
    draws = [p.random_blocks for p in seen]  # (H, n - 2, r) each: 2 layers x 3 forwards
    assert all(d.shape == (4, 18, 2) for d in draws)  # every head its own blocks
    assert not torch.equal(draws[0], draws[1])  # each layer its own draw
    assert not torch.equal(draws[0], draws[2]) and not torch.equal(draws[1], draws[3])  # each forward a new one
    assert (outs[0] - outs[1]).abs().max() > 1e-3  # with dropout 0, only the random blocks differ
    assert torch.equal(draws[0], draws[4]) and torch.equal(draws[1], draws[5])  # the same seed: the same draws
    torch.testing.assert_close(outs[0], outs[2], atol=0, rtol=0)
    model.eval()
    with torch.no_grad():  # eval mode: transformers' fixed pattern (every random block is block 0), so no seed matters
        torch.manual_seed(0)
        first = model(input_ids=ids).last_hidden_state
        torch.manual_seed(1)
        torch.testing.assert_close(model(input_ids=ids).last_hidden_state, first, atol=0, rtol=0)
    assert seen[-1].random_blocks.abs().max() == 0


def test_training_output_and_input_gradient_equal_the_dense_reference(monkeypatch):
    """The whole model in training mode against itself with each layer's attention computed the dense way
    (:func:`block_sparse_reference`) under the blocks that layer drew: padded rows, per-head blocks."""
    model = BigBirdModel(BigBirdConfig(**TRAIN_CONFIG)).train()
    ids = torch.randint(3, 99, (2, 61), generator=torch.Generator().manual_seed(1))  # 16 blocks, the last one short
    mask = _valid(61, [61, 45]).long()
    embeds = model.embed.tokens(ids).detach()

    def run():
        x = embeds.clone().requires_grad_()
        out = model(inputs_embeds=x, attention_mask=mask).last_hidden_state
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        return out, x.grad

    seen = _record_patterns(monkeypatch)
    sparse = run()
    drawn = iter(list(seen))
    _record_patterns(monkeypatch, lambda q, k, v, pattern: block_sparse_reference(q, k, v, next(drawn)))
    dense = run()
    assert len(seen) == 2 and all(p.random_blocks.size(0) == 4 for p in seen)
    assert not torch.equal(seen[0].random_blocks[0], seen[0].random_blocks[1])  # the heads differ
    torch.testing.assert_close(sparse[0], dense[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sparse[1], dense[1], atol=1e-5, rtol=1e-5)  # the input gradient


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_training_draw_stays_on_the_device():
    model = BigBirdModel(BigBirdConfig(**TRAIN_CONFIG)).cuda().train()
    pattern = BlockSparsePattern.eval_mode(4, 2, 80, device="cuda").redrawn(4)
    assert pattern.random_blocks.is_cuda and pattern.random_blocks.shape == (4, 18, 2)
    q, k, v = (torch.randn(2, 4, 80, 8, device="cuda") for _ in "qkv")
    torch.testing.assert_close(
        block_sparse_attention(q, k, v, pattern), block_sparse_reference(q, k, v, pattern), atol=2e-4, rtol=2e-4
    )
    model(input_ids=torch.randint(3, 99, (2, 80), device="cuda")).last_hidden_state.sum().backward()
