"""Training hyper-parameters: a plain dataclass, importable without torch (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from milcache import checks
from milcache.errors import OptionError

TASK_KINDS = ("binary", "multiclass", "ordinal", "regression", "survival")
# Every metric a task can report (binary / multiclass: the first five, ordinal adds kappa,
# regression: mse, r2, pearson_r; survival: Harrell's and Uno's concordance, and with the discrete-time
# loss the integrated Brier score and time-dependent AUC), and those that are better when lower.
METRICS = (
    "auc",
    "accuracy",
    "balanced_accuracy",
    "f1",
    "log_loss",
    "kappa",
    "mse",
    "r2",
    "pearson_r",
    "c_index",
    "uno_c",
    "ibs",
    "td_auc",
)
MINIMISED = ("log_loss", "mse", "ibs")
# Survival losses (Cox partial likelihood, discrete-time likelihood) and the Cox loss's handling of ties.
SURVIVAL_LOSSES = ("cox", "nll")
TIES = ("efron", "breslow")
# Where a cohort's embeddings live while training: picked by size, or forced.
REGIMES = ("auto", "gpu", "host", "stream")
# Training precisions (fp16 needs loss scaling, which training does not do).
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")
# How the optimizer applies weight decay: "adam" adds it to the gradient as an L2 term (torch's Adam, the
# MIL literature's recipe), "adamw" decays the weights apart from the gradient (torch's AdamW).
OPTIMIZERS = ("adam", "adamw")
# How fine-tuning may pool the instances' feature maps across a bag (--pool-maps).
POOL_MAPS = ("mean", "max", "lse")


# How the defaults were chosen: bench/quality.py (README, "Choosing defaults").
STEPS_PER_EPOCH = 32  # the automatic batch size aims at this many optimizer steps per epoch …
BATCH_RANGE = (2, 16)  # … within these bags per step


# What a field that a stored configuration lacks meant before the field existed.
_PREDATED = {"optimizer": "adamw"}


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. ``None`` means "chosen from the cohort" (see
    ``resolve``); the defaults were calibrated on open MIL benchmarks (README, "Choosing defaults")."""

    head: str = "gated-attention"
    head_options: dict = field(default_factory=dict)
    epochs: int = 25
    lr: float = 2e-3
    optimizer: str = "adam"  # one of OPTIMIZERS
    weight_decay: float = 5e-4  # an L2 term in the gradient (adam) or a decoupled decay (adamw)
    batch_size: int | None = None  # bags per step; None: about 32 steps an epoch, 2 to 16 bags
    instances: int | None = 1024  # random instances per bag per training step; None = all
    schedule: str = "cosine"  # or "constant"
    patience: int = 10  # epochs without validation-loss improvement before stopping
    val_fraction: float = 0.0  # of each training fold held out for early stopping; 0: fixed epochs
    elastic_net: float = 0.0  # strength of the L1/L2 penalty on weight matrices
    l1_ratio: float = 0.5  # its L1 share
    class_weights: bool = False  # weight the loss by inverse class frequency
    balanced_sampling: bool = False  # draw each epoch's bags class-balanced (with replacement)
    max_tokens: int = 65536  # padded instances per batch (bags × longest), lowered to fit memory_budget
    memory_budget: int | None = None  # bytes a training step may use; None: from the device (memory.py)
    precision: str = "auto"  # one of TRAIN_PRECISIONS (devices.autocast says what auto means)
    seed: int = 0

    def __post_init__(self) -> None:
        """Refuse values that would otherwise be read as something else (0 epochs, a negative lr)."""
        if self.val_fraction is None:  # "chosen from the cohort" in older studies' trials: now fixed epochs
            self.val_fraction = 0.0
        checks.at_least("--epochs", self.epochs, 1)
        checks.above("--lr", self.lr, 0)
        checks.one_of("--optimizer", self.optimizer, OPTIMIZERS)
        checks.at_least("--weight-decay", self.weight_decay, 0)
        checks.at_least("--batch-size", self.batch_size, 1)
        checks.at_least("--instances", self.instances, 1)
        checks.one_of("--schedule", self.schedule, ("cosine", "constant"))
        checks.at_least("--patience", self.patience, 1)
        checks.within("--val-fraction", self.val_fraction, 0.0, 0.5)
        checks.at_least("--elastic-net", self.elastic_net, 0)
        checks.within("--l1-ratio", self.l1_ratio, 0.0, 1.0)
        checks.at_least("max_tokens", self.max_tokens, 1)
        checks.at_least("--memory-budget", self.memory_budget, 1 << 20)
        checks.one_of("precision", self.precision, TRAIN_PRECISIONS)
        if not isinstance(self.head_options, dict):
            raise OptionError(f"head options must be a mapping of option names to values, got {self.head_options!r}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_stored(cls, stored: dict) -> TrainConfig:
        """A configuration that an earlier milcache recorded (a study's trials, a run's config.json),
        read as it was meant: fields it predates take the value that was its behaviour then, not
        today's default (before ``optimizer`` existed, weight decay was AdamW's)."""
        known = {k: v for k, v in stored.items() if k in cls.__dataclass_fields__}
        return cls(**{**_PREDATED, **known})

    def resolve(self, training_bags: int) -> TrainConfig:
        """This configuration with the cohort-dependent choice made for folds of ``training_bags``:
        small cohorts get more optimizer steps per epoch."""
        batch_size = self.batch_size
        if batch_size is None:
            batch_size = int(min(max(round(training_bags / STEPS_PER_EPOCH), BATCH_RANGE[0]), BATCH_RANGE[1]))
        return replace(self, batch_size=batch_size)


@dataclass
class FineTuneSettings:
    """Settings of `milcache fine-tune` (aggregator/finetune.py); importable without torch like TrainConfig."""

    epochs: int = 10
    instances: int = 16  # sampled per bag per step, re-read from the images
    freeze: str = "none"  # none, all, or N: the first N stages of timm's feature_info
    lr: float = 1e-4  # the head's learning rate
    backbone_lr: float = 1e-5
    weight_decay: float = 1e-4
    accumulate: int = 4  # bags per optimizer step (gradients accumulated over them)
    val_fraction: float = 0.2  # of the bags, grouped like train-head's, for early stopping
    patience: int = 3
    pool_maps: str | None = None  # mean / max / lse: pool the instances' feature maps across the bag
    checkpointing: bool = False  # gradient checkpointing in the backbone (timm's set_grad_checkpointing)
    precision: str = "auto"  # devices.autocast: bf16 on CUDA
    workers: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        checks.at_least("--epochs", self.epochs, 1)
        checks.at_least("--instances", self.instances, 1)
        checks.above("--lr", self.lr, 0)
        checks.at_least("--backbone-lr", self.backbone_lr, 0)
        checks.at_least("--weight-decay", self.weight_decay, 0)
        checks.at_least("--accumulate", self.accumulate, 1)
        checks.within("--val-fraction", self.val_fraction, 0.0, 0.5)
        checks.at_least("--patience", self.patience, 1)
        checks.one_of("--pool-maps", self.pool_maps, (None, *POOL_MAPS))
        checks.one_of("--precision", self.precision, TRAIN_PRECISIONS)
        checks.at_least("--workers", self.workers, 0)
        if self.freeze not in ("none", "all") and not str(self.freeze).isdigit():
            raise OptionError(f"--freeze takes none, all or a number of stages, got {self.freeze!r}")
