from __future__ import annotations

import pytest
import torch
from torch import nn

from lesson7_sweeps.models.rnn import CharRNN, GRUCell, LoopRNN, generate


def model(kind: str = "lstm", cell: str = "cudnn", stateful: bool = True, n_layers: int = 2) -> CharRNN:
    torch.manual_seed(0)
    return CharRNN(vocab_size=11, kind=kind, n_fac=5, n_hidden=7, n_layers=n_layers, dropout=0.0,
                   cell=cell, stateful=stateful, reset_hidden=True)


def x(seq_len: int = 6, bs: int = 3) -> torch.Tensor:
    return torch.randint(0, 11, (seq_len, bs), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("cell", ["cudnn", "loop"])
def test_log_probs_for_every_position(kind: str, cell: str):
    out = model(kind, cell)(x())
    assert out.shape == (6 * 3, 11)
    assert torch.allclose(out.exp().sum(-1), torch.ones(18), atol=1e-5)


def hidden(m: CharRNN) -> torch.Tensor:
    return m.h[0] if m.kind == "lstm" else m.h


@pytest.mark.parametrize("kind", ["rnn", "lstm"])
def test_hidden_state_is_carried_and_detached(kind: str):
    m = model(kind)
    m(x()).sum().backward()
    state = m.h
    assert hidden(m).grad_fn is None and not hidden(m).requires_grad  # detached: BPTT stops here
    assert hidden(m).abs().sum() > 0
    x2 = x(seq_len=4)
    out = m(x2)
    twin = model(kind)  # same weights; feed it the carried state explicitly
    expected = torch.log_softmax(twin.decoder(twin.rnn(twin.emb(x2), state)[0]), -1).view(-1, 11)
    assert torch.allclose(out, expected, atol=1e-6)
    assert not torch.allclose(out, model(kind)(x2), atol=1e-4)  # and differs from a zero start


def test_hidden_state_recreated_when_batch_size_changes_and_on_reset():
    m = model("gru")
    m(x(bs=3))
    assert hidden(m).shape == (2, 3, 7)
    m(x(bs=5))  # a different batch size (e.g. the last, smaller batch): fresh zeros of the new size
    assert hidden(m).shape == (2, 5, 7)
    first = model("gru")(x(bs=5))
    m.reset()
    assert m.h is None
    assert torch.allclose(m(x(bs=5)), first, atol=1e-6)  # after reset: as a fresh model


def test_not_stateful_starts_every_batch_from_zeros():
    m = model("rnn", stateful=False)
    a = m(x())
    b = m(x())
    assert torch.allclose(a, b)  # same input, no carried state -> same output
    s = model("rnn", stateful=True)
    s(x())
    assert not torch.allclose(s(x()), a)


def test_gru_from_equations_equals_nn_gru():
    torch.manual_seed(0)
    ref = nn.GRU(5, 7)
    cell = GRUCell(5, 7)
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(cell, name).copy_(getattr(ref, f"{name}_l0"))
    inp, h0 = torch.randn(9, 4, 5), torch.randn(1, 4, 7)
    expected, h_ref = ref(inp, h0)
    h, outs = h0[0], []
    for x_t in inp:
        h = cell(x_t, h)
        outs.append(h)
    assert torch.allclose(torch.stack(outs), expected, atol=1e-6)
    assert torch.allclose(h, h_ref[0], atol=1e-6)


@pytest.mark.parametrize("kind", ["rnn", "gru", "lstm"])
def test_loop_equals_cudnn_layers_with_the_same_weights(kind: str):
    torch.manual_seed(0)
    ref = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind](5, 7, 2)
    loop = LoopRNN(kind, 5, 7, 2, dropout=0.0)
    with torch.no_grad():
        for i, c in enumerate(loop.cells):
            for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
                getattr(c, name).copy_(getattr(ref, f"{name}_l{i}"))
    inp = torch.randn(6, 3, 5)
    h0 = torch.randn(2, 3, 7)
    state = (h0, torch.randn(2, 3, 7)) if kind == "lstm" else h0
    out_ref, h_ref = ref(inp, state)
    out, h = loop(inp, state)
    assert torch.allclose(out, out_ref, atol=1e-5)
    for a, b in zip(h if kind == "lstm" else (h,), h_ref if kind == "lstm" else (h_ref,)):
        assert torch.allclose(a, b, atol=1e-5)


def test_layer_groups_are_the_natural_stages():
    m = model()
    groups = m.layer_groups()
    assert groups == [m.emb, m.rnn, m.decoder]
    assert sum(len(list(g.parameters())) for g in groups) == len(list(m.parameters()))


def test_generate_greedy_is_deterministic_and_leaves_state_clean():
    m = model()
    prompt = torch.tensor([1, 2, 3])
    a = generate(m, prompt, 15, temperature=0)
    assert a == generate(m, prompt, 15, temperature=0)
    assert len(a) == 15 and all(0 <= i < 11 for i in a)
    assert m.h is None and m.training
    torch.manual_seed(5)
    s1 = generate(m, prompt, 15, temperature=1.0)
    torch.manual_seed(5)
    assert generate(m, prompt, 15, temperature=1.0) == s1
