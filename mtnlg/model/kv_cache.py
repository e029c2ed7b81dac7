"""The key/value cache of incremental decoding: one ``KVSlot`` per transformer layer."""

from __future__ import annotations

import torch

from mtnlg.model.documents import segment_positions


class KVSlot:
    """One layer's key/value cache for incremental decoding: (B, nkv, T_max, hd) per tensor.

    Row b holds ``lengths[b]`` valid positions; ``append`` writes the new keys/values of every
    row at its own position, so prompts of different lengths decode in one batch.
    """

    def __init__(self, batch: int, n_kv: int, max_len: int, head_dim: int, device, dtype):
        self.k = torch.zeros(batch, n_kv, max_len, head_dim, device=device, dtype=dtype)
        self.v = torch.zeros_like(self.k)
        self.rows = slice(None)  # the rows a forward writes (one row during a prompt's prefill)
        self.start = torch.zeros(batch, dtype=torch.long, device=device)  # per-row slot of the new tokens
        # packed documents: each cached token's segment and position in it; the new tokens' (``plan``)
        self.seg = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.pos = torch.zeros(batch, max_len, dtype=torch.long, device=device)
        self.new_seg: torch.Tensor | None = None
        self.new_pos: torch.Tensor | None = None

    def plan(self, segment_ids: torch.Tensor | None, T: int) -> torch.Tensor:
        """Segments and positions (B, T) of the next T tokens of rows ``rows`` (set first); returns the positions.
        Without ``segment_ids`` they continue each row's last cached segment; a new segment starts at position 0,
        and a run that continues the last cached segment goes on from its position."""
        start = self.start[self.rows]
        seg, pos = self.seg[self.rows], self.pos[self.rows]
        last = (start - 1).clamp(min=0)[:, None]  # (B, 1)
        prev_seg, prev_pos = seg.gather(1, last), pos.gather(1, last)
        if segment_ids is None:
            segment_ids = prev_seg.expand(-1, T)
        within = segment_positions(segment_ids)  # (B, T), restarting at each change among the new tokens
        first_run = within == torch.arange(T, device=within.device)
        continues = (start[:, None] > 0) & (segment_ids[:, :1] == prev_seg)
        self.new_seg = segment_ids
        self.new_pos = within + torch.where(first_run & continues, prev_pos + 1, torch.zeros_like(prev_pos))
        return self.new_pos

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at each row's start; return all keys, values and the attention mask."""
        ks, vs, start = self.k[self.rows], self.v[self.rows], self.start[self.rows]
        seg, pos = self.seg[self.rows], self.pos[self.rows]
        T, max_len = k.size(2), ks.size(2)
        if self.new_seg is None:
            self.plan(None, T)
        for b in range(k.size(0)):
            s = int(start[b])
            ks[b, :, s : s + T] = k[b]
            vs[b, :, s : s + T] = v[b]
            seg[b, s : s + T] = self.new_seg[b]
            pos[b, s : s + T] = self.new_pos[b]
        query_pos = start[:, None] + torch.arange(T, device=k.device)  # (B, T)
        mask = torch.arange(max_len, device=k.device)[None, None, :] <= query_pos[:, :, None]  # (B, T, T_max)
        mask &= seg[:, None, :] == self.new_seg[:, :, None]  # only the query's own document
        self.new_seg = self.new_pos = None
        return ks, vs, mask.unsqueeze(1)  # mask (B, 1, T, T_max)
