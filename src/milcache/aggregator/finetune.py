"""`milcache fine-tune`: the backbone and a trained head, end to end on the original pixels.

The head comes from a train-head (or tune) run, the backbone from the store's metadata with the
weights it was extracted with. Each step samples K instances of a bag and reads only those again
from the bag's images, through the coordinates and plan the store keeps and the very source that
extracted them (``extractor.reread``): nothing is tiled twice. Everything that decides a step is
seeded per epoch, so a run killed and resumed from its last epoch's checkpoint ends where an
uninterrupted run ends.

Writes OUT/backbone.safetensors (for ``milcache extract --weights``), and OUT as a run directory
(config.json + model.safetensors) that ``predict`` accepts with a store re-extracted by it.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from milcache import checks
from milcache.aggregator.config import FineTuneSettings
from milcache.errors import MilcacheError, OptionError

BACKBONE_FILE = "backbone.safetensors"
CHECKPOINT_DIR = "checkpoint"
_STATISTICS_MOMENTUM = 0.05
_CLIP_NORM = 1.0  # one bag's gradient may be large: clipping keeps a step from undoing the backbone


@dataclass
class FineTuneResult:
    run_dir: Path
    backbone: Path
    best_epoch: int
    history: list[dict]  # per epoch: train_loss, val_loss
    frozen: list[str]  # the backbone parameters left unchanged


class _Sampled(torch.utils.data.Dataset):
    """Bag i → (i, pixels of its sampled instances), read again through the store's source."""

    def __init__(self, store_dir: Path, specs: list, picks: list[np.ndarray]) -> None:
        self.store_dir, self.specs, self.picks = store_dir, specs, picks
        self._store = self._source = None

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, i: int):
        from milcache.extractor.reread import reread, source_of
        from milcache.store import FeatureStore

        if self._store is None:  # opened in the process that reads (a data-loader worker)
            self._store = FeatureStore(self.store_dir)
            self._source = source_of(self._store)
        return i, torch.from_numpy(
            reread(self._store, self._source, self.specs[i].bag_id, self.picks[i], self.specs[i])
        )


