"""Text generation with a key/value cache: greedy or sampled (temperature, top-k, top-p), batched
prompts of different lengths, stopping at end-of-document.

Sampling draws from a CPU generator seeded by ``seed``, so a seed gives the same text on any
device and on every tensor-parallel rank (their gathered logits are identical).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from mtnlg.errors import UserError


def sample(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
           generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    logits = logits.float().cpu()
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1)), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class Generator:
    """Incremental decoding with an mtnlg causal model (its ``new_cache``/``forward_cached``): any tensor-parallel
    size, pp = 1."""

    def __init__(self, model, encode: Callable[[str], list[int]], decode: Callable[[list[int]], str],
                 eod_id: int, max_positions: int):
        self.model, self.encode, self.decode, self.eod_id = model, encode, decode, eod_id
        self.max_positions = max_positions

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop_at_eod: bool = True) -> list[list[int]]:
        if not prompts or any(not p for p in prompts):
            raise UserError("every prompt needs at least one token")
        longest = max(len(p) for p in prompts) + max_new_tokens
        if longest > self.max_positions:
            raise UserError(f"prompt + --max-new-tokens = {longest} tokens exceeds the model's "
                            f"{self.max_positions} positions; shorten the prompt or generate fewer tokens")
        device = next(self.model.parameters()).device
        gen = torch.Generator().manual_seed(seed) if seed is not None else None
        cache = self.model.new_cache(len(prompts), longest)
        last = []
        for b, prompt in enumerate(prompts):  # prefill each prompt into its own cache row
            logits = self.model.forward_cached(torch.tensor([prompt], device=device), cache, rows=slice(b, b + 1))
            last.append(logits[0, -1])
        logits = torch.stack(last)  # (B, V)
        out: list[list[int]] = [[] for _ in prompts]
        done = [False] * len(prompts)
        for _ in range(max_new_tokens):
            nxt = sample(logits, temperature, top_k, top_p, gen)
            for b, token in enumerate(nxt.tolist()):
                if not done[b]:
                    out[b].append(token)
                    done[b] = stop_at_eod and token == self.eod_id
            if all(done):
                break
            logits = self.model.forward_cached(nxt.to(device)[:, None], cache)[:, -1]
        return out

    def complete(self, context: str, max_new_tokens: int = 64, stop: list[str] | None = None) -> str:
        """Greedy continuation of ``context``, cut before the first ``stop`` string."""
        ids = self.generate_ids([self.encode(context) or [self.eod_id]], max_new_tokens)[0]
        if ids and ids[-1] == self.eod_id:
            ids = ids[:-1]
        text = self.decode(ids)
        for s in stop or []:
            if s and s in text:
                text = text[: text.index(s)]
        return text


class HFGenerator:
    """The same interface over a Hugging Face model (its own ``generate``)."""

    def __init__(self, model, tokenizer):
        self.model, self.tok = model, tokenizer
        self.eod_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @torch.no_grad()
    def generate_ids(self, prompts: list[list[int]], max_new_tokens: int = 32, temperature: float = 0.0,
                     top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop_at_eod: bool = True) -> list[list[int]]:
        cfg = self.model.config
        limit = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
        longest = max(len(p) for p in prompts) + max_new_tokens
        if limit and longest > limit:
            raise UserError(f"prompt + --max-new-tokens = {longest} tokens exceeds the model's {limit} positions; "
                            "shorten the prompt or generate fewer tokens")
        out = []
        for prompt in prompts:  # one at a time: no padding conventions to get wrong
            if seed is not None:
                torch.manual_seed(seed)
            kwargs = {"do_sample": temperature > 0, "max_new_tokens": max_new_tokens, "pad_token_id": self.eod_id}
            if temperature > 0:
                kwargs.update(temperature=temperature, top_k=top_k or None, top_p=top_p)
            if not stop_at_eod:
                kwargs["eos_token_id"] = None
            ids = self.model.generate(torch.tensor([prompt], device=self.model.device), **kwargs)
            ids = ids[0, len(prompt):].tolist()
            out.append(ids)
        return out

    def complete(self, context: str, max_new_tokens: int = 64, stop: list[str] | None = None) -> str:
        return Generator.complete(self, context, max_new_tokens, stop)  # type: ignore[arg-type]
