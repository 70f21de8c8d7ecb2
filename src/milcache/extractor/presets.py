"""Encoder presets: the patch encoders computational pathology runs on, as their model cards define
them (architecture and its arguments, input size and crop, interpolation, mean / std, token rule),
each built as timm's equivalent architecture. ``milcache encoders`` prints this table; the README's
table is generated from it.

A preset takes its weights from a local file or folder (``--weights``) or from the model's
repository in an already-filled Hugging Face cache (``--pretrained`` or ``--backbone hf-hub:ORG/NAME``);
nothing is downloaded. Models published in transformers' layout (Phikon-v2, Hibou, Midnight) load
through a key map onto the timm architecture with identical outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from milcache.registry import Registry

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
H_OPTIMUS = ((0.707223, 0.578729, 0.703617), (0.211883, 0.230117, 0.177517))
HIBOU = ((0.7068, 0.5755, 0.722), (0.195, 0.2316, 0.1816))
LUNIT = ((0.70322989, 0.53606487, 0.66096631), (0.21716536, 0.26081574, 0.20723464))

# Architecture arguments shared by several cards, in JSON (layer classes by name).
_SWIGLU = {"mlp_layer": "swiglu_packed", "act_layer": "silu"}
_VIRCHOW = {
    "img_size": 224,
    "init_values": 1e-5,
    "mlp_ratio": 5.3375,
    "global_pool": "",
    "dynamic_img_size": True,
    **_SWIGLU,
}
_H_OPTIMUS = {"img_size": 224, "init_values": 1e-5, "global_pool": "token", "dynamic_img_size": False}


@dataclass(frozen=True)
class Preset:
    name: str
    title: str
    architecture: str  # timm's name of the equivalent architecture
    args: dict
    dim: int
    params: str  # the published parameter count, as the model card rounds it ("303M", "1.1B")
    licence: str
    hub: str | None  # the Hugging Face repository of the weights
    magnification: str = "20x (0.5 µm/px)"
    input_size: int = 224
    crop_pct: float = 1.0
    interpolation: str = "bilinear"
    norm: tuple = IMAGENET
    token_rule: str = "cls"
    key_map: str = "timm"
    weight_files: tuple[str, ...] = field(default_factory=tuple)

    def data(self) -> dict:
        return {
            "input_size": (self.input_size, self.input_size),
            "mean": self.norm[0],
            "std": self.norm[1],
            "interpolation": self.interpolation,
            "crop_pct": self.crop_pct,
        }

    def weights_from(self) -> str:
        return f"huggingface.co/{self.hub}" if self.hub else "the authors' release"

    def published_parameters(self) -> float:
        number, unit = float(self.params[:-1]), self.params[-1]
        return number * {"M": 1e6, "B": 1e9}[unit]


PRESETS: Registry[Preset] = Registry("encoder preset")


def add(preset: Preset) -> None:
    PRESETS.add(preset.name, preset)


def preset_for_hub(repo_id: str) -> Preset | None:
    """The preset whose weights live in ``repo_id`` (case-insensitive, as the hub's names are)."""
    return next(
        (PRESETS.get(n) for n in PRESETS.names() if (PRESETS.get(n).hub or "").lower() == repo_id.lower()), None
    )


add(
    Preset(
        "uni",
        "UNI (Mahmood lab)",
        "vit_large_patch16_224",
        {"img_size": 224, "patch_size": 16, "init_values": 1e-5, "dynamic_img_size": True},
        dim=1024,
        params="303M",
        licence="CC-BY-NC-ND-4.0",
        hub="MahmoodLab/UNI",
    )
)
add(
    Preset(
        "uni2-h",
        "UNI2-h (Mahmood lab)",
        "vit_giant_patch14_224",
        {
            "img_size": 224,
            "patch_size": 14,
            "depth": 24,
            "num_heads": 24,
            "init_values": 1e-5,
            "embed_dim": 1536,
            "mlp_ratio": 2.66667 * 2,
            "no_embed_class": True,
            "reg_tokens": 8,
            "dynamic_img_size": True,
            **_SWIGLU,
        },
        dim=1536,
        params="681M",
        licence="CC-BY-NC-ND-4.0",
        hub="MahmoodLab/UNI2-h",
    )
)
add(
    Preset(
        "conch-v1.5",
        "CONCH v1.5 vision tower (Mahmood lab)",
        "conch_v1_5_vision",
        {"img_size": 448},
        dim=768,
        params="0.3B",
        licence="CC-BY-NC-ND-4.0",
        hub="MahmoodLab/conchv1_5",
        input_size=448,
        token_rule="pooled",
        key_map="conch-v1.5",
        weight_files=("pytorch_model_vision.bin",),
    )
)
add(
    Preset(
        "ctranspath",
        "CTransPath (Wang et al. 2022)",
        "ctranspath_swin_tiny",
        {"img_size": 224},
        dim=768,
        params="28M",
        licence="GPL-3.0",
        hub=None,
        magnification="see the paper",
        token_rule="pooled",
        key_map="swin-v1",
        weight_files=("ctranspath.pth", "CHIEF_CTransPath.pth"),
    )
)
add(
    Preset(
        "virchow",
        "Virchow (Paige)",
        "vit_huge_patch14_224",
        _VIRCHOW,
        dim=2560,
        params="632M",
        licence="Apache-2.0",
        hub="paige-ai/Virchow",
        interpolation="bicubic",
        token_rule="cls+mean",
    )
)
add(
    Preset(
        "virchow2",
        "Virchow2 (Paige)",
        "vit_huge_patch14_224",
        {**_VIRCHOW, "reg_tokens": 4},
        dim=2560,
        params="632M",
        licence="CC-BY-NC-ND-4.0",
        hub="paige-ai/Virchow2",
        magnification="5x-40x",
        interpolation="bicubic",
        token_rule="cls+mean",
    )
)
add(
    Preset(
        "h-optimus-0",
        "H-optimus-0 (Bioptimus)",
        "vit_giant_patch14_reg4_dinov2",
        _H_OPTIMUS,
        dim=1536,
        params="1.1B",
        licence="Apache-2.0",
        hub="bioptimus/H-optimus-0",
        norm=H_OPTIMUS,
    )
)
add(
    Preset(
        "h-optimus-1",
        "H-optimus-1 (Bioptimus)",
        "vit_giant_patch14_reg4_dinov2",
        _H_OPTIMUS,
        dim=1536,
        params="1.1B",
        licence="non-commercial (model card)",
        hub="bioptimus/H-optimus-1",
        norm=H_OPTIMUS,
    )
)
add(
    Preset(
        "prov-gigapath",
        "Prov-GigaPath tile encoder (Providence, Microsoft)",
        "vit_giant_patch14_dinov2",
        {
            "img_size": 224,
            "patch_size": 16,
            "embed_dim": 1536,
            "depth": 40,
            "num_heads": 24,
            "mlp_ratio": 5.33334,
            "init_values": 1e-5,
            "dynamic_img_size": True,
        },
        dim=1536,
        params="1.13B",
        licence="Apache-2.0",
        hub="prov-gigapath/prov-gigapath",
        interpolation="bicubic",
        crop_pct=224 / 256,
    )
)
add(
    Preset(
        "phikon-v2",
        "Phikon-v2 (Owkin)",
        "vit_large_patch16_224",
        {"img_size": 224, "init_values": 1e-5},
        dim=1024,
        params="303M",
        licence="Owkin non-commercial",
        hub="owkin/phikon-v2",
        key_map="dinov2-hf",
    )
)
for _size, _arch, _dim, _params in (
    ("vits16", "vit_small_patch16_224", 384, "22M"),
    ("vits8", "vit_small_patch8_224", 384, "22M"),
    ("vitb16", "vit_base_patch16_224", 768, "86M"),
    ("vitb8", "vit_base_patch8_224", 768, "86M"),
    ("vitl14", "vit_large_patch14_reg4_dinov2", 1024, "304M"),
):
    add(
        Preset(
            f"kaiko-{_size}",
            f"Kaiko ViT-{_size[3].upper()}/{_size[4:]} (kaiko.ai)",
            _arch,
            {"img_size": 518 if _size == "vitl14" else 224, "dynamic_img_size": True},
            dim=_dim,
            params=_params,
            licence="kaiko.ai non-commercial",
            hub=f"1aurent/{_arch}.kaiko_ai_towards_large_pathology_fms",
            magnification="5x-40x",
            norm=HALF,
        )
    )
add(
    Preset(
        "lunit-vits8",
        "Lunit DINO ViT-S/8 (Lunit)",
        "vit_small_patch8_224",
        {"img_size": 224, "dynamic_img_size": True},
        dim=384,
        params="22M",
        licence="Lunit non-commercial",
        hub="1aurent/vit_small_patch8_224.lunit_dino",
        interpolation="bicubic",
        norm=LUNIT,
    )
)
add(
    Preset(
        "hibou-b",
        "Hibou-B (HistAI)",
        "vit_base_patch14_reg4_dinov2",
        {"img_size": 224},
        dim=768,
        params="86M",
        licence="Apache-2.0",
        hub="histai/hibou-b",
        interpolation="bicubic",
        norm=HIBOU,
        key_map="dinov2-hf",
    )
)
add(
    Preset(
        "hibou-l",
        "Hibou-L (HistAI)",
        "vit_large_patch14_reg4_dinov2",
        {"img_size": 224},
        dim=1024,
        params="304M",
        licence="Apache-2.0",
        hub="histai/hibou-L",
        interpolation="bicubic",
        norm=HIBOU,
        key_map="dinov2-hf",
    )
)
add(
    Preset(
        "midnight-12k",
        "Midnight-12k (kaiko.ai)",
        "vit_giant_patch14_dinov2",
        {"img_size": 224},
        dim=3072,
        params="1.1B",
        licence="MIT",
        hub="kaiko-ai/midnight",
        magnification="5x-40x",
        norm=HALF,
        token_rule="cls+mean",
        key_map="dinov2-hf",
    )
)
add(
    Preset(
        "gpfm",
        "GPFM (HKUST)",
        "vit_large_patch14_dinov2",
        {"img_size": 224, "init_values": 1e-5, "dynamic_img_size": True},
        dim=1024,
        params="304M",
        licence="see the model card",
        hub="majiabo/GPFM",
        interpolation="bicubic",
        weight_files=("GPFM.pth",),
    )
)


def preset_rows() -> list[dict]:
    """One row per preset: what ``milcache encoders`` prints and the README's table shows."""
    return [
        {
            "name": p.name,
            "model": p.title,
            "dim": p.dim,
            "parameters": p.params,
            "input": f"{p.input_size}" + (f" (crop of {round(p.input_size / p.crop_pct)})" if p.crop_pct != 1 else ""),
            "magnification": p.magnification,
            "token rule": p.token_rule,
            "licence": p.licence,
            "weights": p.weights_from(),
        }
        for p in (PRESETS.get(n) for n in PRESETS.names())
    ]


def preset_table_markdown() -> str:
    """The preset table as Markdown: README.md holds this text between its ``presets`` markers (a
    test keeps them equal)."""
    rows = preset_rows()
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    lines += ["| " + " | ".join(f"`{r[c]}`" if c == "name" else str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)
