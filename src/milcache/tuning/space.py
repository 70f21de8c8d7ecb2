"""The search space of a study: which head, its sizes, and the training hyper-parameters.

A space maps a parameter name to a distribution (``{"type": "float", "low": …, "high": …,
"log": true}``, ``int`` likewise, ``{"type": "categorical", "choices": […]}``, or a plain list of
choices) or to a fixed value. Head options (hidden, dropout, attention_dim …) are sampled only for
heads that take them; the rest are TrainConfig fields.
"""

from __future__ import annotations

from pathlib import Path

from milcache.aggregator.config import OPTIMIZERS, TrainConfig
from milcache.aggregator.heads import check_head, head_class, list_heads, resolved_options
from milcache.errors import MilcacheError
from milcache.settings_files import read_settings

_TRAIN_FIELDS = set(TrainConfig.__dataclass_fields__) - {"head", "head_options"}


def default_space(task_kind: str | None = None) -> dict:
    """Every parameter the study searches when no space file narrows it; each admits its calibrated
    default, so that the study's first trial (the defaults, see ``default_params``) lies inside it.
    A task without classes leaves out the heads whose loss needs them (CLAM)."""
    heads = [h for h in list_heads() if task_kind not in ("regression", "survival") or not head_class(h).needs_classes]
    return {
        "head": {"type": "categorical", "choices": heads},
        "hidden": {"type": "categorical", "choices": [64, 128, 256]},
        "dropout": {"type": "float", "low": 0.0, "high": 0.5},
        "attention_dim": {"type": "categorical", "choices": [32, 64, 128]},
        "classifier_hidden": {"type": "categorical", "choices": [0, 64]},
        "temperature": {"type": "float", "low": 0.5, "high": 20.0, "log": True},
        "lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
        "optimizer": {"type": "categorical", "choices": list(OPTIMIZERS)},
        "weight_decay": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True},
        "epochs": {"type": "int", "low": 10, "high": 60},
        "instances": {"type": "categorical", "choices": [128, 512, 1024, 2048]},
        # Categorical so that 0 (no penalty, the default) is a choice: a log range cannot hold it.
        "elastic_net": {"type": "categorical", "choices": [0.0, 1e-6, 1e-5, 1e-4, 1e-3]},
        "class_weights": {"type": "categorical", "choices": [False, True]},
    }


def load_space(path: str | Path | None, fixed: dict | None = None, *, task_kind: str | None = None) -> dict:
    """The default space (for ``task_kind``, when known), updated by a TOML/YAML file and by fixed
    values (which win); a head the task cannot train is refused by name."""
    space = default_space(task_kind)
    if path is not None:
        space.update(read_settings(path))
    space.update(fixed or {})
    known = {"head"} | _TRAIN_FIELDS | {o for h in list_heads() for o in head_class(h).options()}
    unknown = sorted(set(space) - known)
    if unknown:
        raise MilcacheError(
            f"search space: unknown parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
        )
    for name, spec in space.items():
        _check(name, spec)
    for head in _candidates(space["head"]):
        check_head(head, {}, task_kind)
    for name, spec in space.items():
        if name != "head":
            _check_values(name, spec, space["head"])
    return space


def _candidates(spec) -> list:
    """The values a spec can take that decide its validity: a fixed value, the choices, low and high."""
    if isinstance(spec, list):
        return spec
    if isinstance(spec, dict):
        return spec["choices"] if spec["type"] == "categorical" else [spec["low"], spec["high"]]
    return [spec]


def _check_values(name: str, spec, head_spec) -> None:
    """Build a TrainConfig, or the first head that takes the option, with each candidate value: a
    value out of range is refused before the study starts, naming the parameter."""
    heads = _candidates(head_spec)
    for value in _candidates(spec):
        try:
            if name in _TRAIN_FIELDS:
                TrainConfig(**{name: None if (name == "instances" and value == 0) else value})
            else:
                head = next((h for h in heads if name in head_class(h).options()), None)
                if head is not None:
                    check_head(head, {name: value})
        except MilcacheError as exc:
            raise MilcacheError(f"search space: {name!r} = {value!r}: {exc}") from None


