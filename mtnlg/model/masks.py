"""Attention masks as a choice: a block's self-attention is ``causal`` (decoders) or ``bidirectional`` (encoders),
and either may be narrowed by packed documents (``segment_ids``: attend only within one's own document) and by
padding (``padding``: (B, T) True for real tokens; padded keys are never attended to). Cross-attention is never
causal; it is narrowed by the padding of the sequence it attends to.

``None`` means "no mask tensor": plain causal or plain bidirectional attention, which the kernels compute without
one (``is_causal``). Every mask is boolean (B, 1, T_query, T_key), True = may attend.
"""

from __future__ import annotations

from typing import Literal

import torch

MaskKind = Literal["causal", "bidirectional"]


def self_attention_mask(kind: MaskKind, T: int, device, segments: torch.Tensor | None = None,
                        padding: torch.Tensor | None = None) -> torch.Tensor | None:
    """The self-attention mask of a block of ``kind`` over T tokens, narrowed by documents and padding."""
    if segments is None and padding is None:
        return None
    mask = torch.ones(1, 1, T, T, dtype=torch.bool, device=device)
    if kind == "causal":
        mask = mask.tril()
    if segments is not None:
        mask = mask & (segments[:, :, None] == segments[:, None, :]).unsqueeze(1)  # (B, 1, T, T)
    if padding is not None:
        mask = mask & padding[:, None, None, :].bool()  # keys only: a padded query's row is left as it is
    return _keep_one(mask)


def cross_attention_mask(context_padding: torch.Tensor | None, T: int) -> torch.Tensor | None:
    """(B, 1, T, S) mask of T queries over a context of S tokens whose padding is ``context_padding`` (B, S)."""
    if context_padding is None:
        return None
    return context_padding[:, None, None, :].bool().expand(-1, 1, T, -1)


def _keep_one(mask: torch.Tensor) -> torch.Tensor:
    """A query with nothing to attend to (a padded row of a causal mask) attends to itself, so its softmax is
    defined (its output is never used: padded positions carry no loss)."""
    T = mask.size(-1)
    eye = torch.eye(T, dtype=torch.bool, device=mask.device)
    return mask | (eye & ~mask.any(-1, keepdim=True))
