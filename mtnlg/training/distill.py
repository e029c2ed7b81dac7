"""Knowledge distillation: a frozen teacher's logits in the student's loss.

    distill: {teacher: runs/teacher, temperature: 2.0, alpha: 0.5}

    loss = alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)) + (1 - alpha) * LM loss

both terms averaged over the tokens whose label counts (label != -100), per micro batch as the GPT loss does. The
KL term is scaled by T^2 (Hinton et al. 2015) so that its gradient, which carries a 1/T, keeps the size of the LM
loss's as T changes; at T = 1 the scale is 1.

Where the teacher runs: the student's loss is computed on the last pipeline stage, from the logits and the labels
the pipeline engine hands it. The teacher is one pipeline-free model (all of its layers, its tensor-parallel shard
over the student's tp group) built only on the last stage's ranks, and runs there on the same micro batch, under
``no_grad``, just before the loss. Its logits are this rank's vocabulary slice, the same slice as the student's
(same tokenizer, same padded vocabulary, same tp group), so the KL is computed vocab-parallel
(``mtnlg.parallel.kl_divergence``) and full logits are never gathered. The last stage needs the token ids for it:
with distillation on, every micro batch's labels travel as the pair (input_ids, labels) (``with_inputs``), which
DeepSpeed's pipeline engine loads on the last stage as it loads the labels. The other stages hold nothing of the
teacher. The price is the teacher's weights / tp on each last-stage rank and its forward time on that stage (a
teacher pipeline matched stage by stage to the student would spread both, at the cost of a second set of
activations to send between stages).

The teacher comes from an mtnlg checkpoint of any layout (or an ``mtnlg import-hf`` output): each last-stage rank
reads its tp shard of every parameter (``mtnlg.checkpoint.reader``), in the student's precision. It is never
given to DeepSpeed: no gradients, no optimizer states, not in the student's checkpoints.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from mtnlg.checkpoint.reader import NativeCheckpoint, open_checkpoint, resolve_model
from mtnlg.config import DistillConfig, ModelConfig
from mtnlg.errors import JobError, UserError
from mtnlg.parallel import ParallelDims, ParallelState
from mtnlg.parallel.cross_entropy import vocab_parallel_cross_entropy
from mtnlg.parallel.kl_divergence import vocab_parallel_kl_divergence

GB = 2**30


def open_teacher(d: DistillConfig) -> NativeCheckpoint:
    """The teacher's checkpoint; a missing or unreadable one is a one-line error on every rank."""
    if Path(d.teacher).is_file():
        raise JobError(f"distill.teacher = {d.teacher} is a file; name the teacher's checkpoint directory (its "
                       "checkpoint.save, or the output of `mtnlg import-hf`)")
    if (Path(d.teacher) / "config.json").is_file() and not (Path(d.teacher) / "latest").is_file():
        raise JobError(f"distill.teacher {d.teacher} is a Hugging Face model directory; convert it once with "
                       f"`mtnlg import-hf --model {d.teacher} --output DIR` and set distill.teacher=DIR")
    try:
        return open_checkpoint(d.teacher)
    except JobError:
        raise
    except UserError as e:  # from the reader: the same on every rank, so printed once
        raise JobError(f"distill.teacher: {e}") from None


def teacher_config(ckpt: NativeCheckpoint, student: ModelConfig, tp: int) -> ModelConfig:
    """The teacher's model config for running beside ``student`` (resolved) at tensor size ``tp``: its own shapes,
    the student's vocabulary padding and sequence length, no dropout, no recompute (it runs under no_grad)."""
    have = ckpt.model_cfg
    if have.vocab_size != student.vocab_size:
        raise JobError(f"distill.teacher {ckpt.root} has vocab_size {have.vocab_size} but the student has "
                       f"{student.vocab_size}; distillation needs the same tokenizer for teacher and student")
    if have.position_embedding == "learned" and student.seq_length > have.max_position_embeddings:
        raise JobError(f"distill.teacher {ckpt.root} has {have.max_position_embeddings} learned positions, fewer "
                       f"than the student's seq_length {student.seq_length}; shorten model.seq_length")
    run = ckpt.run_config
    model = dataclasses.replace(
        run.model, make_vocab_size_divisible_by=student.make_vocab_size_divisible_by,
        seq_length=student.seq_length, max_position_embeddings=have.max_position_embeddings,
        recompute="none", activation_checkpointing=None, hidden_dropout=0.0, attention_dropout=0.0)
    cfg = resolve_model(dataclasses.replace(run, model=model, distill=None), tp, 1, ckpt.tag_dir)
    if cfg.padded_vocab_size != student.padded_vocab_size:  # a bug: same vocab, same padding rule, same tp
        raise RuntimeError(f"teacher padded vocab {cfg.padded_vocab_size} != student's {student.padded_vocab_size}")
    return cfg


def tensor_only(ps: ParallelState) -> ParallelState:
    """A view of ``ps`` with its tp group only (pp = dp = 1): the teacher's layout on one pipeline stage."""
    return ParallelState(ParallelDims(tp=ps.tp_size), ps.tp_rank, {"tp": ps.tp_group})


def load_teacher(ckpt: NativeCheckpoint, cfg: ModelConfig, ps: ParallelState, device: torch.device,
                 dtype: torch.dtype) -> torch.nn.Module:
    """The frozen teacher on this rank: the family's pipeline-free model over ``ps``'s tp group holding this rank's
    tp shard of every parameter, in ``dtype``, in eval mode."""
    from mtnlg.checkpoint.loader import load_model

    return load_model(ckpt, cfg, tensor_only(ps), device, dtype).requires_grad_(False)


