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


class ConvStem(nn.Module):
    """CTransPath's patch embedding: two stride-2 3 × 3 convolutions (batch norm, ReLU) and a 1 × 1
    projection instead of Swin's 4 × 4 patchify, in the shape timm's Swin asks of an embed layer."""

    def __init__(self, img_size=224, patch_size=4, in_chans=3, embed_dim=96, norm_layer=None, output_fmt="NHWC", **_):
        super().__init__()
        from timm.layers import to_2tuple

        if to_2tuple(patch_size) != (4, 4) or embed_dim % 8:
            raise ValueError("CTransPath's stem takes patch size 4 and an embedding dim divisible by 8")
        self.img_size, self.patch_size = to_2tuple(img_size), to_2tuple(patch_size)
        self.grid_size = (self.img_size[0] // 4, self.img_size[1] // 4)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        layers, width = [], embed_dim // 8
        for inputs, outputs in ((in_chans, width), (width, 2 * width)):
            layers += [
                nn.Conv2d(inputs, outputs, 3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(outputs),
                nn.ReLU(),
            ]
        self.proj = nn.Sequential(*layers, nn.Conv2d(2 * width, embed_dim, kernel_size=1))
        self.norm = norm_layer(embed_dim) if norm_layer else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # NHWC, as timm's Swin stages take it


@architecture("ctranspath_swin_tiny")
def ctranspath_swin_tiny(name: str, pretrained: bool = False, **kwargs) -> nn.Module:
    """CTransPath: timm's Swin-T/4 window 7 with the convolutional stem."""
    import timm

    if pretrained:
        raise ValueError("CTransPath's weights come from its checkpoint (--weights)")
    return timm.create_model("swin_tiny_patch4_window7_224", embed_layer=ConvStem, **kwargs)


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
