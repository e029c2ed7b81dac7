"""The key/value cache of incremental decoding: one ``KVSlot`` per transformer layer."""

from __future__ import annotations

import torch

from mtnlg.model.documents import segment_positions


class KVSlot:
    """One layer's key/value cache for incremental decoding: (B, nkv, T_max, hd) per tensor.

    Row b holds ``lengths[b]`` valid positions; ``append`` writes the new keys/values of every
    row at its own position (one indexed copy for the whole batch), so prompts of different lengths
    decode in one batch.
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
        self.shared: dict | None = None  # what the layers of one forward compute once (``plan``, ``follow``)

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
        self.shared = {}
        return self.new_pos

    def follow(self, other: KVSlot) -> None:
        """Take ``other``'s plan for the same forward: every layer's cache holds the same rows at the same
        lengths, so the segments, positions and attention mask of the new tokens are computed once."""
        self.rows, self.new_seg, self.new_pos, self.shared = other.rows, other.new_seg, other.new_pos, other.shared

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Store k, v (B, nkv, T, hd) at each row's start; return all keys, values and the attention mask."""
        ks, vs, start = self.k[self.rows], self.v[self.rows], self.start[self.rows]
        seg, pos = self.seg[self.rows], self.pos[self.rows]
        B, n_kv, T, hd = k.shape
        max_len = ks.size(2)
        if self.new_seg is None:
            self.plan(None, T)
        where = start[:, None] + torch.arange(T, device=k.device)  # (B, T): each new token's slot in its row
        shared = self.shared if self.shared is not None else {}
        mask = shared.get("mask")  # the first layer of a forward checks and builds, the others reuse
        if mask is None and int(where[:, -1].max()) >= max_len:
            raise RuntimeError(f"the key/value cache holds {max_len} positions; a row needs more")
        at = where[:, None, :, None].expand(B, n_kv, T, hd)
        ks.scatter_(2, at, k)
        vs.scatter_(2, at, v)
        seg.scatter_(1, where, self.new_seg)
        pos.scatter_(1, where, self.new_pos)
        if mask is None:
            mask = torch.arange(max_len, device=k.device)[None, None, :] <= where[:, :, None]  # (B, T, T_max)
            mask &= seg[:, None, :] == self.new_seg[:, :, None]  # only the query's own document
            mask = shared["mask"] = mask.unsqueeze(1)  # (B, 1, T, T_max)
        self.new_seg = self.new_pos = self.shared = None
        return ks, vs, mask
