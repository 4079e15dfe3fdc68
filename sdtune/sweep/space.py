"""The search space: ``--grid KEY=v1,v2``, ``KEY=loguniform:1e-5:1e-3`` ranges, prompt files → trials.

A trial is a name plus a flat ``{dotted.key: value}`` override mapping; :func:`trial_config` applies it to
the base config and validates the result, so a bad value fails before anything is launched.

* grid: every combination of the ``sweep.grid`` lists (and of the prompt variants), in a stable order;
* random: ``sweep.max_trials`` samples, each range drawn from its distribution, each list a uniform choice
  (seeded by ``sweep.seed``, so the same command gives the same trials);
* ``extra`` trials (``--trial "k=v k=v"``) are appended as they are.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdtune.config import ALL_TRAIN_OPTIONS, RunConfig, SweepConfig, config_from_dict, merge_updates
from sdtune.errors import ConfigError

# Sections a trial may change. Data sources, tracking, the registry and the cluster stay the sweep's own.
SWEEPABLE = ("model", "preprocess", "caption", "train", "evaluate")
RANGE_KINDS = ("uniform", "loguniform", "int")
_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


@dataclass(frozen=True)
class Range:
    kind: str  # uniform | loguniform | int
    low: float
    high: float

    @classmethod
    def parse(cls, key: str, text: str) -> Range:
        parts = str(text).split(":")
        if len(parts) != 3 or parts[0] not in RANGE_KINDS:
            raise ConfigError(
                f"sweep range {key}={text!r}: expected KIND:LOW:HIGH with KIND in {RANGE_KINDS}"
            )
        try:
            low, high = float(parts[1]), float(parts[2])
        except ValueError:
            raise ConfigError(f"sweep range {key}={text!r}: LOW and HIGH must be numbers") from None
        if not low < high:
            raise ConfigError(f"sweep range {key}={text!r}: LOW must be below HIGH")
        if parts[0] == "loguniform" and low <= 0:
            raise ConfigError(f"sweep range {key}={text!r}: loguniform needs LOW > 0")
        if parts[0] == "int" and (low != int(low) or high != int(high)):
            raise ConfigError(f"sweep range {key}={text!r}: int bounds must be integers")
        return cls(parts[0], low, high)

    def sample(self, rng: random.Random) -> float | int:
        if self.kind == "int":
            return rng.randint(int(self.low), int(self.high))
        if self.kind == "loguniform":
            value = math.exp(rng.uniform(math.log(self.low), math.log(self.high)))
        else:
            value = rng.uniform(self.low, self.high)
        return float(f"{value:.3g}")  # readable in tables; the distribution does not need more digits


@dataclass(frozen=True)
class Trial:
    """One point of the search space: ``overrides`` maps dotted config keys to (typed) values."""

    index: int
    overrides: dict[str, Any] = field(default_factory=dict)
    label: str = ""  # a name given from outside (a Katib trial's name); default trial-NNN

    @property
    def name(self) -> str:
        return self.label or f"trial-{self.index:03d}"

    def to_json(self) -> str:
        """One-line JSON: how a trial travels as a ParallelFor item."""
        data = {"index": self.index, "name": self.name, "overrides": self.overrides}
        if self.label:
            data["label"] = self.label
        return json.dumps(data, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | dict) -> Trial:
        data = json.loads(text) if isinstance(text, str) else text
        return cls(int(data["index"]), dict(data.get("overrides") or {}), str(data.get("label") or ""))

    def describe(self) -> str:
        return " ".join(f"{k}={_show(v)}" for k, v in self.overrides.items()) or "(base config)"


def _show(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def parse_value(raw: str) -> Any:
    """A grid value as YAML, with numbers YAML 1.1 leaves as strings (``1e-4``) turned into floats."""
    raw = raw.strip()
    try:
        value = yaml.safe_load(raw) if raw else ""
    except yaml.YAMLError:
        return raw
    if isinstance(value, str) and _NUMBER.match(value):
        return float(value)
    return value


def split_values(text: str) -> list[str]:
    """``1e-4,5e-5`` → two values; commas inside ``[...]``, ``{...}`` or quotes do not split."""
    out, depth, quote, current = [], 0, "", []
    for char in text:
        if quote:
            quote = "" if char == quote else quote
        elif char in "\"'":
            quote = char
        elif char in "[{":
            depth += 1
        elif char in "]}":
            depth -= 1
        elif char == "," and depth == 0:
            out.append("".join(current))
            current = []
            continue
        current.append(char)
    out.append("".join(current))
    return [v for v in (s.strip() for s in out) if v]


def parse_grid_option(items: list[str]) -> tuple[dict[str, list[Any]], dict[str, str]]:
    """``--grid`` values → (grid lists, ranges). ``KEY=a,b`` is a list; ``KEY=loguniform:1e-5:1e-3`` a range."""
    grid: dict[str, list[Any]] = {}
    ranges: dict[str, str] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key or not raw.strip():
            raise ConfigError(f"--grid {item!r}: expected KEY=v1,v2 or KEY=KIND:LOW:HIGH")
        if raw.split(":", 1)[0] in RANGE_KINDS:
            Range.parse(key, raw)
            ranges[key] = raw.strip()
        else:
            grid[key] = [parse_value(v) for v in split_values(raw)]
    return grid, ranges


def parse_trial_option(text: str) -> dict[str, Any]:
    """``--trial "train.rank=8 train.learning_rate=1e-4"`` → overrides of one extra trial."""
    out: dict[str, Any] = {}
    for item in text.split():
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--trial {text!r}: {item!r} is not key=value")
        out[key.strip()] = parse_value(raw)
    return out


def read_prompts(path: str | Path) -> list[str]:
    """Prompt/caption template variants: one per line; blank lines and ``#`` comments are skipped."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"--prompts {path} is a folder: name a text file of prompt variants, one per line")
    if not path.is_file():
        raise ConfigError(f"prompts file not found: {path}")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    prompts = [line for line in lines if line and not line.startswith("#")]
    if not prompts:
        raise ConfigError(f"{path}: no prompt variants (one per line)")
    return prompts


