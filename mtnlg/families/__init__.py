"""The model families mtnlg knows, declared without torch: the one place a family is registered.

A family (GPT today; BERT and T5 next) is a set of architectures (``model.architecture`` values) that share one
model definition. Its *declaration* lives here, next to the run config that reads it: its architectures and the
knob defaults each one sets, the checks its config must pass (run by ``mtnlg.config.resolve``), and the module
that implements it. The implementation (``mtnlg.model.<family>``: layer specs, pipeline-free model, loss, micro
batches, tied weights; reached through ``mtnlg.model.registry``) and its Hugging Face adapters
(``mtnlg.convert.hf.<model_type>``) are the family's own files. Nothing else in mtnlg names a family's classes.

Adding a family: write ``mtnlg/families/<name>.py`` (a ``FAMILY = Declaration(...)``), its implementation module
and adapters, and add the declaration to ``REGISTERED`` below (docs/architecture.md walks through it).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from mtnlg.families import bert, gpt, t5


@dataclass(frozen=True)
class Declaration:
    name: str  # "gpt"
    architectures: dict[str, dict[str, Any]]  # model.architecture -> the knob defaults it sets
    implementation: str  # the module whose FAMILY (a mtnlg.model.registry.Family) implements it
    # checks of a model config with the family's defaults filled in: (model config, parallel config) -> None,
    # raising mtnlg.config.ConfigError (or ValueError, which config turns into one) with one line
    checks: tuple[Callable[[Any, Any], None], ...] = field(default=())
    # the model keys only this family has: a frozen dataclass (its fields are keys of the YAML's ``model:``
    # section; read as ``model.family_knobs.<key>``), or None
    knobs: type | None = None


# the one registration of each family
REGISTERED: tuple[Declaration, ...] = (
    Declaration("gpt", gpt.ARCHITECTURES, "mtnlg.model.gpt", gpt.CHECKS),
    Declaration("bert", bert.ARCHITECTURES, "mtnlg.model.bert", bert.CHECKS, bert.BertKnobs),
    Declaration("t5", t5.ARCHITECTURES, "mtnlg.model.t5", t5.CHECKS, t5.T5Knobs),
)


def architectures() -> list[str]:
    """Every ``model.architecture`` value, in registration order."""
    return [a for d in REGISTERED for a in d.architectures]


def declaration(architecture: str) -> Declaration:
    """The family that owns ``architecture`` (a KeyError for an unknown one: configs are checked on load)."""
    for d in REGISTERED:
        if architecture in d.architectures:
            return d
    raise KeyError(architecture)