def fine_tune(
    run: str | Path,
    manifest: str | Path,
    out: str | Path,
    settings: FineTuneSettings,
    store: str | Path | None = None,
    labels: str | Path | None = None,
    weights: str | Path | None = None,
    device: str = "auto",
    resume: bool = False,
    progress: bool = False,
) -> FineTuneResult:
    """Fine-tune the backbone of ``store`` with the head of ``run`` on the images of ``manifest``."""
    from milcache.aggregator.model import BLEND_FILE, load_model, save_model
    from milcache.aggregator.run import check_model_input
    from milcache.devices import resolve_device, retain_freed_host_memory
    from milcache.extractor.encoders import file_digest
    from milcache.extractor.reread import source_of, store_backbone
    from milcache.store import FeatureStore, read_manifest

    run = Path(run)
    if (run / BLEND_FILE).is_file():  # tune --select blend: two heads, and one backbone to tune for them
        members = ", ".join(str(run / name) for name in json.loads((run / BLEND_FILE).read_text())["members"])
        raise OptionError(f"{run} is a blend of several models; fine-tune one of them: {members}")
    out = checks.output_dir(out)
    torch_device = resolve_device(device)
    if torch_device.type == "cpu":
        retain_freed_host_memory()  # each step's activations reuse the last one's pages (see there)
    model, config, task = load_model(run, "cpu")
    if task.kind == "survival":
        raise OptionError(
            f"{run} is a survival model; fine-tune trains on a few bags a step, too few for a Cox risk set, "
            "and does not take survival models yet: use train-head's heads on the cached embeddings"
        )
    store, labels = _inputs_of(run, store, labels)
    with FeatureStore(store) as fs:
        check_model_input(config["store"], fs, model_dir=run, what="fine-tune on")
        source = source_of(fs)  # first: a store that was imported, not extracted, is named as such
        backbone = store_backbone(fs, weights)
        metadata = fs.metadata
        sizes = fs.sizes()
    if backbone.dim != config["dim"]:
        raise MilcacheError(f"dim: the head of {run} takes {config['dim']}, the store's backbone gives {backbone.dim}")
    if settings.pool_maps and metadata.source.get("kind") == "volume":
        raise OptionError("--pool-maps pools 2D feature maps: it does not apply to --source volume")
    if settings.pool_maps and backbone.token_rule != "pooled":
        raise OptionError(f"--pool-maps pools 2D feature maps: the store's token rule is {backbone.token_rule!r}")
    specs, y, groups = _labelled_bags(read_manifest(manifest).bags(), labels, set(sizes), task)
    train, val = _split(y, groups, task, settings)
    frozen = freeze(backbone.model, settings.freeze)
    if settings.checkpointing:
        backbone.model.set_grad_checkpointing(True)
    net = _EndToEnd(backbone, model, source, settings.pool_maps).to(torch_device)
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for p in backbone.model.parameters() if p.requires_grad], "lr": settings.backbone_lr},
            {"params": list(model.parameters()), "lr": settings.lr},
        ],
        weight_decay=settings.weight_decay,
        fused=True,  # one kernel over all parameters (torch's default on the CPU loops over them)
    )
    # What a checkpoint belongs to: a resume continues this fine-tuning, not another one.
    identity = {
        "model": str(Path(run).resolve()),
        "store": str(Path(store).resolve()),
        "manifest": str(Path(manifest).resolve()),
        "weights_digest": backbone.weights_digest,
        **{k: v for k, v in asdict(settings).items() if k not in _MAY_CHANGE_ON_RESUME},
    }
    state = _Checkpoint(out / CHECKPOINT_DIR, identity)
    start_epoch, history, best = 0, [], {"epoch": -1, "loss": math.inf}
    if resume:
        start_epoch, history, best = state.load(net, optimizer)
    elif state.exists():
        raise MilcacheError(
            f"{out} holds a checkpoint of an earlier run: use --resume to continue it, or another --out"
        )
    epochs = _Epochs(net, Path(store), specs, sizes, torch.as_tensor(y), settings, torch_device)
    base_rates = [settings.backbone_lr, settings.lr]  # the optimizer's groups, in order
    for epoch in range(start_epoch, settings.epochs):
        started = time.perf_counter()
        for group, rate in zip(optimizer.param_groups, base_rates, strict=True):  # cosine decay, by epoch
            group["lr"] = rate * 0.5 * (1 + math.cos(math.pi * epoch / settings.epochs))
        train_loss = epochs.run(epoch, train, optimizer, progress)
        val_loss = epochs.run(epoch, val, None, False) if len(val) else None
        monitored = val_loss if val_loss is not None else train_loss
        seconds = time.perf_counter() - started
        history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss, "seconds": seconds})
        if monitored < best["loss"]:
            best = {"epoch": epoch, "loss": monitored}
            state.save_best(net)
        state.save(net, optimizer, epoch, history, best)
        if epoch - best["epoch"] >= settings.patience:
            break
    state.restore_best(net)
    net = net.cpu()
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous() for k, v in backbone.model.state_dict().items()}, out / BACKBONE_FILE)
    identity = replace(metadata.embedding, weights_digest=file_digest(out / BACKBONE_FILE)).to_dict()
    fine = {"from_run": str(run), "store": str(store), **asdict(settings), "best_epoch": best["epoch"]}
    save_model(model.eval(), out, {**config, "store": identity, "fine_tune": fine})
    (out / "history.json").write_text(json.dumps(history, indent=2))
    return FineTuneResult(out, out / BACKBONE_FILE, best["epoch"], history, frozen)


def _inputs_of(run: Path, store, labels) -> tuple[Path, Path]:
    """The store and labels the run was trained on, unless given."""
    trained = json.loads((run / "settings.json").read_text()) if (run / "settings.json").is_file() else {}
    store = store or trained.get("store")
    labels = labels or trained.get("labels")
    if store is None or labels is None:
        raise OptionError(f"{run} does not record its store and labels: give --store and --labels")
    for path, option in ((store, "--store"), (labels, "--labels")):
        if not Path(path).exists():
            raise OptionError(f"{option} {path}: no such file or folder")
    return Path(store), Path(labels)


def _labelled_bags(specs: list, labels: Path, in_store: set, task) -> tuple[list, np.ndarray, np.ndarray]:
    from milcache.store import read_labels

    table = read_labels(labels)
    label_of = dict(zip(table["bag_id"].to_list(), table["label"].to_list(), strict=True))
    group_of = (
        dict(zip(table["bag_id"].to_list(), table["group"].to_list(), strict=True)) if "group" in table.columns else {}
    )
    chosen = [s for s in specs if s.bag_id in label_of and s.bag_id in in_store]
    if len(chosen) < 4:
        raise MilcacheError(
            f"only {len(chosen)} bag(s) are in the manifest, the labels and the store at once; "
            "fine-tuning needs 4 at least"
        )
    y = task.encode([label_of[s.bag_id] for s in chosen])
    groups = np.asarray([group_of.get(s.bag_id, s.bag_id) for s in chosen], dtype=object)
    return chosen, np.asarray(y), groups


