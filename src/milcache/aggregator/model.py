"""A trained model: feature standardisation + a head, saved as safetensors + a JSON config that
rebuilds it (nothing is unpickled)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from milcache.aggregator.heads import Head, HeadOutput, create_head
from milcache.aggregator.tasks import Task
from milcache.errors import MilcacheError

WEIGHTS_FILE = "model.safetensors"
FOLDS_FILE = "folds.safetensors"  # the cross-validation's fold models, keys prefixed "fold<k>."
CONFIG_FILE = "config.json"
BLEND_FILE = "blend.json"  # a blend of run directories (its members), which predict together


class MILModel(nn.Module):
    """Standardises embeddings with statistics of the training split, then applies the head; a
    head's several streams (DSMIL) become one prediction by the task's average of probabilities."""

    def __init__(self, head: Head, dim: int, task: Task) -> None:
        super().__init__()
        self.head = head
        self.task = task
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor | None = None) -> HeadOutput:
        """``x``: padded bags (B × N × D), or with ``slots`` (B × N) packed real instances (T × D)
        laid out as padded bags only after the instance layer (see ``data.Batch``)."""
        h = self.head.embed(x, self.mean, self.std)
        out = self.head.aggregate(h, mask) if slots is None else self.head.aggregate_packed(h, slots, mask)
        if out.streams:
            out.logits = self.task.combine_streams(out.streams)
        return out

    def loss(
        self,
        out: HeadOutput,
        targets: torch.Tensor,
        class_weights: torch.Tensor | None = None,
        bag_weight: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The training loss of a batch: the task's loss (averaged over a head's streams), then the
        head's own additions (CLAM's instance loss)."""
        if bag_weight is None:
            bag_weight = torch.ones(len(targets), device=targets.device)
        streams = out.streams or [out.logits]
        bag_loss = sum(self.task.loss(s, targets, class_weights, bag_weight) for s in streams) / len(streams)
        return self.head.combine_loss(bag_loss, out, targets, bag_weight)


class Ensemble(nn.Module):
    """Models that predict together: a cross-validation's fold models (``predict --ensemble``), or
    the blend `milcache tune --select blend` keeps (the defaults and the best trial, whose heads
    differ). Their outputs are averaged as the task averages a head's streams (probabilities, or
    values). Instance scores are averaged over the members with the first scoring member's head
    only: an attention weight and a DSMIL instance score do not share a scale."""

    def __init__(self, models: list[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(models)
        self.task = models[0].task
        scoring = [m for m in models if m.head.has_instance_scores]
        self.head = scoring[0].head if scoring else models[0].head
        self._scoring = [k for k, m in enumerate(models) if type(m.head) is type(self.head)]

    def forward(self, x: torch.Tensor, mask: torch.Tensor, slots: torch.Tensor | None = None) -> HeadOutput:
        outs = [member(x, mask, slots) for member in self.members]
        scores = [outs[k].scores.float() for k in self._scoring if outs[k].scores is not None]
        return HeadOutput(
            self.task.combine_streams([o.logits for o in outs]), torch.stack(scores).mean(0) if scores else None
        )


def build_model(head: str, head_options: dict, dim: int, task: Task) -> MILModel:
    return MILModel(
        create_head(head, dim, task.n_outputs, n_classes=len(task.classes) or None, **head_options), dim, task
    )


def save_model(model: MILModel, run_dir: Path, config: dict) -> None:
    from safetensors.torch import save_file

    run_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, run_dir / WEIGHTS_FILE)
    (run_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2))


def save_fold_models(models: list[MILModel], run_dir: Path) -> None:
    """The fold models of a cross-validation in one safetensors file (for ``predict --ensemble``)."""
    from safetensors.torch import save_file

    state = {
        f"fold{k}.{name}": v.detach().cpu().contiguous()
        for k, model in enumerate(models)
        for name, v in model.state_dict().items()
    }
    save_file(state, run_dir / FOLDS_FILE)


def load_model(
    run_dir: str | Path, device: torch.device | str = "cpu", ensemble: bool = False
) -> tuple[MILModel | Ensemble, dict, Task]:
    """Rebuild a model from a run directory (``config.json`` + ``model.safetensors``), or with
    ``ensemble`` its cross-validation's fold models as one ``Ensemble`` (``folds.safetensors``).
    A blend's directory (``blend.json``) gives its members as one ``Ensemble`` (each of them its
    fold models with ``ensemble``), with the first member's config."""
    from safetensors.torch import load_file

    run_dir = Path(run_dir)
    if (run_dir / BLEND_FILE).is_file():
        return _load_blend(run_dir, device, ensemble)
    if not (run_dir / CONFIG_FILE).is_file() or not (run_dir / WEIGHTS_FILE).is_file():
        raise MilcacheError(f"{run_dir} is not a model directory: it needs {CONFIG_FILE} and {WEIGHTS_FILE}")
    config = json.loads((run_dir / CONFIG_FILE).read_text())
    task = Task.from_dict(config["task"])

    def rebuilt(state: dict) -> MILModel:
        model = build_model(config["head"], config["head_options"], config["dim"], task)
        model.load_state_dict(state)
        return model

    if not ensemble:
        return rebuilt(load_file(run_dir / WEIGHTS_FILE, device=str(device))).to(device).eval(), config, task
    if not (run_dir / FOLDS_FILE).is_file():
        raise MilcacheError(
            f"--ensemble needs the fold models of a cross-validation ({run_dir / FOLDS_FILE}); this run has "
            "none (trained on a fixed split, or by an older milcache): predict without --ensemble"
        )
    states: dict[int, dict] = {}
    for key, value in load_file(run_dir / FOLDS_FILE, device=str(device)).items():
        fold, name = key.split(".", 1)
        states.setdefault(int(fold.removeprefix("fold")), {})[name] = value
    members = [rebuilt(states[k]) for k in sorted(states)]
    return Ensemble(members).to(device).eval(), config, task


def save_blend(run_dir: Path, members: list[str]) -> None:
    """Marks ``run_dir`` as a blend of its subdirectories ``members`` (run directories)."""
    (run_dir / BLEND_FILE).write_text(json.dumps({"members": members}, indent=2))


def _load_blend(run_dir: Path, device: torch.device | str, ensemble: bool) -> tuple[Ensemble, dict, Task]:
    names = json.loads((run_dir / BLEND_FILE).read_text())["members"]
    loaded = [load_model(run_dir / name, device, ensemble) for name in names]
    config, task = loaded[0][1], loaded[0][2]
    for name, (_, other, _) in zip(names, loaded, strict=True):
        if other["task"] != config["task"] or other["store"] != config["store"]:
            raise MilcacheError(
                f"the members of the blend {run_dir} were trained for different tasks or embeddings "
                f"({names[0]} and {name}); predict with one of them"
            )
    blend_config = {**config, "blend": {name: other["head"] for name, (_, other, _) in zip(names, loaded, strict=True)}}
    return Ensemble([model for model, _, _ in loaded]).to(device).eval(), blend_config, task
