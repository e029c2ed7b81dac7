"""``mtnlg evaluate --task TASK --checkpoint CKPT | --hf DIR --data PATH --output FILE``: score a fine-tuned BERT
model on a task's file in one process. The output holds the metrics and every example's prediction (with its gold
label or answers), written atomically.

A native checkpoint (any layout) is merged into one process; its head must be the task's (``model.head``), its
classification labels come from the run's ``task_results.json`` (or the task's fixed ones, or ``--labels``). A
Hugging Face directory is read by the Auto class of the task's head (``...ForSequenceClassification``,
``...ForMultipleChoice``, ``...ForQuestionAnswering``) with the tokenizer saved beside it.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mtnlg.errors import UserError
from mtnlg.files import write_atomic
from mtnlg.tasks.data import load_task_data
from mtnlg.tasks.registry import get_task
from mtnlg.tasks.scoring import score

RESULTS = "task_results.json"  # written by `mtnlg finetune` beside its checkpoints
HF_CLASSES = {"classify": "AutoModelForSequenceClassification", "multiple_choice": "AutoModelForMultipleChoice",
              "span": "AutoModelForQuestionAnswering"}


def _labels_of_run(directory: Path) -> list[str] | None:
    path = directory / RESULTS
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text()).get("labels")
    except (OSError, ValueError):
        return None


class NativeTaskModel:
    """A fine-tuned mtnlg checkpoint at tp = 1, pp = 1: inputs -> the head's logits."""

    def __init__(self, path: str, task_name: str, iteration: int | None, device: str):
        from mtnlg.checkpoint.reader import load_native_model, open_checkpoint
        from mtnlg.data.tokenizer import load_tokenizer
        from mtnlg.model.registry import family

        task = get_task(task_name)
        ckpt = open_checkpoint(path, iteration)
        cfg = ckpt.model_cfg
        head = getattr(cfg.family_knobs, "head", None)
        if head is None or family(cfg).causal_lm:
            raise UserError(f"{path} holds a {cfg.architecture} model ({family(cfg).name} family); --task {task_name} "
                            "scores a fine-tuned BERT model (mtnlg finetune)")
        if head != task.kind:
            raise UserError(f"{path} has the {head!r} head but --task {task_name} needs {task.kind!r}; fine-tune it "
                            f"first: mtnlg finetune --task {task_name} --pretrained {path} ...")
        if ckpt.tokenizer_dir is None:
            raise UserError(f"{path} has no tokenizer/ directory; the task's text needs the model's tokenizer")
        self.tokenizer = load_tokenizer(str(ckpt.tokenizer_dir))
        self.module, _, _ = load_native_model(path, iteration)
        self.module.to(device)
        self.seq_length = cfg.seq_length
        self.num_classes = cfg.family_knobs.num_classes
        self.labels = _labels_of_run(Path(path))
        self.device = device

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, types: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        dev = self.device
        return self.module((tokens.to(dev), types.to(dev), padding.to(dev))).float().cpu()


class HFTaskModel:
    """A Hugging Face directory with a task head (e.g. from ``mtnlg export-hf``) and its tokenizer."""

    def __init__(self, path: str, task_name: str, device: str):
        import transformers

        from mtnlg.data.tokenizer import load_tokenizer

        task = get_task(task_name)
        if not (Path(path) / "config.json").is_file():
            raise UserError(f"--hf {path} has no config.json; give a Hugging Face model directory")
        try:
            self.model = getattr(transformers, HF_CLASSES[task.kind]).from_pretrained(path).to(device).eval()
        except (ValueError, OSError, KeyError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise UserError(f"--hf {path} does not load as a {HF_CLASSES[task.kind]} ({first})") from None
        self.tokenizer = load_tokenizer(path)
        c = self.model.config
        self.seq_length = c.max_position_embeddings
        self.num_classes = c.num_labels
        names = [c.id2label[i] for i in range(c.num_labels)] if task.kind == "classify" else None
        self.labels = names if names and not all(n == f"LABEL_{i}" for i, n in enumerate(names)) else None
        self.device = device

    @torch.no_grad()
    def logits(self, tokens: torch.Tensor, types: torch.Tensor, padding: torch.Tensor) -> torch.Tensor:
        dev = self.device
        out = self.model(input_ids=tokens.to(dev), token_type_ids=types.to(dev), attention_mask=padding.to(dev))
        if hasattr(out, "start_logits"):
            return torch.stack([out.start_logits, out.end_logits], -1).float().cpu()
        return out.logits.float().cpu()


def evaluate_task(task_name: str, data: str, output: str | None, checkpoint: str | None = None,
                  hf: str | None = None, iteration: int | None = None, device: str = "cpu", batch_size: int = 16,
                  labels: Sequence[str] | None = None, seq_length: int | None = None,
                  doc_stride: int = 128) -> dict[str, Any]:
    """Score a fine-tuned model on ``data``; writes ``output`` (metrics + predictions) and returns it."""
    task = get_task(task_name)
    if (checkpoint is None) == (hf is None):
        raise UserError("give exactly one of --checkpoint DIR (an mtnlg checkpoint) or --hf DIR (a Hugging Face model)")
    if output is not None and Path(output).is_dir():
        raise UserError(f"--output {output} is a directory; name the results file")
    model = NativeTaskModel(checkpoint, task_name, iteration, device) if checkpoint else \
        HFTaskModel(hf, task_name, device)
    if task.kind == "classify":
        labels = list(labels or task.labels or model.labels or [])
        if not labels:
            raise UserError(f"--task {task_name} takes its labels from the training data; give --labels "
                            "NAME,NAME,... in class order (task_results.json of the fine-tuning run lists them)")
        if len(labels) != model.num_classes:
            raise UserError(f"{len(labels)} labels ({', '.join(labels)}) but the model has {model.num_classes} "
                            "classes; give the labels it was fine-tuned with")
    t0 = time.time()
    task_data = load_task_data(task_name, None, [data], model.tokenizer, seq_length or model.seq_length, doc_stride,
                               labels=labels if task.kind == "classify" else None)
    valid = task_data.valid[0]
    f = valid.features
    rows = []
    for start in range(0, len(f["tokens"]), batch_size):
        part = [torch.from_numpy(f[k][start:start + batch_size]) for k in ("tokens", "types", "padding_mask")]
        rows.append(model.logits(*part).numpy())
    logits = np.concatenate(rows)
    metrics, predictions = score(task, valid.examples, f, logits, task_data.labels)
    results = {"task": task_name, "data": str(data), "model": checkpoint or hf, "labels": task_data.labels and
               list(task_data.labels), "metrics": metrics, "seconds": round(time.time() - t0, 2),
               "predictions": predictions}
    if output is not None:
        write_atomic(output, json.dumps(results, indent=1) + "\n")
    return results