def _split(y: np.ndarray, groups: np.ndarray, task, settings: FineTuneSettings) -> tuple[np.ndarray, np.ndarray]:
    from milcache.aggregator.splits import validation_split

    everything = np.arange(len(y))
    return validation_split(task.strata(y), groups, everything, settings.val_fraction, settings.seed)


def freeze(model: nn.Module, how: str) -> list[str]:
    """Freeze none, all, or the first N stages of ``model`` (timm's ``feature_info``: every parameter
    up to the end of stage N, stem included); returns the frozen parameters' names."""
    names = [n for n, _ in model.named_parameters()]
    if how == "none":
        cut = 0
    elif how == "all":
        cut = len(names)
    else:
        stages = [info["module"] for info in getattr(model, "feature_info", [])]
        wanted = int(how)
        if not 1 <= wanted <= len(stages):
            raise OptionError(f"--freeze {how}: this backbone has stages 1..{len(stages)} ({', '.join(stages)})")
        inside = [i for i, n in enumerate(names) if n.startswith(stages[wanted - 1] + ".")]
        later = [i for i, n in enumerate(names) if wanted < len(stages) and n.startswith(stages[wanted] + ".")]
        cut = later[0] if later else (inside[-1] + 1 if inside else 0)
    frozen = names[:cut]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name not in set(frozen))
    return frozen


class _EndToEnd(nn.Module):
    """Pixels of one bag's sampled instances → the head's output: the backbone embeds each instance
    (or, with ``pool_maps``, the instances' feature maps are pooled across the bag first)."""

    def __init__(self, backbone, model, source, pool_maps: str | None) -> None:
        super().__init__()
        self.backbone, self.model, self.source, self.pool_maps = backbone, model, source, pool_maps
        self.net = backbone.model

    def train(self, mode: bool = True):
        super().train(mode)
        for module in self.net.modules():  # batch statistics of a few instances would be noise
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    def forward(self, pixels: torch.Tensor):
        if self.pool_maps is None:
            embeddings = self.source.embed(pixels, self.backbone.embed, self.backbone)
        else:
            from milcache.extractor.sources import normalise_images

            maps = self.net.forward_features(normalise_images(pixels, self.backbone))
            if self.pool_maps == "mean":
                pooled = maps.mean(0, keepdim=True)
            elif self.pool_maps == "max":
                pooled = maps.amax(0, keepdim=True)
            else:
                pooled = torch.logsumexp(maps, 0, keepdim=True) - math.log(len(maps))
            embeddings = self.net.forward_head(pooled)
        x = embeddings.float().unsqueeze(0)
        if self.training:
            self._track_statistics(x[0].detach())
        return self.model(x, torch.ones(x.shape[:2], dtype=torch.bool, device=x.device))

    @torch.no_grad()
    def _track_statistics(self, embeddings: torch.Tensor) -> None:
        """The head standardises embeddings with the training split's statistics; as the backbone
        moves, they follow (an exponential average, as batch norm keeps its running statistics),
        so a feature that was nearly constant cannot blow the head's input up."""
        momentum = _STATISTICS_MOMENTUM
        mean, std = self.model.mean, self.model.std
        mean.lerp_(embeddings.mean(0), momentum)
        spread = (embeddings - mean).pow(2).mean(0).sqrt()
        std.lerp_(torch.maximum(spread, std.median() * 1e-2), momentum)


def _picks(specs: list, sizes: dict, indices: np.ndarray, k: int, seed: int, epoch: int) -> list[np.ndarray]:
    """K instances of each bag, drawn for this epoch (the same draw in a resumed run)."""
    rng = np.random.default_rng([seed, epoch])
    picks = [np.empty(0, np.int64)] * len(specs)
    for i in indices:
        n = sizes[specs[i].bag_id]
        picks[i] = np.sort(rng.choice(n, size=min(k, n), replace=False))
    return picks


@dataclass
class _Epochs:
    """What every epoch of a run shares; ``run`` makes one pass over some bags."""

    net: nn.Module
    store: Path
    specs: list
    sizes: dict[str, int]  # instances per bag, read once
    targets: torch.Tensor
    settings: FineTuneSettings
    device: torch.device

    def run(self, epoch: int, indices: np.ndarray, optimizer, progress: bool) -> float:
        """One pass over ``indices`` (training when an optimizer is given); the mean loss per bag."""
        return _epoch(self, epoch, indices, optimizer, progress)