class DistillLoss:
    """The student's loss with a teacher: ``(logits, (input_ids, labels))`` -> alpha * T^2 * KL + (1 - alpha) * LM.
    Given plain ``labels`` (validation) it is the LM loss alone, so validation losses stay comparable with a run
    without distillation. A plain object, not a module: the teacher must stay outside the student's parameters."""

    def __init__(self, teacher: torch.nn.Module, tp_group, vocab_size: int, temperature: float, alpha: float,
                 ignore_index: int = -100):
        self._teacher = [teacher]  # a list: nothing may register it as a submodule of the student
        self.tp_group, self.vocab_size, self.ignore_index = tp_group, vocab_size, ignore_index
        self.temperature, self.alpha = temperature, alpha
        self.terms: list[torch.Tensor] = []  # (KL, LM) of each training micro batch since ``take_terms``

    @property
    def teacher(self) -> torch.nn.Module:
        return self._teacher[0]

    def __call__(self, logits: torch.Tensor, labels) -> torch.Tensor:
        ids = None
        if isinstance(labels, (tuple, list)):
            ids, labels = labels
        counted = labels != self.ignore_index
        count = counted.sum().clamp(min=1)
        lm = vocab_parallel_cross_entropy(logits, labels, self.tp_group, self.vocab_size, self.ignore_index)
        lm = lm.sum() / count
        if ids is None or self.alpha == 0.0:
            return lm
        with torch.no_grad():
            teacher_logits = self.teacher.hidden_and_logits(ids)  # (B, T, V_padded / tp), this rank's slice
        kl = vocab_parallel_kl_divergence(logits, teacher_logits, self.tp_group, self.vocab_size, self.temperature)
        kl = (kl * counted).sum() / count
        self.terms.append(torch.stack([kl.detach().float(), lm.detach().float()]))
        return self.alpha * self.temperature**2 * kl + (1.0 - self.alpha) * lm

    def take_terms(self) -> torch.Tensor:
        """(sum of KL, sum of LM, micro batches) since the last call, on this rank; then forgets them."""
        device = self.terms[0].device if self.terms else torch.device("cpu")
        out = torch.zeros(3, device=device)
        if self.terms:
            out[:2] = torch.stack(self.terms).sum(0)
            out[2] = len(self.terms)
        self.terms = []
        return out


def with_inputs(batches: list) -> list:
    """Micro batches whose labels carry the input ids, ``(ids, (ids, labels))``: what the last stage needs to run
    the teacher."""
    return [(ids, (ids, labels)) for ids, labels in batches]


def attach_teacher(module: torch.nn.Module, d: DistillConfig, student: ModelConfig, ps: ParallelState,
                   device: torch.device, dtype: torch.dtype) -> DistillLoss | None:
    """Replace the student's loss with a ``DistillLoss`` on the ranks that compute it (the last pipeline stage);
    returns it there, None on other stages. ``module``: a pipeline-free model or DeepSpeed PipelineModule (both call
    ``module.loss_fn``)."""
    ckpt = open_teacher(d)
    cfg = teacher_config(ckpt, student, ps.tp_size)  # checked on every rank: every rank fails alike
    if not ps.is_last_stage:
        return None
    teacher = load_teacher(ckpt, cfg, ps, device, dtype)
    module.loss_fn = DistillLoss(teacher, ps.tp_group, student.vocab_size, d.temperature, d.alpha)
    return module.loss_fn


# --------------------------------------------------------------------------- memory


@dataclass
class TeacherMemory:
    """Predicted bytes of the teacher on one rank of the last pipeline stage."""

    params: int  # the teacher's parameters on the rank (its tp shard of the whole model)
    weights: float  # in the student's precision; no gradients, no optimizer states
    logits: float  # working set: its logits (B, T, V/tp), kept for the KL's backward, plus two fp32 chunks

    @property
    def total(self) -> float:
        return self.weights + self.logits


def teacher_memory(teacher: ModelConfig, micro: int, tp: int, precision: str, device: str = "cpu") -> TeacherMemory:
    """``teacher``: resolved at tensor size ``tp`` (``teacher_config``)."""
    from mtnlg.model.layout import groups
    from mtnlg.parallel.cross_entropy import CHUNK_ELEMENTS_CPU, CHUNK_ELEMENTS_DEVICE

    e = 4 if precision == "fp32" else 2
    V = teacher.padded_vocab_size
    params = sum(math.prod(sh.local_shape(tp, V)) for g in groups(teacher) for _, sh in g.params)
    logits = teacher.seq_length * micro * V / tp
    chunk = min(logits, CHUNK_ELEMENTS_CPU if device == "cpu" else CHUNK_ELEMENTS_DEVICE)
    return TeacherMemory(params, float(e * params), e * logits + 2 * 4.0 * chunk)


def format_teacher_memory(m: TeacherMemory, teacher: ModelConfig, last_stage_total: float) -> str:
    """The lines ``mtnlg model-info`` adds under its table when the config distills."""
    return (f"distillation teacher ({teacher.num_layers} layers, hidden {teacher.hidden_size}; frozen, on each rank of "
            f"the last pipeline stage): {m.params / 1e6:.1f}M params/rank, weights {m.weights / GB:.3f} GiB (no "
            f"gradients or optimizer states), logits working set {m.logits / GB:.3f} GiB; last stage total with the "
            f"teacher {(last_stage_total + m.total) / GB:.3f} GiB")
