"""Generation with an encoder-decoder model (T5): a prompt goes to the encoder, the answer comes from the decoder.

``Seq2SeqGenerator`` drives an mtnlg model's ``generate`` (``mtnlg.model.t5.T5Model``: the encoder once, the decoder
with a key/value cache and cross-attention keys/values computed once); ``HFSeq2SeqGenerator`` a Hugging Face
``AutoModelForSeq2SeqLM``. Both have the interface of ``mtnlg.eval.generate.Generator`` (``generate_ids``,
``encode``, ``decode``, ``complete``), so ``mtnlg generate`` and ``evaluate --task generate-match`` take either.

The encoder reads the prompt's tokens and EOD (T5's ``</s>``), as fine-tuning pairs are built
(``mtnlg.data.t5_dataset``); the decoder starts with the pad token. Sampling uses ``mtnlg.eval.generate.sample``
(a CPU generator seeded by ``seed``: the same draws on every tensor-parallel rank).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtnlg.errors import UserError
from mtnlg.eval.generate import Generator, HFGenerator, sample


def encoder_input(prompt: list[int], eod_id: int) -> list[int]:
    """The encoder's tokens of a prompt: the prompt and EOD (once)."""
    return list(prompt) if prompt and prompt[-1] == eod_id else [*prompt, eod_id]


def cut_at_eod(ids: list[int], eod_id: int, stop_at_eod: bool) -> list[int]:
    """The generated ids up to and including the first EOD (what the causal generator returns)."""
    if stop_at_eod and eod_id in ids:
        return ids[: ids.index(eod_id) + 1]
    return ids


class Seq2SeqGenerator:
    """Decoding with an mtnlg encoder-decoder model (pp = 1, any tensor-parallel size)."""

    def __init__(self, model, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 eod_id: int, start_id: int):
        self.model, self.encode, self.decode = model, encode, decode
        self.eod_id, self.start_id = eod_id, start_id

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop_at_eod: bool = True) -> list[list[int]]:
        if not prompts:
            raise UserError("give at least one prompt")
        device = next(self.model.parameters()).device
        rows = [encoder_input(p, self.eod_id) for p in prompts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.start_id, dtype=torch.long)
        padding = torch.zeros(len(rows), width, dtype=torch.long)
        for b, r in enumerate(rows):  # right-padded; the padding mask keeps the encoder off the pad tokens
            ids[b, : len(r)], padding[b, : len(r)] = torch.tensor(r), 1
        gen = torch.Generator().manual_seed(seed) if seed is not None else None

        def pick(logits: torch.Tensor) -> torch.Tensor:
            return sample(logits, temperature, top_k, top_p, gen)

        out = self.model.generate(ids.to(device), padding.to(device), max_new_tokens,
                                  self.eod_id if stop_at_eod else None, self.start_id, pick)
        return [cut_at_eod(row, self.eod_id, stop_at_eod) for row in out.tolist()]

    def complete(self, context: str, max_new_tokens: int = 64, stop: list[str] | None = None) -> str:
        return Generator.complete(self, context, max_new_tokens, stop)  # type: ignore[arg-type]


class HFSeq2SeqGenerator(HFGenerator):
    """The same interface over a Hugging Face encoder-decoder model (its own ``generate``)."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.eod_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.config.eos_token_id

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop_at_eod: bool = True) -> list[list[int]]:
        cfg = self.model.config
        # transformers' T5 cache assumes as many decoder blocks as encoder blocks; without it, no cache
        same_depth = getattr(cfg, "num_decoder_layers", None) in (None, getattr(cfg, "num_layers", None))
        out = []
        for prompt in prompts:  # one at a time: no padding conventions to get wrong
            if seed is not None:
                torch.manual_seed(seed)
            kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "num_beams": 1,
                      "use_cache": same_depth, "decoder_start_token_id": cfg.decoder_start_token_id,
                      "pad_token_id": cfg.pad_token_id, "eos_token_id": self.eod_id if stop_at_eod else None}
            if temperature > 0:
                kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
            enc = torch.tensor([encoder_input(prompt, self.eod_id)], device=self.model.device)
            ids = self.model.generate(input_ids=enc, attention_mask=torch.ones_like(enc), **kwargs)
            out.append(cut_at_eod(ids[0, 1:].tolist(), self.eod_id, stop_at_eod))  # after the start token
        return out
