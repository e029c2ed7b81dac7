"""Periodic downstream evaluation inside a training run: lm-evaluation-harness over the live model.

Every rank scores (the model is sharded over tp and pp); global rank 0 reports. Needs a
tokenizer (text tasks) and the ``eval`` extra (lm-eval).
"""

from __future__ import annotations

from typing import Any

from mtnlg.errors import UserError


def downstream_eval(engine, cfg, tokenizer) -> dict[str, float]:
    """{"<task>/<metric>": value} for the run's ``eval.tasks`` on the model as it is now."""
    try:
        import lm_eval
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise UserError("eval.tasks needs lm-evaluation-harness: pip install 'mtnlg[eval]'") from None
    if tokenizer is None:
        raise UserError("eval.tasks needs a tokenizer (text data); synthetic runs have none")
    from mtnlg.eval.lm_eval_model import MtnlgLM
    from mtnlg.eval.native import NativeScorer

    module = engine.engine.module
    was_training = module.training
    module.eval()
    try:
        scorer = NativeScorer(module, cfg.model, engine.ps, tokenizer.encode, engine.device)
        model = MtnlgLM(scorer=scorer, eod_id=tokenizer.eod_id)
        manager = TaskManager(include_path=cfg.eval.include_path) if cfg.eval.include_path else TaskManager()
        out: dict[str, Any] = lm_eval.simple_evaluate(model=model, tasks=list(cfg.eval.tasks), task_manager=manager,
                                                      limit=cfg.eval.limit, log_samples=False)
    finally:
        module.train(was_training)
    flat = {}
    for task, metrics in (out or {}).get("results", {}).items():
        for key, value in metrics.items():
            if isinstance(value, (int, float)) and not key.startswith("alias") and "stderr" not in key:
                flat[f"{task}/{key.split(',')[0]}"] = float(value)
    return flat