def _check(name: str, spec) -> None:
    if isinstance(spec, dict):
        kind = spec.get("type")
        if kind in ("float", "int"):
            if "low" not in spec or "high" not in spec or spec["low"] > spec["high"]:
                raise MilcacheError(f"search space: {name!r} needs low ≤ high, got {spec}")
        elif kind == "categorical":
            if not spec.get("choices"):
                raise MilcacheError(f"search space: {name!r} needs a non-empty list of choices")
        else:
            raise MilcacheError(f"search space: {name!r} has type {kind!r}; use float, int or categorical")
    if name == "head":
        names = spec["choices"] if isinstance(spec, dict) else (spec if isinstance(spec, list) else [spec])
        for head in names:
            head_class(head)  # raises with the list of valid names


def _suggest(trial, name: str, spec):
    if isinstance(spec, list):
        return trial.suggest_categorical(name, spec)
    if not isinstance(spec, dict):
        return spec
    if spec["type"] == "float":
        return trial.suggest_float(name, spec["low"], spec["high"], log=spec.get("log", False))
    if spec["type"] == "int":
        return trial.suggest_int(name, spec["low"], spec["high"], log=spec.get("log", False))
    return trial.suggest_categorical(name, spec["choices"])


def sample_config(trial, space: dict, seed: int = 0) -> TrainConfig:
    """A TrainConfig for one trial: the head first, then only the options that head takes."""
    head = _suggest(trial, "head", space["head"])
    head_options_taken = set(head_class(head).options())
    options, train = {}, {"seed": seed}
    for name, spec in space.items():
        if name == "head":
            continue
        if name in _TRAIN_FIELDS:
            train[name] = _suggest(trial, name, spec)
        elif name in head_options_taken:
            options[name] = _suggest(trial, name, spec)
    if train.get("instances") == 0:
        train["instances"] = None  # 0 stands for "all instances"
    return TrainConfig(head=head, head_options=options, **train)


def _admits(spec, value) -> bool:
    """Whether a searched parameter's distribution can take ``value`` (a fixed value is not searched)."""
    if isinstance(spec, list):
        return value in spec
    if not isinstance(spec, dict) or value is None:
        return False
    if spec["type"] == "categorical":
        return value in spec["choices"]
    if spec.get("log") and value <= 0:
        return False
    return spec["low"] <= value <= spec["high"]


def default_params(space: dict) -> dict | None:
    """The calibrated defaults (TrainConfig's, and the default head's options) as a trial's
    parameters: those the space searches and admits; the sampler draws the rest. None when the
    space leaves out the default head, so there are no defaults to try."""
    head_spec = space["head"]
    if not _head_searched(space):
        return head_params(space, head_spec)
    return head_params(space, TrainConfig.head) if _admits(head_spec, TrainConfig.head) else None


def swept_heads(space: dict) -> list[str]:
    """The heads a study tries first, each once, beside the defaults: every head the space
    searches but the default one (none when the head is fixed)."""
    if not _head_searched(space):
        return []
    return [head for head in _candidates(space["head"]) if head != TrainConfig.head]


def _head_searched(space: dict) -> bool:
    """Whether the space searches the head (a list or distribution of them), or fixes one."""
    return isinstance(space["head"], (list, dict))


def head_params(space: dict, head: str) -> dict:
    """``head`` with its default options and the calibrated training defaults, as a trial's
    parameters: those the space searches and admits; the sampler draws the rest."""
    head_defaults = resolved_options(head, {})
    defaults = {**TrainConfig().to_dict(), **head_defaults}
    if defaults.get("instances") is None:
        defaults["instances"] = 0  # the space's name for "all instances"
    params = {"head": head} if _head_searched(space) else {}
    for name, spec in space.items():
        if name != "head" and (name in _TRAIN_FIELDS or name in head_defaults) and _admits(spec, defaults[name]):
            params[name] = defaults[name]
    return params
