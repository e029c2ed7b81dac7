"""Next-token log-probabilities from a model: the one primitive every evaluation task needs.

``TorchScorer`` wraps any ``forward(input_ids) -> logits`` on one process: a Hugging Face
model, or an mtnlg causal model. Sequences of one batch are right-padded (causal attention
never looks right, so padding does not change the scores of real positions).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch


class TorchScorer:
    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], encode: Callable[[str], list[int]],
                 max_length: int, device: torch.device | str = "cpu", batch_size: int = 8):
        self.forward, self._encode = forward, encode
        self.max_length, self.device, self.batch_size = max_length, torch.device(device), batch_size

    def encode(self, text: str) -> list[int]:
        return list(self._encode(text))

    @torch.no_grad()
    def score(self, seqs: list[list[int]]) -> list[tuple[np.ndarray, np.ndarray]]:
        out: list[tuple[np.ndarray, np.ndarray]] = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = seqs[start:start + self.batch_size]
            width = max(len(s) for s in chunk)
            if width - 1 > self.max_length:
                raise ValueError(f"a sequence of {width - 1} inputs exceeds the context {self.max_length}")
            ids = torch.zeros(len(chunk), width, dtype=torch.long)
            for i, s in enumerate(chunk):
                ids[i, : len(s)] = torch.tensor(s)
            ids = ids.to(self.device)
            logits = self.forward(ids[:, :-1]).float()  # (B, T-1, V)
            target = ids[:, 1:]
            lp = torch.log_softmax(logits, dim=-1).gather(-1, target.unsqueeze(-1)).squeeze(-1)
            greedy = logits.argmax(-1) == target
            lp, greedy = lp.cpu().numpy(), greedy.cpu().numpy()
            for i, s in enumerate(chunk):
                out.append((lp[i, : len(s) - 1].astype(np.float64), greedy[i, : len(s) - 1]))
        return out


def load_hf(hf_dir: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of a Hugging Face directory, offline, quietly."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from mtnlg.errors import UserError

    hf_logging.disable_progress_bar()
    local = Path(hf_dir).is_dir()  # a directory on disk: never ask the hub; a hub name: the hub's rules apply
    try:
        tok = AutoTokenizer.from_pretrained(hf_dir, local_files_only=local)
        seq2seq = getattr(AutoConfig.from_pretrained(hf_dir, local_files_only=local), "is_encoder_decoder", False)
        auto = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM  # T5: mtnlg.eval.seq2seq generates
        model = auto.from_pretrained(hf_dir, dtype=dtype, local_files_only=local).to(device).eval()
    except (OSError, ValueError) as e:
        raise UserError(f"cannot load a Hugging Face model from {hf_dir} ({str(e).splitlines()[0]})") from None
    return model, tok


def hf_scorer(model, tok, device: str = "cpu", batch_size: int = 8) -> TorchScorer:
    """A scorer over a loaded Hugging Face causal LM."""
    ctx = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", 1024)
    return TorchScorer(lambda x: model(x).logits, lambda t: tok.encode(t, add_special_tokens=False), ctx,
                       device, batch_size)
