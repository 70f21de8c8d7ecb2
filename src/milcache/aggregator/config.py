"""Training hyper-parameters: a plain dataclass, importable without torch (the CLI reads its defaults)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

TASK_KINDS = ("binary", "multiclass", "ordinal", "regression")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run. The defaults were chosen to work from 50 bags of a few
    dozen instances to thousands of slides (see README, "Choosing defaults")."""

    head: str = "gated-attention"
    head_options: dict = field(default_factory=dict)
    epochs: int = 40
    lr: float = 2e-3
    weight_decay: float = 1e-2
    batch_size: int = 16  # bags per step
    instances: int | None = 1024  # random instances per bag per training step; None = all
    schedule: str = "cosine"  # or "constant"
    patience: int = 10  # epochs without validation-loss improvement before stopping
    val_fraction: float = 0.2  # of each training fold, held out for early stopping
    elastic_net: float = 0.0  # strength of the L1/L2 penalty on weight matrices
    l1_ratio: float = 0.5  # its L1 share
    class_weights: bool = False  # weight the loss by inverse class frequency
    balanced_sampling: bool = False  # draw each epoch's bags class-balanced (with replacement)
    max_tokens: int = 65536  # padded instances per batch (bags × longest bag)
    precision: str = "auto"  # "auto" (bf16 on CUDA), "bf16" or "fp32"
    seed: int = 0

    def to_dict(self) -> dict:
        return asdict(self)
