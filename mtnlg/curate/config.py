"""The ``curate:`` section of a YAML file: which steps run and their settings, loaded strictly (an unknown key, a
wrong type or a threshold outside its range is a one-line ``UserError``).

```yaml
curate:
  steps: [quality, decontaminate, exact, near]   # any subset; they always apply in this order
  text_key: text
  shard_docs: 2000                               # documents per shard (the unit of work and of resume)
  quality:
    gopher_quality: {}                           # datatrove GopherQualityFilter kwargs; false = off
    gopher_repetition: {}                        # datatrove GopherRepetitionFilter kwargs; false = off
    c4: {}                                       # datatrove C4QualityFilter kwargs; false = off
  exact: {}
  near: {threshold: 0.8, ngram: 5, num_perm: 128, seed: 1, bands: null, rows: null}
  decontaminate: {ngram: 13, benchmarks: {lambada: eval/lambada.jsonl, ...}}
```
"""

from __future__ import annotations

import inspect
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from mtnlg.errors import UserError

STEPS = ("quality", "decontaminate", "exact", "near")
QUALITY_FILTERS = ("gopher_quality", "gopher_repetition", "c4")
# datatrove kwargs a user may not set: writers and language belong to the pipeline, not to a threshold
_NOT_SETTABLE = {"exclusion_writer", "language"}


@dataclass
class NearConfig:
    threshold: float = 0.8  # word n-gram Jaccard at and above which two documents are near-duplicates
    ngram: int = 5
    num_perm: int = 128
    seed: int = 1
    bands: int | None = None  # None: chosen for the threshold (see lsh.choose_bands)
    rows: int | None = None


@dataclass
class DecontamConfig:
    ngram: int = 13
    benchmarks: dict[str, str] = field(default_factory=dict)  # name -> JSONL file


@dataclass
class CurateConfig:
    steps: list[str] = field(default_factory=lambda: list(STEPS))
    text_key: str = "text"
    shard_docs: int = 2000
    quality: dict[str, dict[str, Any] | None] = field(
        default_factory=lambda: {name: {} for name in QUALITY_FILTERS})  # None: that filter is off
    exact: dict[str, Any] = field(default_factory=dict)
    near: NearConfig = field(default_factory=NearConfig)
    decontaminate: DecontamConfig = field(default_factory=DecontamConfig)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_keys(where: str, given: dict, allowed: list[str]) -> None:
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise UserError(f"{where}: unknown key '{unknown[0]}' (known: {', '.join(allowed)})")


def _number(where: str, value: Any, kind: type, low: float | None = None, high: float | None = None,
            low_open: bool = False) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise UserError(f"{where} must be a{'n integer' if kind is int else ' number'}, got {value!r}")
    if (low is not None and (value <= low if low_open else value < low)) or (high is not None and value > high):
        lo = f"({low}" if low_open else f"[{low}"
        raise UserError(f"{where} = {value} is outside {lo}, {high if high is not None else 'inf'}]")
    return kind(value)


def _filter_class(name: str) -> Any:
    from datatrove.pipeline.filters import C4QualityFilter, GopherQualityFilter, GopherRepetitionFilter

    return {"gopher_quality": GopherQualityFilter, "gopher_repetition": GopherRepetitionFilter,
            "c4": C4QualityFilter}[name]


def filter_kwargs(name: str) -> list[str]:
    """The thresholds a datatrove quality filter takes (its constructor's keywords)."""
    params = inspect.signature(_filter_class(name).__init__).parameters
    return [p for p in params if p not in ("self", *_NOT_SETTABLE)]


