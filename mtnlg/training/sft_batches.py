"""Fine-tuning batches: the loss averaged over the tokens in the loss of the whole global batch.

A micro batch is ``((input_ids, segment_ids), (labels, weights))`` (the GPT family's model and loss take both pairs).
With M micro batches per rank and dp data-parallel ranks, N tokens in the loss over all of them, every token in
the loss weighs ``M * dp / N``: DeepSpeed divides each micro batch's loss by M (gradient accumulation) and
averages gradients over dp, so the gradient is that of ``sum(token losses) / N`` over the global batch, and the
reported loss (the mean over micro batches and ranks) is that mean too. A mean of per-micro-batch means would
weigh a token of a short micro batch more than one of a long one.
"""

from __future__ import annotations

import numpy as np
import torch

from mtnlg.config import RunConfig, parse_split
from mtnlg.errors import JobError, UserError

MicroBatch = tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def sft_micro_batches(source, start: int, mbs: int, dp_rank: int, dp: int, device: torch.device,
                      count: int) -> list[MicroBatch]:
    """This dp rank's ``count`` micro batches of the samples [start, start + count * mbs * dp) of ``source``."""
    total = sum(source.loss_tokens(i) for i in range(start, start + count * mbs * dp))
    scale = count * dp / max(total, 1)
    out = []
    for m in range(count):
        first = start + m * mbs * dp + dp_rank * mbs
        samples = [source[i] for i in range(first, first + mbs)]
        ids, seg, labels, mask = (torch.from_numpy(np.stack([getattr(s, k) for s in samples])).to(device)
                                  for k in ("input_ids", "segment_ids", "labels", "loss_mask"))
        out.append(((ids, seg), (labels, mask.float() * scale)))
    return out


def sft_sources(cfg: RunConfig):
    """(train, valid) fine-tuning datasets of a resolved config, split by examples (``data.split``)."""
    from mtnlg.data.sft import load_sft
    from mtnlg.data.sft_dataset import SFTDataset
    from mtnlg.training.sources import data_tokenizer

    d, t, m = cfg.data, cfg.train, cfg.model
    n = len(load_sft(d.sft.prefix)[0])
    fractions = parse_split(d.split)
    n_train = int(round(fractions[0] * n))
    n_valid = int(round(fractions[1] * n))
    if n_train == 0:
        raise UserError(f"data.split = {d.split!r} leaves none of the {n} examples of {d.sft.prefix} for training")
    _check_responses_fit(d.sft.prefix, n_train, m.seq_length)
    pad = data_tokenizer(cfg).eod_id
    train = SFTDataset(d.sft.prefix, m.seq_length, t.seed, d.sft.packing, t.iters * t.global_batch_size,
                       range(0, n_train), pad)
    valid = None
    if t.eval_interval and t.eval_iters and n_valid:
        valid = SFTDataset(d.sft.prefix, m.seq_length, t.seed + 1, d.sft.packing, t.eval_iters * t.global_batch_size,
                           range(n_train, n_train + n_valid), pad)
    return train, valid


def _check_responses_fit(prefix: str, n_train: int, seq_length: int) -> None:
    """Training examples whose response starts past ``seq_length`` are cut before their first loss token and
    train on nothing: refuse when that is all of them, say how many when it is some."""
    import torch.distributed as dist

    from mtnlg.data.sft import load_sft

    _, mask = load_sft(prefix)
    empty = sum(1 for i in range(n_train) if not mask.get(i, 1, min(int(mask.sizes[i]) - 1, seq_length)).any())
    if empty == n_train:
        raise JobError(f"none of the {n_train} training examples of {prefix} has a response token within "
                       f"model.seq_length = {seq_length}, so training would learn nothing; raise model.seq_length "
                       "or shorten the prompts")
    if empty and (not dist.is_initialized() or dist.get_rank() == 0):
        print(f"data.sft: {empty} of {n_train} training examples of {prefix} have no response token within "
              f"model.seq_length = {seq_length} and train on nothing; raise model.seq_length or shorten their "
              "prompts", flush=True)
