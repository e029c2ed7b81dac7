"""Packed sequences: several documents in one row, told apart by ``segment_ids`` (B, T).

A token attends only to earlier tokens of its own segment (the document mask) and its position restarts at 0
where its segment starts, so a packed document is computed exactly as if it stood alone at the start of a row.
Segments are contiguous runs of equal ids; the ids themselves carry no meaning beyond "changes here".
Models take ``(input_ids, segment_ids)`` where they take ``input_ids`` (``mtnlg.model.gpt``); the pair travels
through the transformer blocks and DeepSpeed's pipeline as ``(hidden, segment_ids)``.
"""

from __future__ import annotations

import torch


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, T) position of each token within its segment: 0 at each segment's first token."""
    T = segment_ids.size(-1)
    idx = torch.arange(T, device=segment_ids.device).expand_as(segment_ids)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[..., 1:] = segment_ids[..., 1:] != segment_ids[..., :-1]
    first = torch.where(starts, idx, torch.zeros_like(idx)).cummax(dim=-1).values  # (B, T) index of its start
    return idx - first


def document_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, 1, T, T) boolean attention mask: causal, and only within a segment (True = may attend)."""
    T = segment_ids.size(-1)
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril_()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (B, T, T)
    return (same & causal).unsqueeze(1)


def split_inputs(x: torch.Tensor | tuple) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``x`` or ``(x, segment_ids)`` -> (x, segment_ids or None)."""
    if isinstance(x, (tuple, list)):
        return x[0], x[1]
    return x, None
