"""8-bit AdamW tracks 32-bit AdamW: on a toy regression and on a tiny language model; small tensors keep fp32."""

from __future__ import annotations

import torch
from torch import nn

from qlorakit.optim import AdamW


def _regression_losses(state_bits: int, steps: int = 300) -> list[float]:
    g = torch.Generator().manual_seed(0)
    w_true = torch.randn(128, 64, generator=g) / 8
    x = torch.randn(512, 64, generator=g)
    y = x @ w_true.T + 0.01 * torch.randn(512, 128, generator=g)
    w = nn.Parameter(torch.zeros(128, 64))  # 8192 elements: 8-bit states
    b = nn.Parameter(torch.zeros(128))  # 128 elements: fp32 states
    opt = AdamW([w, b], lr=1e-2, weight_decay=0.0, state_bits=state_bits)
    losses = []
    for _ in range(steps):
        loss = ((x @ w.T + b - y) ** 2).mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(float(loss.detach()))
    return losses


def test_8bit_tracks_32bit_on_a_toy_regression():
    l32, l8 = _regression_losses(32), _regression_losses(8)
    assert l32[-1] < 0.01 * l32[0]  # it learns
    assert abs(l8[-1] - l32[-1]) <= 0.01 * l32[-1]
    # and follows the same curve all the way, not only at the end (while the loss falls 10,000-fold, a curve
    # shifted by a fraction of a step differs by a few percent)
    assert max(abs(a - b) / b for a, b in zip(l8, l32)) < 0.1


class TinyLM(nn.Module):
    """Predicts token t from tokens t-2, t-1: embedding 128x32, MLP 64 -> 128 -> 128 logits."""

    def __init__(self, vocab: int = 128, dim: int = 32, hidden: int = 128):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc1 = nn.Linear(2 * dim, hidden)
        self.fc2 = nn.Linear(hidden, vocab)

    def loss(self, tokens: torch.Tensor) -> torch.Tensor:
        e = self.emb(tokens)
        ctx = torch.cat([e[:, :-2], e[:, 1:-1]], dim=-1)
        logits = self.fc2(torch.relu(self.fc1(ctx)))
        return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 2:].reshape(-1))


def _markov_batches(vocab: int = 128, batch: int = 32, length: int = 34):
    """Synthetic text: each token is followed by one of 4 fixed successors (best loss log 4 = 1.386)."""
    succ = torch.randint(0, vocab, (vocab, 4), generator=torch.Generator().manual_seed(7))

    def make(step: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(1000 + step)
        x = torch.empty(batch, length, dtype=torch.long)
        x[:, 0] = torch.randint(0, vocab, (batch,), generator=g)
        for t in range(1, length):
            x[:, t] = succ[x[:, t - 1], torch.randint(0, 4, (batch,), generator=g)]
        return x

    return make


def _lm_run(state_bits: int, steps: int = 200) -> tuple[float, float, AdamW, TinyLM]:
    torch.manual_seed(0)
    model = TinyLM()
    opt = AdamW(model.parameters(), lr=3e-3, weight_decay=0.01, state_bits=state_bits)
    batches = _markov_batches()
    first = None
    for step in range(steps):
        loss = model.loss(batches(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        first = float(loss.detach()) if first is None else first
    with torch.no_grad():
        final = sum(float(model.loss(batches(10**6 + i))) for i in range(4)) / 4  # held-out batches
    return first, final, opt, model


def test_8bit_tracks_32bit_on_a_tiny_language_model():
    first, final32, _, _ = _lm_run(32)
    _, final8, opt8, model8 = _lm_run(8)
    assert final32 < 0.5 * first  # it learns (from ~4.85 to near log 4)
    assert abs(final8 - final32) <= 0.01 * final32
    # the large tensors really were 8-bit
    assert "exp_avg_codes" in opt8.state[model8.fc2.weight] and "exp_avg" in opt8.state[model8.fc2.bias]


def test_small_tensors_keep_fp32_states_and_large_ones_take_a_quarter_of_the_bytes():
    big, small, edge = nn.Parameter(torch.randn(64, 1024)), nn.Parameter(torch.randn(4095)), nn.Parameter(
        torch.randn(4096))
    opt = AdamW([big, small, edge], lr=1e-3, state_bits=8)
    for p in (big, small, edge):
        p.grad = torch.randn_like(p)
    opt.step()
    assert opt.state[small]["exp_avg"].dtype == torch.float32 and opt.state[small]["exp_avg_sq"].numel() == 4095
    for p in (big, edge):  # the threshold is inclusive: min_8bit_size=4096 elements
        st = opt.state[p]
        assert st["exp_avg_codes"].dtype == torch.uint8 and st["exp_avg_sq_codes"].dtype == torch.uint8
        assert st["exp_avg_absmax"].dtype == torch.float32 and st["exp_avg_absmax"].numel() == p.numel() // 256
    only_big = AdamW([nn.Parameter(torch.randn(64, 1024))], lr=1e-3, state_bits=8)
    fp32 = AdamW([nn.Parameter(torch.randn(64, 1024))], lr=1e-3, state_bits=32)
    for o in (only_big, fp32):
        o.param_groups[0]["params"][0].grad = torch.ones(64, 1024)
        o.step()
    ratio = fp32.state_bytes()["cpu"] / only_big.state_bytes()["cpu"]
    assert 3.9 < ratio < 4.0  # 8 bytes against 2 + 8/256 bytes per element
