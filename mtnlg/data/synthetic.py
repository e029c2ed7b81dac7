"""A synthetic token source with a known entropy: a fixed random Markov chain.

Each token has ``branching`` possible successors with random probabilities (Dirichlet(1)).
A sample is a walk of seq_length + 1 tokens starting from the chain's stationary
distribution, drawn from a generator seeded by (seed, sample index) only: the same global
sample index gives the same tokens whatever the parallel layout, rank or resume point.
A model that sees the previous token can reach, and no model can beat, the chain's
entropy rate ``entropy`` (nats per token) as its expected loss.
"""

from __future__ import annotations

import numpy as np


class MarkovSource:
    def __init__(self, vocab_size: int, branching: int, seq_length: int, seed: int = 0, stream: int = 0):
        """``seed`` fixes the chain; ``stream`` picks an independent set of walks on it (e.g. validation)."""
        if branching > vocab_size:
            raise ValueError(f"branching {branching} exceeds vocab_size {vocab_size}")
        self.vocab_size, self.branching, self.seq_length = vocab_size, branching, seq_length
        self.seed, self.stream = seed, stream
        rng = np.random.default_rng([seed, 0x4D41524B])
        self.successors = np.stack([rng.choice(vocab_size, branching, replace=False) for _ in range(vocab_size)])
        self.probs = rng.dirichlet(np.ones(branching), size=vocab_size)  # (V, k)
        self.cum = np.cumsum(self.probs, axis=1)
        self.cum[:, -1] = 1.0
        self.stationary = self._stationary()
        self.stationary_cum = np.cumsum(self.stationary)
        self.stationary_cum[-1] = 1.0

    def _stationary(self, iters: int = 10_000, tol: float = 1e-13) -> np.ndarray:
        pi = np.full(self.vocab_size, 1.0 / self.vocab_size)
        for _ in range(iters):
            nxt = np.zeros_like(pi)
            np.add.at(nxt, self.successors, pi[:, None] * self.probs)
            if np.abs(nxt - pi).sum() < tol:
                return nxt
            pi = 0.5 * (pi + nxt)  # lazy walk: converges even for periodic chains
        return pi

    @property
    def entropy(self) -> float:
        """Entropy rate in nats per token: sum_i pi_i * H(P(. | i))."""
        h = -(self.probs * np.log(np.clip(self.probs, 1e-300, None))).sum(axis=1)
        return float((self.stationary * h).sum())

    def __len__(self) -> int:
        return 2**62

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.stream, int(index)])
        u = rng.random(self.seq_length + 1)
        out = np.empty(self.seq_length + 1, dtype=np.int64)
        state = int(np.searchsorted(self.stationary_cum, u[0], side="right"))
        out[0] = state
        for t in range(1, self.seq_length + 1):
            state = int(self.successors[state, np.searchsorted(self.cum[state], u[t], side="right")])
            out[t] = state
        return out
