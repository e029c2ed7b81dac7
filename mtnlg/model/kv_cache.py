"""The key/value cache of incremental decoding: one ``KVSlot`` per transformer layer."""

from __future__ import annotations

import torch


class KVSlot:
    """One layer's key/value cache for incremental decoding: (B, nkv, T_max, hd) per tensor.

    Row b holds ``lengths[b]`` valid positions; ``append`` writes the new keys/values of every
    row at its own position, so prompts of different lengths decode in one batch.
    """

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_kv, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.rows = slice(None)  # the rows a forward writes (one row during a prompt's prefill)
        self.start = torch.zeros(batch, dtype=torch.long, device=device)  # per-row position of the new tokens

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at each row's start; return all keys, values and the attention mask."""
        ks, vs, start = self.k[self.rows], self.v[self.rows], self.start[self.rows]
        T, max_len = k.size(2), ks.size(2)
        for b in range(k.size(0)):
            s = int(start[b])
            ks[b, :, s : s + T] = k[b]
            vs[b, :, s : s + T] = v[b]
        query_pos = start[:, None] + torch.arange(T, device=k.device)  # (B, T)
        mask = torch.arange(max_len, device=k.device)[None, None, :] <= query_pos[:, :, None]  # (B, T, T_max)
        return ks, vs, mask.unsqueeze(1)  # mask (B, 1, T, T_max)
