"""Contracts of the source tree, checked with ``ast`` (no imports): a model family is reached through the registry,
DeepSpeed is imported by a known few modules, its private state is read only in ``mtnlg/deepspeed_compat.py``, and
its checkpoint file names and state keys are spelled only in ``mtnlg/checkpoint/ds_files.py``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from mtnlg import families

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "mtnlg"

# The only modules that import deepspeed (each for a stated reason).
DEEPSPEED_IMPORTERS = {
    "mtnlg/deepspeed_compat.py": "every workaround of and reach into DeepSpeed",
    "mtnlg/training/engine.py": "deepspeed.initialize, zero.Init",
    "mtnlg/model/gpt.py": "LayerSpec / TiedLayerSpec: the pipeline's model definition",
    "mtnlg/model/bert.py": "LayerSpec / TiedLayerSpec: the pipeline's model definition",
    "mtnlg/model/t5.py": "LayerSpec / TiedLayerSpec: the pipeline's model definition",
    "mtnlg/model/stages.py": "TiedLayerSpec: layer specs built into one module as PipelineModule builds them",
    "mtnlg/parallel/state.py": "PipeModelDataParallelTopology: the rank grid DeepSpeed's pipeline engine uses",
    "mtnlg/parallel/distributed.py": "init_distributed, its accelerator and logger",
    "mtnlg/checkpoint/reader.py": "the classes torch.load must allow in DeepSpeed's files (weights_only)",
    "mtnlg/checkpoint/writer.py": "deepspeed.__version__ in the files it writes",
    "mtnlg/bench/setups.py": "the HF + DeepSpeed peer of the benchmark",
    "mtnlg/bench/runner.py": "the benchmark's DeepSpeed launch",
}
# DeepSpeed's private attributes (and ZeRO-3's per-parameter ones): read only in deepspeed_compat.py
DEEPSPEED_PRIVATE = {"_hp_mapping", "_get_optimizer_loss_scale", "_INSTRUCTION_MAP", "pipe_buffers", "bf16_groups",
                     "fp32_groups_gradients", "refresh_fp32_params", "ds_tensor", "ds_numel", "ds_persist", "ds_id",
                     "ds_status", "ds_shape", "safe_set_full_fp32_param", "GatheredParameters"}
# Pieces of DeepSpeed's checkpoint file names and state keys: spelled only in ds_files.py (and deepspeed_compat.py)
DEEPSPEED_FILE_WORDS = ("model_states.pt", "optim_states.pt", "zero_pp_rank", "fp32_flat_groups",
                        "optimizer_state_dict", "single_partition_of_fp32_groups", "param_slice_mappings",
                        "checkpoint_parallel_dimensions", "param_shapes")
FILE_WORD_HOMES = {"mtnlg/checkpoint/ds_files.py", "mtnlg/deepspeed_compat.py"}


def sources(root: Path = PACKAGE) -> dict[str, ast.Module]:
    return {str(p.relative_to(root.parent)): ast.parse(p.read_text(), str(p)) for p in sorted(root.rglob("*.py"))}


def family_files(name: str, implementation: str) -> set[str]:
    """A family's own files, by name: its declaration, its implementation module and the modules named after it
    beside that (``mtnlg/model/gpt.py``, ``mtnlg/model/gpt_memory.py``), and its HF adapters."""
    impl = Path(*implementation.split("."))
    out = {f"mtnlg/families/{name}.py", f"{impl}.py"}
    out |= {str(p.relative_to(ROOT)) for p in (ROOT / impl.parent).glob(f"{impl.name}_*.py")}
    return out


def family_data(implementation: str) -> set[str]:
    """A family's data modules, by name (``mtnlg/data/t5_dataset.py``, ``mtnlg/data/t5_span_corruption.py``): they
    may read their family's declaration (e.g. T5's span lengths); what they define is not the family's (GPT's
    ``gpt_dataset`` is every family's index, split and blend machinery)."""
    name = implementation.rsplit(".", 1)[-1]
    return {str(p.relative_to(ROOT)) for p in (ROOT / "mtnlg" / "data").glob(f"{name}_*.py")}


def family_classes(trees: dict[str, ast.Module], files: set[str]) -> set[str]:
    return {node.name for f in files if f in trees for node in ast.walk(trees[f]) if isinstance(node, ast.ClassDef)}