def parse(section: dict[str, Any] | None) -> CurateConfig:
    """A ``CurateConfig`` from the ``curate:`` mapping (None: every default)."""
    cfg = CurateConfig()
    if section is None:
        return cfg
    if not isinstance(section, dict):
        raise UserError(f"curate: expected a mapping, got {type(section).__name__}")
    _check_keys("curate", section, [f.name for f in fields(CurateConfig)])
    if "steps" in section:
        cfg.steps = parse_steps(section["steps"])
    if "text_key" in section:
        if not isinstance(section["text_key"], str) or not section["text_key"]:
            raise UserError("curate.text_key must be a non-empty string")
        cfg.text_key = section["text_key"]
    if "shard_docs" in section:
        cfg.shard_docs = _number("curate.shard_docs", section["shard_docs"], int, 1)
    if "quality" in section:
        q = section["quality"] or {}
        if not isinstance(q, dict):
            raise UserError("curate.quality must be a mapping of filter -> settings")
        _check_keys("curate.quality", q, list(QUALITY_FILTERS))
        for name, value in q.items():
            if value is False or value is None:
                cfg.quality[name] = None
                continue
            if value is True:
                value = {}
            if not isinstance(value, dict):
                raise UserError(f"curate.quality.{name} must be a mapping of thresholds, true or false")
            _check_keys(f"curate.quality.{name}", value, filter_kwargs(name))
            cfg.quality[name] = dict(value)
    if "exact" in section:
        if not isinstance(section["exact"] or {}, dict) or section["exact"]:
            raise UserError("curate.exact takes no settings (use {} or leave it out)")
    if "near" in section:
        cfg.near = _parse_near(section["near"] or {})
    if "decontaminate" in section:
        cfg.decontaminate = _parse_decontam(section["decontaminate"] or {})
    return cfg


def parse_steps(value: Any) -> list[str]:
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
        raise UserError(f"steps must be a list of {', '.join(STEPS)}")
    items = [s.strip() for s in items if s.strip()]
    for s in items:
        if s not in STEPS:
            raise UserError(f"unknown step '{s}' (steps: {', '.join(STEPS)})")
    return [s for s in STEPS if s in items]


def _parse_near(d: dict) -> NearConfig:
    if not isinstance(d, dict):
        raise UserError("curate.near must be a mapping")
    _check_keys("curate.near", d, [f.name for f in fields(NearConfig)])
    near = NearConfig()
    if "threshold" in d:
        near.threshold = check_threshold(d["threshold"], "curate.near.threshold")
    for key, low in (("ngram", 1), ("num_perm", 2), ("seed", 0)):
        if key in d:
            setattr(near, key, _number(f"curate.near.{key}", d[key], int, low))
    for key in ("bands", "rows"):
        if d.get(key) is not None:
            setattr(near, key, _number(f"curate.near.{key}", d[key], int, 1))
    if (near.bands is None) != (near.rows is None):
        raise UserError("curate.near: give both bands and rows, or neither (then they are chosen for the threshold)")
    if near.bands is not None and near.bands * near.rows > near.num_perm:
        raise UserError(f"curate.near: bands x rows = {near.bands * near.rows} exceeds num_perm {near.num_perm}")
    return near


def check_threshold(value: Any, where: str = "--threshold") -> float:
    return _number(where, value, float, 0.0, 1.0, low_open=True)


def _parse_decontam(d: dict) -> DecontamConfig:
    if not isinstance(d, dict):
        raise UserError("curate.decontaminate must be a mapping")
    _check_keys("curate.decontaminate", d, [f.name for f in fields(DecontamConfig)])
    out = DecontamConfig()
    if "ngram" in d:
        out.ngram = _number("curate.decontaminate.ngram", d["ngram"], int, 1)
    benchmarks = d.get("benchmarks") or {}
    if not isinstance(benchmarks, dict) or not all(isinstance(v, str) for v in benchmarks.values()):
        raise UserError("curate.decontaminate.benchmarks must map a name to a JSONL file")
    out.benchmarks = {str(k): v for k, v in benchmarks.items()}
    return out


def load(path: str | Path | None) -> CurateConfig:
    """The ``curate:`` section of a YAML file (the file may hold other sections, which are ignored)."""
    if path is None:
        return CurateConfig()
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} not found")
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{p}: malformed YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(doc, dict) or "curate" not in doc:
        raise UserError(f"{p}: no 'curate:' section")
    return parse(doc["curate"])
