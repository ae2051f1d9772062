"""Lesson 6's stateful character models: RNN, GRU and LSTM, with cuDNN layers or an explicit loop."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Hidden = Tensor | tuple[Tensor, Tensor]  # [n_layers, bs, n_hidden], a (h, c) pair for the LSTM


class GRUCell(nn.Module):
    """One GRU step written from its equations, with nn.GRU's weight layout (gates r, z, n).

        r_t = σ(W_ir x + b_ir + W_hr h + b_hr)          reset gate: how much of h feeds h̃
        z_t = σ(W_iz x + b_iz + W_hz h + b_hz)          update gate (PyTorch's: the share of h kept)
        h̃_t = tanh(W_in x + b_in + r_t ⊙ (W_hn h + b_hn))
        h_t = (1 − z_t) ⊙ h̃_t + z_t ⊙ h_{t−1}

    The lesson writes h_t = (1 − z_t) ⊙ h_{t−1} + z_t ⊙ h̃_t: its z is PyTorch's 1 − z. We keep
    PyTorch's convention so this cell equals nn.GRU given the same weights.
    """

    def __init__(self, n_in: int, n_hidden: int) -> None:
        super().__init__()
        self.weight_ih = nn.Parameter(torch.empty(3 * n_hidden, n_in))
        self.weight_hh = nn.Parameter(torch.empty(3 * n_hidden, n_hidden))
        self.bias_ih = nn.Parameter(torch.empty(3 * n_hidden))
        self.bias_hh = nn.Parameter(torch.empty(3 * n_hidden))
        bound = 1 / math.sqrt(n_hidden)  # nn.GRU's initialisation
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def forward(self, x: Tensor, h: Tensor) -> Tensor:
        i_r, i_z, i_n = F.linear(x, self.weight_ih, self.bias_ih).chunk(3, dim=1)
        h_r, h_z, h_n = F.linear(h, self.weight_hh, self.bias_hh).chunk(3, dim=1)
        r = torch.sigmoid(i_r + h_r)
        z = torch.sigmoid(i_z + h_z)
        h_tilde = torch.tanh(i_n + r * h_n)
        return (1 - z) * h_tilde + z * h


class LoopRNN(nn.Module):
    """Stacked cells run by an explicit time loop; same inputs and outputs as nn.RNN/GRU/LSTM."""

    def __init__(self, kind: str, n_in: int, n_hidden: int, n_layers: int, dropout: float) -> None:
        super().__init__()
        cell = {"rnn": nn.RNNCell, "gru": GRUCell, "lstm": nn.LSTMCell}[kind]
        self.cells = nn.ModuleList(cell(n_in if i == 0 else n_hidden, n_hidden) for i in range(n_layers))
        self.drop = nn.Dropout(dropout)  # between layers, as nn.LSTM(dropout=...) does
        self.lstm = kind == "lstm"

    def forward(self, x: Tensor, hidden: Hidden, steps: Tensor | None = None) -> tuple[Tensor, Hidden]:
        """`steps`: the real length of a padded x (a 0-d tensor); the state holds still after it."""
        states = list(zip(*hidden)) if self.lstm else list(hidden)  # one state per layer
        for i, cell in enumerate(self.cells):
            outs = []
            for t, x_t in enumerate(x):
                new = cell(x_t, states[i])
                if steps is not None:  # a select, not a branch: one graph serves every real length
                    real = t < steps
                    new = tuple(torch.where(real, a, b) for a, b in zip(new, states[i])) if self.lstm else \
                        torch.where(real, new, states[i])
                states[i] = new
                outs.append(new[0] if self.lstm else new)
            x = torch.stack(outs)
            if i < len(self.cells) - 1:
                x = self.drop(x)
        if self.lstm:
            return x, (torch.stack([h for h, _ in states]), torch.stack([c for _, c in states]))
        return x, torch.stack(states)


class CharRNN(nn.Module):
    """Embedding -> recurrent layers -> linear decoder; log-probabilities for every position.

    Stateful (the lesson's CharSeqStateful* models): the hidden state of one batch is the initial
    state of the next, detached so back-propagation stops at the batch boundary (truncated BPTT).
    It is re-created when the batch size changes and by `reset()`, which the runner calls at each
    epoch start and evaluation unless reset_hidden=False: the lesson's models had no reset(), so their
    state carried across epochs, into validation and back. With stateful=False every batch starts
    from zeros: the lesson's "problem" version.
    """

    def __init__(self, vocab_size: int, kind: str, n_fac: int, n_hidden: int, n_layers: int,
                 dropout: float, cell: str, stateful: bool, reset_hidden: bool) -> None:
        super().__init__()
        self.vocab_size, self.kind, self.stateful, self.reset_hidden = vocab_size, kind, stateful, reset_hidden
        self.n_layers, self.n_hidden = n_layers, n_hidden
        self.emb = nn.Embedding(vocab_size, n_fac)
        if cell == "cudnn":
            layer = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}[kind]
            self.rnn = layer(n_fac, n_hidden, n_layers, dropout=dropout if n_layers > 1 else 0.0)
        else:
            self.rnn = LoopRNN(kind, n_fac, n_hidden, n_layers, dropout)
        self.decoder = nn.Linear(n_hidden, vocab_size)
        self.h: Hidden | None = None
        self.pads = cell == "loop"  # forward(x, steps) holds the state over padding (fast.py)

    def init_hidden(self, bs: int, device: torch.device) -> Hidden:
        zeros = torch.zeros(self.n_layers, bs, self.n_hidden, device=device)
        return (zeros, zeros.clone()) if self.kind == "lstm" else zeros

    def reset(self) -> None:
        self.h = None

    def forward(self, x: Tensor, steps: Tensor | None = None) -> Tensor:
        """x: [seq_len, bs] token ids -> [seq_len * bs, vocab_size] log-probabilities. `steps`: x is
        padded after that many steps (loop cells only); the state carried on is the one at `steps`."""
        bs = x.size(1)
        state = self.h
        batch_changed = state is not None and (state[0] if self.kind == "lstm" else state).size(1) != bs
        if not self.stateful or state is None or batch_changed:
            state = self.init_hidden(bs, x.device)
        out, h = self.rnn(self.emb(x), state) if steps is None else self.rnn(self.emb(x), state, steps)
        self.h = tuple(t.detach() for t in h) if self.kind == "lstm" else h.detach()
        return F.log_softmax(self.decoder(out), dim=-1).view(-1, self.vocab_size)

    def layer_groups(self) -> list[nn.Module]:
        return [self.emb, self.rnn, self.decoder]


@torch.no_grad()
def generate(model: CharRNN, prompt: Tensor, n: int, temperature: float) -> list[int]:
    """Continue `prompt` (token ids) by n tokens: greedy at temperature 0, else sampled. The prompt
    starts from a fresh state; the model's own (training's) state is left as it was."""
    was_training, carried = model.training, model.h
    model.eval()
    model.reset()
    logp = model(prompt.view(-1, 1))[-1]
    out = []
    for _ in range(n):
        if temperature == 0:
            nxt = logp.argmax().view(1)
        else:
            nxt = torch.multinomial(F.softmax(logp / temperature, dim=-1), 1)
        out.append(nxt)
        logp = model(nxt.view(1, 1))[-1]
    model.h = carried
    model.train(was_training)
    return torch.cat(out).tolist() if out else []
