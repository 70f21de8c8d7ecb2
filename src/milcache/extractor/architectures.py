"""Encoder architectures timm does not have, built from timm's parts and found by name before timm's
own: each builder takes timm.create_model's arguments, and each model is a timm trunk plus what its
publisher put on top, with the publisher's tensor names so that their checkpoints load as they are."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {}


def architecture(name: str) -> Callable:
    def add(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        ARCHITECTURES[name] = builder
        return builder

    return add


class AttentionalPooler(nn.Module):
    """CoCa's attentional pooling: ``n_queries`` learnt queries attend over the trunk's tokens
    (keys and values layer-normed, multi-head), as CONCH's contrastive head does."""

    def __init__(self, d_model: int, context_dim: int, n_head: int = 8, n_queries: int = 1) -> None:
        super().__init__()
        self.query = nn.Parameter(torch.randn(n_queries, d_model))
        self.heads = n_head
        self.ln_k = nn.LayerNorm(context_dim)
        self.ln_q = nn.LayerNorm(d_model)
        self.to_q = nn.Linear(d_model, d_model, bias=False)
        self.to_kv = nn.Linear(context_dim, d_model * 2, bias=False)
        self.to_out = nn.Linear(d_model, d_model, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        batch = tokens.shape[0]
        q = self.to_q(self.ln_q(self.query)).expand(batch, -1, -1)
        k, v = self.to_kv(self.ln_k(tokens)).chunk(2, dim=-1)
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in (q, k, v))
        pooled = F.scaled_dot_product_attention(q, k, v)
        return self.to_out(pooled.transpose(1, 2).flatten(2))


class ConchVision(nn.Module):
    """CONCH v1.5's vision tower: a ViT-L/16 trunk with LayerScale, read at 448 px, whose tokens an
    attentional pooler (one query) and a LayerNorm turn into the 768-d image embedding."""

    def __init__(self, img_size: int = 448, in_chans: int = 3, **trunk_args) -> None:
        import timm

        super().__init__()
        trunk_args = {"init_values": 1.0, **trunk_args}
        self.trunk = timm.create_model(
            "vit_large_patch16_224", img_size=img_size, in_chans=in_chans, num_classes=0, **trunk_args
        )
        self.attn_pool_contrast = AttentionalPooler(d_model=768, context_dim=self.trunk.num_features)
        self.ln_contrast = nn.LayerNorm(768)
        self.num_features = 768
        self.default_cfg = {"input_size": (3, img_size, img_size), "mean": (0.485, 0.456, 0.406),
                            "std": (0.229, 0.224, 0.225), "interpolation": "bilinear", "crop_pct": 1.0}  # fmt: skip
        self.pretrained_cfg = self.default_cfg

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_contrast(self.attn_pool_contrast(self.trunk.forward_features(x))[:, 0])


@architecture("conch_v1_5_vision")
def conch_v1_5_vision(name: str, pretrained: bool = False, num_classes: int = 0, **kwargs) -> nn.Module:
    if pretrained:
        raise ValueError("CONCH v1.5's weights come from its checkpoint (--weights or the Hugging Face cache)")
    return ConchVision(**kwargs)


def dino_position_grid(pos_embed: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """A class-first position embedding (1 × (1 + s²) × D) resampled to ``grid`` as DINO and iBOT
    do at run time (bicubic by the scale factor (n + 0.1) / s, kept by CONCH v1.5's trunk)."""
    side = int(math.isqrt(pos_embed.shape[1] - 1))
    if (side, side) == tuple(grid):
        return pos_embed
    patches = pos_embed[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    scale = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
    patches = F.interpolate(patches.float(), scale_factor=scale, mode="bicubic").to(pos_embed.dtype)
    return torch.cat([pos_embed[:, :1], patches.permute(0, 2, 3, 1).flatten(1, 2)], dim=1)
