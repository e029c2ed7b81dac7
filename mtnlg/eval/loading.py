"""Open a model for evaluation or generation: a native checkpoint (in its own layout under a
launcher, or merged in one process) or a Hugging Face directory."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from mtnlg.errors import UserError


@dataclass
class OpenedModel:
    scorer: Any  # TorchScorer / NativeScorer
    generator: Any  # Generator / HFGenerator, or None (a pipeline layout cannot decode incrementally)
    eod_id: int
    decode: Any
    rank: int = 0  # global rank: only rank 0 reports


def default_device() -> str:
    """This machine's accelerator (``cuda``, ``xpu``, ...) when torch sees one, else ``cpu``."""
    return str(torch.accelerator.current_accelerator()) if torch.accelerator.is_available() else "cpu"


def launched() -> bool:
    """True under a launcher with more than one rank (deepspeed, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def open_model(checkpoint: str | None = None, hf: str | None = None, iteration: int | None = None,
               device: str | torch.device = "cpu", batch_size: int = 8, for_generation: bool = False) -> OpenedModel:
    if (checkpoint is None) == (hf is None):
        raise UserError("give exactly one of --checkpoint DIR (an mtnlg checkpoint) or --hf DIR (a Hugging Face model)")
    device = torch.device(device)
    if hf is not None:
        from mtnlg.eval.generate import HFGenerator
        from mtnlg.eval.scorer import hf_scorer, load_hf

        model, tok = load_hf(hf, device=str(device))
        if model.config.is_encoder_decoder:  # T5: generation only (prompt to the encoder, answer from the decoder)
            from mtnlg.eval.seq2seq import HFSeq2SeqGenerator

            if not for_generation:
                raise UserError(f"{hf} is an encoder-decoder model ({model.config.model_type}); these tasks score "
                                "causal language models (generate and --task generate-match take it)")
            gen = HFSeq2SeqGenerator(model, tok)
            return OpenedModel(None, gen, gen.eod_id, tok.decode)
        scorer = hf_scorer(model, tok, device=str(device), batch_size=batch_size)
        return OpenedModel(scorer, HFGenerator(model, tok), tok.eos_token_id, tok.decode)
    return _open_native(checkpoint, iteration, device, batch_size, for_generation)


def hf_as_checkpoint(hf: str, output: str) -> str:
    """Import the Hugging Face directory ``hf`` as a native checkpoint at ``output`` (``mtnlg import-hf``), for
    code that runs native checkpoints only (the server's batched engine); unsupported models are refused there."""
    from mtnlg.convert.hf_import import import_hf

    return str(import_hf(hf, output))


def _open_native(checkpoint: str, iteration: int | None, device: torch.device, batch_size: int,
                 for_generation: bool) -> OpenedModel:
    import torch.distributed as dist

    from mtnlg.checkpoint.reader import open_checkpoint
    from mtnlg.data.tokenizer import load_tokenizer
    from mtnlg.eval.generate import Generator
    from mtnlg.eval.native import NativeScorer, build_model
    from mtnlg.model.registry import family
    from mtnlg.parallel import ParallelState

    ckpt = open_checkpoint(checkpoint, iteration)
    fam = family(ckpt.model_cfg)
    seq2seq = not fam.causal_lm and callable(getattr(fam.model, "generate", None))  # T5: prompt -> answer
    if not fam.causal_lm and not (seq2seq and for_generation):
        raise UserError(f"{checkpoint} holds a {ckpt.model_cfg.architecture} model ({fam.name} family), which does not "
                        "generate text left to right; these tasks score causal language models")
    if ckpt.tokenizer_dir is None:
        raise UserError(f"{checkpoint} has no tokenizer/ directory (a run on synthetic data?); text tasks need one")
    tok = load_tokenizer(str(ckpt.tokenizer_dir))
    if launched():
        from mtnlg.parallel.distributed import init_distributed

        device = init_distributed()
        world = dist.get_world_size()
        tp, pp = (world, 1) if for_generation else (ckpt.layout.tp, ckpt.layout.pp)
        if world % (tp * pp):
            raise UserError(f"{checkpoint} was trained with tensor={tp} x pipeline={pp}; launch a multiple of "
                            f"{tp * pp} ranks (got {world}), or run in one process")
        ps = ParallelState.create(tp, pp)
    else:
        ps = ParallelState.single()
    module, cfg, _ = build_model(checkpoint, iteration, ps, device)
    if seq2seq:
        from mtnlg.eval.seq2seq import Seq2SeqGenerator

        if tok.pad_id is None:
            raise UserError(f"the tokenizer of {checkpoint} has no pad token (the decoder start token); add <pad>")
        return OpenedModel(None, Seq2SeqGenerator(module, tok.encode, tok.decode, tok.eod_id, tok.pad_id),
                           tok.eod_id, tok.decode, ps.rank)
    scorer = NativeScorer(module, cfg, ps, tok.encode, device, batch_size)
    generator = None
    if ps.pp_size == 1:
        positions = cfg.max_position_embeddings if cfg.position_embedding == "learned" else 1 << 30
        generator = Generator(module, tok.encode, tok.decode, tok.eod_id, positions)
    return OpenedModel(scorer, generator, tok.eod_id, tok.decode, ps.rank)