def _epoch(run: _Epochs, epoch: int, indices: np.ndarray, optimizer, progress: bool) -> float:
    from tqdm import tqdm

    from milcache.devices import autocast, release_free_host_memory

    net, specs, targets, settings, device = run.net, run.specs, run.targets, run.settings, run.device
    picks = _picks(specs, run.sizes, indices, settings.instances, settings.seed + (0 if optimizer else 7919), epoch)
    order = np.random.default_rng([settings.seed, epoch, 1]).permutation(indices) if optimizer else indices
    loader = torch.utils.data.DataLoader(
        torch.utils.data.Subset(_Sampled(run.store, specs, picks), order.tolist()),
        batch_size=None,
        num_workers=settings.workers,
        worker_init_fn=_worker_init if settings.workers else None,
    )
    torch.manual_seed(settings.seed * 1000 + epoch)  # dropout: the same in a resumed run
    net.train(optimizer is not None)
    total, steps = 0.0, 0
    context = torch.enable_grad() if optimizer else torch.no_grad()
    bar = tqdm(total=len(order), desc=f"epoch {epoch + 1}", unit="bag", disable=not progress)
    if settings.workers:  # the workers fork anew each epoch, after the last one's training
        release_free_host_memory()
    with context:
        for i, pixels in loader:
            with autocast(device, settings.precision):
                out = net(pixels.to(device))
            loss = net.model.loss(out, targets[i : i + 1].to(device))
            total += float(loss.detach())
            steps += 1
            if optimizer is not None:
                (loss / settings.accumulate).backward()
                if steps % settings.accumulate == 0 or steps == len(order):
                    torch.nn.utils.clip_grad_norm_(net.parameters(), _CLIP_NORM)
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
            bar.update()
    bar.close()
    return total / max(steps, 1)


def _worker_init(_worker_id: int) -> None:
    from milcache.extractor.loop import _worker_init as extraction_worker_init

    extraction_worker_init(_worker_id)


_MAY_CHANGE_ON_RESUME = ("epochs", "patience", "workers")  # how long and how fast, not what is learnt


class _Checkpoint:
    """The last finished epoch (weights, optimizer, history) and the best weights so far, written
    atomically (a kill during the write leaves the previous checkpoint), with the ``identity`` of
    the fine-tuning they belong to (run, store, manifest, weights, settings)."""

    def __init__(self, folder: Path, identity: dict | None = None) -> None:
        self.folder = folder
        self.identity = json.loads(json.dumps(identity or {}))  # as it reads back

    def exists(self) -> bool:
        return (self.folder / "state.json").is_file()

    def save(self, net, optimizer, epoch: int, history: list, best: dict) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(_tensors(net), self.folder / "last.safetensors.tmp")
        torch.save(optimizer.state_dict(), self.folder / "optimizer.pt.tmp")
        record = {"epoch": epoch, "history": history, "best": best, "identity": self.identity}
        (self.folder / "state.json.tmp").write_text(json.dumps(record))
        for name in ("last.safetensors", "optimizer.pt", "state.json"):  # state.json last: it marks a whole set
            (self.folder / f"{name}.tmp").replace(self.folder / name)

    def save_best(self, net) -> None:
        from safetensors.torch import save_file

        self.folder.mkdir(parents=True, exist_ok=True)
        save_file(_tensors(net), self.folder / "best.safetensors.tmp")
        (self.folder / "best.safetensors.tmp").replace(self.folder / "best.safetensors")

    def load(self, net, optimizer) -> tuple[int, list, dict]:
        from safetensors.torch import load_file

        if not self.exists():
            raise MilcacheError(f"--resume: no checkpoint in {self.folder}")
        state = json.loads((self.folder / "state.json").read_text())
        theirs = state.get("identity", self.identity)  # checkpoints of earlier versions recorded none
        differing = sorted(k for k in set(theirs) | set(self.identity) if theirs.get(k) != self.identity.get(k))
        if differing:
            sides = "; ".join(
                f"{k}: checkpoint {theirs.get(k)!r}, this run {self.identity.get(k)!r}" for k in differing[:4]
            )
            raise MilcacheError(
                f"--resume: {self.folder} holds the checkpoint of another fine-tuning ({sides}); resume with "
                "the same model, store, manifest, weights and settings, or use another --out"
            )
        try:
            net.load_state_dict(load_file(self.folder / "last.safetensors"), strict=True)
            optimizer.load_state_dict(torch.load(self.folder / "optimizer.pt", weights_only=True))
        except (RuntimeError, ValueError, KeyError) as exc:  # tensors of another model
            reason = str(exc).splitlines()[0]
            raise MilcacheError(
                f"--resume: the checkpoint in {self.folder} does not fit this model ({reason})"
            ) from None
        return state["epoch"] + 1, state["history"], state["best"]

    def restore_best(self, net) -> None:
        from safetensors.torch import load_file

        if (self.folder / "best.safetensors").is_file():
            net.load_state_dict(load_file(self.folder / "best.safetensors"), strict=True)


def _tensors(net: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