def _check_key(key: str) -> None:
    if key.split(".", 1)[0] not in SWEEPABLE or "." not in key:
        raise ConfigError(
            f"sweep key {key!r}: only keys under {', '.join(SWEEPABLE)} can vary between trials "
            "(the data sources, tracking, registry and cluster settings are the sweep's own)"
        )


def dimensions(sweep: SweepConfig) -> tuple[dict[str, list[Any]], dict[str, Range]]:
    """The categorical dimensions (grid lists + prompts) and the ranges, checked."""
    lists = {k: [parse_value(v) if isinstance(v, str) else v for v in vals] for k, vals in sweep.grid.items()}
    for key, values in lists.items():
        if not values:
            raise ConfigError(f"sweep.grid.{key}: no values")
    if sweep.prompts:
        if sweep.prompt_key in lists:
            raise ConfigError(f"{sweep.prompt_key} is both in the grid and the prompt variants")
        lists[sweep.prompt_key] = list(sweep.prompts)
    ranges = {k: Range.parse(k, v) for k, v in sweep.ranges.items()}
    for key in [*lists, *ranges]:
        _check_key(key)
    both = set(lists) & set(ranges)
    if both:
        raise ConfigError(f"sweep keys both listed and ranged: {', '.join(sorted(both))}")
    return lists, ranges


def build_trials(cfg: RunConfig, extra: list[dict[str, Any]] | None = None) -> list[Trial]:
    """Expand ``cfg.sweep`` into trials; every trial's config is validated here (a bad value fails now)."""
    sweep = cfg.sweep
    lists, ranges = dimensions(sweep)
    points: list[dict[str, Any]] = []
    if sweep.algorithm == "grid":
        if ranges:
            raise ConfigError(
                f"ranges ({', '.join(ranges)}) need random search: pass --random N (or sweep.algorithm=random)"
            )
        if lists:
            keys = list(lists)
            points = [dict(zip(keys, combo, strict=True)) for combo in itertools.product(*lists.values())]
    else:
        if not sweep.max_trials:
            raise ConfigError(f"sweep.algorithm={sweep.algorithm} needs sweep.max_trials (--random N)")
        if not (lists or ranges):
            raise ConfigError("random search needs at least one --grid list or range")
        rng = random.Random(sweep.seed)
        for _ in range(sweep.max_trials):
            point = {k: rng.choice(v) for k, v in lists.items()}
            point.update({k: r.sample(rng) for k, r in ranges.items()})
            points.append(point)
    for overrides in extra or []:
        for key in overrides:
            _check_key(key)
        points.append(dict(overrides))
    if not points:
        raise ConfigError(
            "nothing to sweep: give --grid KEY=v1,v2, --random N with ranges, --prompts or --trial"
        )
    trials = [Trial(i, p) for i, p in enumerate(points)]
    for trial in trials:
        trial_config(cfg, trial)
    return trials


def trial_config(base: RunConfig, trial: Trial) -> RunConfig:
    """The base config with the trial's overrides applied, validated (unknown keys, bad values fail)."""
    data = base.model_dump(mode="json")
    update: dict[str, Any] = {}
    for key, value in trial.overrides.items():
        node, known, parts = update, data, key.split(".")
        for part in parts[:-1]:
            known = known.get(part) if isinstance(known, dict) else None
            if not isinstance(known, dict):
                raise ConfigError(f"{trial.name}: {key}: no such config section")
            node = node.setdefault(part, {})
        # A train option of another method is known: the config check says whether this trial's method takes it.
        if parts[-1] not in known and not (parts[:-1] == ["train"] and parts[-1] in ALL_TRAIN_OPTIONS):
            raise ConfigError(f"{trial.name}: {key}: no such config key")
        node[parts[-1]] = value
    return config_from_dict(merge_updates(data, update), origin=trial.name)