def names_used(tree: ast.Module) -> list[tuple[str, int]]:
    """Names a module refers to: bare names, imported names, and imported modules."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Name):
            out.append((node.id, node.lineno))
        elif isinstance(node, ast.ImportFrom):
            out += [(a.name, node.lineno) for a in node.names]
            out.append((node.module or "", node.lineno))
        elif isinstance(node, ast.Import):
            out += [(a.name, node.lineno) for a in node.names]
    return out


def family_violations(trees: dict[str, ast.Module]) -> list[str]:
    """Modules outside a family's files that name its classes or import its implementation modules. The shared
    ``TransformerBlock`` (``mtnlg/model/blocks.py``) counts as every family's (each family's files may use it);
    ``mtnlg/model/__init__.py`` re-exports the Python API's ``GPTModel``."""
    out = []
    real = sources()
    every_familys = set().union(*(family_files(d.name, d.implementation) for d in families.REGISTERED))
    for d in families.REGISTERED:
        files = family_files(d.name, d.implementation)
        classes = family_classes(real, files) | {"TransformerBlock"}
        modules = {d.implementation} | {f[:-3].replace("/", ".") for f in files}
        allowed = files | family_data(d.implementation) | {"mtnlg/model/blocks.py", "mtnlg/model/__init__.py"}
        for path, tree in trees.items():
            if path in allowed:
                continue
            for name, line in names_used(tree):
                if name == "TransformerBlock" and path in every_familys:
                    continue
                if name in classes or name in modules:
                    out.append(f"{path}:{line} names {name} (family {d.name})")
    return out


def deepspeed_violations(trees: dict[str, ast.Module]) -> list[str]:
    out = []
    for path, tree in trees.items():
        for node in ast.walk(tree):
            mods = []
            if isinstance(node, ast.Import):
                mods = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                mods = [node.module or ""]
            if any(m == "deepspeed" or m.startswith("deepspeed.") for m in mods) and path not in DEEPSPEED_IMPORTERS:
                out.append(f"{path}:{node.lineno} imports deepspeed")
            if path == "mtnlg/deepspeed_compat.py":
                continue
            if isinstance(node, ast.Attribute) and node.attr in DEEPSPEED_PRIVATE:
                out.append(f"{path}:{node.lineno} reads DeepSpeed's {node.attr}")
            if isinstance(node, (ast.Name, ast.alias)) and getattr(node, "id", getattr(node, "name", "")) in \
                    DEEPSPEED_PRIVATE:
                out.append(f"{path}:{getattr(node, 'lineno', '?')} uses DeepSpeed's "
                           f"{getattr(node, 'id', getattr(node, 'name', ''))}")
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and path not in FILE_WORD_HOMES \
                    and any(w in node.value for w in DEEPSPEED_FILE_WORDS) and not _is_docstring(tree, node):
                out.append(f"{path}:{node.lineno} spells a DeepSpeed checkpoint name ({node.value[:40]!r})")
    return out


def _is_docstring(tree: ast.Module, const: ast.Constant) -> bool:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and first.value is const:
                return True
    return False


def test_a_family_is_reached_only_through_the_registry():
    found = family_violations(sources())
    assert not found, "family classes named outside the family's files:\n  " + "\n  ".join(found)


def test_deepspeed_is_imported_and_reached_into_only_where_listed():
    found = deepspeed_violations(sources())
    assert not found, "DeepSpeed reached outside its allowed modules:\n  " + "\n  ".join(found)
    missing = [p for p in DEEPSPEED_IMPORTERS if not (ROOT / p).is_file()]
    assert not missing, f"stale entries in DEEPSPEED_IMPORTERS: {missing}"


@pytest.mark.parametrize("text, expect", [
    ("from mtnlg.model.gpt import GPTModel\n", "names GPTModel"),
    ("def f(m):\n    from mtnlg.model.blocks import TransformerBlock\n    return isinstance(m, TransformerBlock)\n",
     "names TransformerBlock"),
    ("import mtnlg.model.gpt\n", "names mtnlg.model.gpt"),
    ("def f(p):\n    return p.ds_numel\n", "reads DeepSpeed's ds_numel"),
    ("import deepspeed\n", "imports deepspeed"),
    ("NAME = 'mp_rank_00_model_states.pt'\n", "spells a DeepSpeed checkpoint name"),
])
def test_the_contract_checks_see_a_violation(text, expect):
    """The checks themselves: each kind of violation, planted in a module outside the allowed files, is reported
    (and the same text in a docstring is not)."""
    trees = {"mtnlg/training/planted.py": ast.parse(text)}
    found = family_violations(trees) + deepspeed_violations(trees)
    assert any(expect in f for f in found), found
    doc = {"mtnlg/training/planted.py": ast.parse(f'"""{text}"""\n')}
    assert not family_violations(doc) + deepspeed_violations(doc)


def test_untested_deepspeed_versions_get_one_warning_line():
    from mtnlg.deepspeed_compat import TESTED_DEEPSPEED, version_warning

    assert version_warning(TESTED_DEEPSPEED) is None
    line = version_warning("0.18.0")
    assert line is not None and "\n" not in line and "0.18.0" in line and TESTED_DEEPSPEED in line
    cfg = (ROOT / "setup.cfg").read_text()
    assert "deepspeed>=0.19,<0.20" in cfg  # the range the shims are tested on (their versions: deepspeed_compat)
