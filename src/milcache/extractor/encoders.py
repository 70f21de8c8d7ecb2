"""Encoders: the models that turn an instance's pixels into its embedding, and one ``create_encoder``.

A name is one of
* a preset (``uni2-h``, ``virchow2``, ``h-optimus-0`` …; ``milcache encoders`` lists them): the
  architecture, its arguments, preprocessing and token rule as the model card gives them;
* a timm name (``resnet50``, ``vit_large_patch16_224``), with architecture arguments if needed;
* ``hf-hub:ORG/NAME``: a model in an already-filled Hugging Face cache (a preset's repository, or
  any model in timm's layout);
* ``local-dir:FOLDER``: timm's layout for a local model (config.json with ``architecture``,
  ``model_args`` and ``pretrained_cfg``, beside the weights);
* ``tv:r3d_18`` … (torchvision's 3D ResNets, for volumes), or a family a plugin registers.

Nothing is downloaded. Weights load strictly: after a declared key map (the vendor's layout onto
timm's), every tensor of the model must be filled and every tensor of the file used, or the user is
told which were not.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from milcache.errors import ExtractionError, OptionError
from milcache.registry import Registry
from milcache.store.spec import DEFAULT_TOKEN_RULE, EmbeddingSpec

# Families of models by name prefix ("timm" when a name has none); other packages can add one
# through the ``milcache.backbones`` entry-point group.
FAMILIES: Registry[Callable[..., Encoder]] = Registry("encoder family", entry_point_group="milcache.backbones")
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_pytorch_model.bin")
# How a transformer's output tokens become one embedding. "pooled": the model's own head (timm's
# global_pool; a CNN's average); "cls": the class token; "mean": the mean of the patch tokens;
# "cls+mean": both, concatenated (Virchow, Midnight). Register tokens are never patches.
TOKEN_RULES = (DEFAULT_TOKEN_RULE, "cls", "mean", "cls+mean")
INTERPOLATIONS = ("bilinear", "bicubic")


@dataclass
class Encoder:
    """A model that maps normalised images (B × C × H × W) to embeddings (B × dim), with everything
    that fixes what those embeddings mean."""

    model: nn.Module
    name: str
    dim: int
    input_size: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0  # resize to input / crop_pct, then crop the centre (timm's crop_pct)
    token_rule: str = DEFAULT_TOKEN_RULE
    args: dict = field(default_factory=dict)  # architecture arguments, as recorded (JSON)
    weights_digest: str = "random-init"
    extra: dict = field(default_factory=dict)
    _normalisation: dict = field(default_factory=dict, repr=False, compare=False)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Embeddings of a model-ready batch, by the encoder's token rule."""
        if self.token_rule == DEFAULT_TOKEN_RULE:
            return self.model(x)
        return pool_tokens(self.model.forward_features(x), self.token_rule, self.model.num_prefix_tokens)

    def normalisation(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std as 1 × C × 1 × 1 tensors on ``device``, built once per device."""
        if device not in self._normalisation:
            shape = (1, -1, 1, 1)
            mean = torch.tensor(self.mean, dtype=torch.float32, device=device).view(shape)
            self._normalisation[device] = (mean, torch.tensor(self.std, dtype=torch.float32, device=device).view(shape))
        return self._normalisation[device]

    def preprocessing(self) -> dict:
        """What store.json records, so that the preprocessing can be rebuilt from the store alone."""
        return {
            "input_size": list(self.input_size),
            "mean": list(self.mean),
            "std": list(self.std),
            "interpolation": self.interpolation,
            **({"crop_pct": self.crop_pct} if self.crop_pct != 1.0 else {}),
            **self.extra,
        }

    def spec(self, source: dict) -> EmbeddingSpec:
        """The embedding spec of this encoder reading ``source`` (its settings)."""
        return EmbeddingSpec(
            encoder=self.name,
            dim=self.dim,
            weights_digest=self.weights_digest,
            encoder_args=self.args,
            preprocessing=self.preprocessing(),
            token_rule=self.token_rule,
            source=source,
        )


def pool_tokens(tokens: torch.Tensor, rule: str, prefix: int) -> torch.Tensor:
    """One embedding per image from a transformer's output tokens (B × N × D); ``prefix`` tokens
    (class token, then registers) come first."""
    if rule == "cls":
        return tokens[:, 0]
    if rule == "mean":
        return tokens[:, prefix:].mean(1)
    return torch.cat([tokens[:, 0], tokens[:, prefix:].mean(1)], dim=-1)


def register_family(prefix: str) -> Callable:
    return FAMILIES.register(prefix)


def create_encoder(
    name: str,
    weights: str | Path | None = None,
    pretrained: bool = False,
    *,
    args: dict | None = None,
    token_rule: str | None = None,
    device: str | torch.device | None = None,
    **overrides,
) -> Encoder:
    """Build an encoder by name (see the module's docstring). ``args``: architecture arguments on
    top of the preset's or config's; ``overrides``: preprocessing (``input_size``, ``mean``,
    ``std``, ``interpolation``, ``crop_pct``) and ``in_chans``; ``device="meta"`` builds the
    architecture without memory or weights (to count parameters)."""
    from milcache.extractor.presets import PRESETS

    if token_rule is not None and token_rule not in TOKEN_RULES:
        raise OptionError(f"--token-rule must be one of {', '.join(TOKEN_RULES)}, not {token_rule!r}")
    options = {"args": dict(args or {}), "token_rule": token_rule, "device": device, **overrides}
    if name in PRESETS:
        return build_timm(preset_blueprint(PRESETS.get(name), weights, pretrained), **options)
    prefix, _, rest = name.partition(":") if ":" in name else ("timm", "", name)
    if prefix not in FAMILIES:
        raise ExtractionError(
            f"unknown encoder {name!r}: not a preset ({', '.join(PRESETS.names())}) nor a family prefix "
            f"({', '.join(p + ':' for p in FAMILIES.names() if p != 'timm')}) nor a timm model name"
        )
    return FAMILIES.get(prefix)(rest, weights=weights, pretrained=pretrained, **options)


# --- how a model is described before it is built --------------------------------------------------


@dataclass
class Blueprint:
    """Everything needed to build an encoder: the timm architecture and its arguments, the data
    settings (timm's pretrained_cfg: input_size, mean, std, interpolation, crop_pct), the token rule,
    and where the weights come from and in which key layout."""

    name: str  # what the embedding spec records
    architecture: str
    args: dict = field(default_factory=dict)
    data: dict = field(default_factory=dict)
    token_rule: str = DEFAULT_TOKEN_RULE
    weights: Path | None = None
    key_map: str = "timm"
    pretrained: bool = False  # timm's own pretrained weights, from the local cache


def preset_blueprint(preset, weights: str | Path | None, pretrained: bool) -> Blueprint:
    """A preset's blueprint; its weights from ``weights`` (a file or folder) or, with ``pretrained``,
    from its repository in the Hugging Face cache. A preset never runs with random weights."""
    if weights is None:
        if not pretrained:
            raise ExtractionError(
                f"--backbone {preset.name}: give its weights with --weights (a file or folder; from "
                f"{preset.weights_from()}) or use --pretrained for the copy in your Hugging Face cache"
            )
        weights = hub_folder(preset.hub)
    path = weights_file(Path(weights), preset.weight_files)
    return Blueprint(
        name=preset.name,
        architecture=preset.architecture,
        args=dict(preset.args),
        data=preset.data(),
        token_rule=preset.token_rule,
        weights=path,
        key_map=preset.key_map,
    )


def hub_folder(repo_id: str | None) -> Path:
    """The snapshot folder of ``repo_id`` in the local Hugging Face cache; never downloads."""
    from huggingface_hub import snapshot_download

    if not repo_id or repo_id.count("/") != 1:
        raise ExtractionError(f"hf-hub:{repo_id}: expected hf-hub:ORG/NAME")
    # The environment is read now, not when huggingface_hub was imported.
    home = os.environ.get("HF_HOME")
    cache = os.environ.get("HF_HUB_CACHE") or (str(Path(home) / "hub") if home else None)
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except Exception as exc:  # the hub raises several kinds for "not in the cache"
        cache = cache or "~/.cache/huggingface/hub"
        raise ExtractionError(
            f"hf-hub:{repo_id} is not in the local Hugging Face cache ({cache}; {type(exc).__name__}); "
            f"fill it first (`hf download {repo_id}` on a machine with access) or pass the files with --weights"
        ) from None


def weights_file(path: Path, preferred: tuple[str, ...] = ()) -> Path:
    """The weights file of ``path``: the file itself, or the first known weights file of a folder."""
    if not path.exists():
        raise ExtractionError(f"{path}: weights file missing")
    if path.is_file():
        return path
    names = (*preferred, *WEIGHT_FILES)
    found = next((path / f for f in names if (path / f).is_file()), None)
    if found is None:
        raise ExtractionError(f"{path}: no {', '.join(dict.fromkeys(names))} in this folder")
    return found


def folder_blueprint(folder: Path, name: str) -> Blueprint:
    """A model in timm's local layout: config.json (``architecture``, ``model_args``,
    ``pretrained_cfg``, ``global_pool``) beside its weights."""
    import json

    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ExtractionError(f"{name}: {folder} has no config.json (timm's layout: architecture, model_args, …)")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ExtractionError(f"{config_path}: cannot read ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        raise ExtractionError(
            f"{config_path}: not timm's layout (no 'architecture'); a transformers model needs a preset "
            "(milcache encoders) or its timm architecture with --backbone-args"
        )
    args = dict(config.get("model_args") or {})
    if "global_pool" in config:
        args.setdefault("global_pool", config["global_pool"])
    data = {k: v for k, v in (config.get("pretrained_cfg") or {}).items() if k in _DATA_KEYS}
    return Blueprint(
        name=config["architecture"],
        architecture=config["architecture"],
        args=args,
        data=data,
        weights=weights_file(folder),
    )


_DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct")


# --- building ---------------------------------------------------------------------------------------


def build_timm(
    blueprint: Blueprint,
    *,
    args: dict,
    token_rule: str | None,
    device: str | torch.device | None,
    in_chans: int = 3,
    **preprocessing,
) -> Encoder:
    """Build the timm model of ``blueprint`` (its arguments updated by ``args``), load its weights
    strictly, and settle its preprocessing (``preprocessing`` overrides the blueprint's data)."""
    import timm

    from milcache.extractor.architectures import ARCHITECTURES

    args = {**blueprint.args, **args}
    known = blueprint.architecture in ARCHITECTURES or timm.list_models(blueprint.architecture)
    if not known and blueprint.architecture not in timm.list_models(pretrained=True):
        raise ExtractionError(f"unknown timm model {blueprint.architecture!r}; see `timm.list_models()` for the names")
    meta = torch.device(device).type == "meta" if device is not None else False
    if blueprint.pretrained:  # only from an already-filled cache: never from the network
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
    loaded = blueprint.weights is not None and not meta
    # A model whose weights come from a file is built without initialising them (a ViT-g's random
    # initialisation costs more than reading its checkpoint), unless it has buffers no file holds.
    model = _create(blueprint, args, in_chans, on_meta=meta or loaded)
    if loaded and set(dict(model.named_buffers())) - set(model.state_dict()):
        model = _create(blueprint, args, in_chans, on_meta=False)
    digest = "random-init"
    if loaded:
        state = map_keys(blueprint.key_map, read_checkpoint(blueprint.weights), model)
        load_strictly(model, state, what=str(blueprint.weights), into=blueprint.name)
        digest = file_digest(blueprint.weights)
    elif blueprint.pretrained:
        digest = f"timm-pretrained:{blueprint.architecture}"
    rule = token_rule or blueprint.token_rule
    data = resolved_data(model, blueprint.data, preprocessing)
    return Encoder(
        model=model.eval(),
        name=blueprint.name,
        dim=embedding_dim(model, rule),
        token_rule=rule,
        args=args,
        weights_digest=digest,
        extra={} if in_chans == 3 else {"in_chans": in_chans},
        **data,
    )


def _create(blueprint: Blueprint, args: dict, in_chans: int, *, on_meta: bool) -> nn.Module:
    import timm

    from milcache.extractor.architectures import ARCHITECTURES

    torch.manual_seed(0)  # random-weight models (tests, demos) are then the same in every run
    create = ARCHITECTURES.get(blueprint.architecture, timm.create_model)
    try:
        with torch.device("meta" if on_meta else "cpu"):
            return create(
                blueprint.architecture,
                pretrained=blueprint.pretrained and not on_meta,
                num_classes=0,
                in_chans=in_chans,
                **layer_arguments(args),
            )
    except ExtractionError:
        raise
    except RuntimeError as exc:
        if on_meta and "meta" in str(exc):  # older timm (1.0.20 and before) reads tensor values while building
            return _create(blueprint, args, in_chans, on_meta=False)
        raise _cannot_build(blueprint, args, exc) from None
    except Exception as exc:  # timm raises many kinds for arguments an architecture does not take
        raise _cannot_build(blueprint, args, exc) from None


def _cannot_build(blueprint: Blueprint, args: dict, exc: Exception) -> ExtractionError:
    hint = "; with --pretrained the weights must be in the local cache (or give --weights)"
    return ExtractionError(
        f"cannot build {blueprint.architecture!r} with arguments {args}: {type(exc).__name__}: {exc}"
        + (hint if blueprint.pretrained else "")
    )


def embedding_dim(model: nn.Module, rule: str) -> int:
    if rule == DEFAULT_TOKEN_RULE:
        return int(model.num_features)
    if not hasattr(model, "num_prefix_tokens") or getattr(model, "global_pool", None) == "map":
        raise OptionError(f"token rule {rule!r} needs a transformer with a class token; this model has none")
    return int(model.num_features) * (2 if rule == "cls+mean" else 1)


def resolved_data(model: nn.Module, data: dict, overrides: dict) -> dict:
    """Input size, mean, std, interpolation and crop: the user's overrides, else the blueprint's,
    else timm's data config of the model."""
    from timm.data import resolve_data_config

    config = resolve_data_config({}, model=model)
    chosen = {**config, **{k: v for k, v in data.items() if v is not None}}
    chosen.update({k: v for k, v in overrides.items() if v is not None})
    size = chosen["input_size"]
    size = size[-2:] if len(size) == 3 else size
    interpolation = chosen.get("interpolation") or "bicubic"
    return {
        "input_size": (int(size[0]), int(size[1])),
        "mean": tuple(float(v) for v in chosen["mean"]),
        "std": tuple(float(v) for v in chosen["std"]),
        "interpolation": interpolation if interpolation in INTERPOLATIONS else "bicubic",
        # the user's or the card's crop; timm's default crop_pct is an ImageNet evaluation habit
        "crop_pct": float(overrides.get("crop_pct") or data.get("crop_pct") or 1.0),
    }


# Layer classes named in JSON (presets, config files, --backbone-args) by these strings.
def _mlp_layers() -> dict:
    from timm.layers import GluMlp, Mlp, SwiGLU, SwiGLUPacked

    return {"mlp": Mlp, "glu": GluMlp, "swiglu": SwiGLU, "swiglu_packed": SwiGLUPacked}


def layer_arguments(args: dict) -> dict:
    """``args`` with layer names turned into the classes timm takes (``mlp_layer="swiglu_packed"``,
    ``act_layer="silu"``, ``norm_layer="layernorm"``)."""
    from timm.layers import get_act_layer, get_norm_layer

    resolved = dict(args)
    if isinstance(resolved.get("mlp_layer"), str):
        layers = _mlp_layers()
        if resolved["mlp_layer"] not in layers:
            raise OptionError(f"mlp_layer {resolved['mlp_layer']!r}: choose one of {', '.join(layers)}")
        resolved["mlp_layer"] = layers[resolved["mlp_layer"]]
    for key, lookup in (("act_layer", get_act_layer), ("norm_layer", get_norm_layer)):
        if isinstance(resolved.get(key), str):
            try:
                resolved[key] = lookup(resolved[key])
            except Exception:  # timm raises KeyError / ValueError / AssertionError by version
                raise OptionError(f"{key} {resolved[key]!r} is not a layer timm knows") from None
    return resolved


# --- weights ------------------------------------------------------------------------------------------


def file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for file in files:
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 22), b""):
                digest.update(block)
    return "sha256:" + digest.hexdigest()


_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "teacher")
_WRAPPER_PREFIXES = ("module.", "backbone.")


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file (safetensors, or a weights-only torch file: never unpickling
    arbitrary objects), unwrapped from a training checkpoint's ``state_dict`` / ``model`` /
    ``teacher`` entry and DDP's ``module.`` or a DINO ``backbone.`` prefix."""
    path = weights_file(Path(path))
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(path)
        except (SafetensorError, OSError) as exc:
            raise ExtractionError(f"{path}: cannot load as safetensors ({exc})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises many kinds; all mean "not a plain tensor checkpoint"
            raise ExtractionError(
                f"{path}: not a weights file: expected .safetensors or a weights-only torch checkpoint "
                f"(.pth / .pt / .bin) ({type(exc).__name__}: {exc})"
            ) from None
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ExtractionError(f"{path}: expected a mapping of parameter names to tensors")
    out = {}
    for key, value in state.items():
        for prefix in _WRAPPER_PREFIXES:
            key = key.removeprefix(prefix)
        out[key] = value
    return out


def load_strictly(model: nn.Module, state: dict[str, torch.Tensor], *, what: str, into: str) -> None:
    """Load ``state`` into ``model`` only if it fills every tensor and uses every tensor of the file;
    otherwise say which were missing, unused and of another shape (the first few and the counts).
    The tensors of the model's classifier, which an embedding does not use, may be left unused."""
    own = model.state_dict()
    classifier = _classifier_prefixes(model)
    missing = [k for k in own if k not in state]
    unused = [k for k in state if k not in own and not k.startswith(classifier)]
    misshapen = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
    if missing or unused or misshapen:
        parts = []
        if missing:
            parts.append(f"{len(missing)} of the model's {len(own)} tensors missing ({_first(missing)})")
        if unused:
            parts.append(f"{len(unused)} of the file's {len(state)} tensors unused ({_first(unused)})")
        if misshapen:
            shapes = [f"{k}: file {tuple(state[k].shape)}, model {tuple(own[k].shape)}" for k in misshapen[:3]]
            parts.append(f"{len(misshapen)} of another shape ({'; '.join(shapes)}{' …' if len(misshapen) > 3 else ''})")
        raise ExtractionError(
            f"{what} does not fit {into}: {'; '.join(parts)}. Is --backbone the architecture these weights "
            "were trained for, with its arguments (--backbone-args, or a preset: milcache encoders)?"
        )
    # A model built on the meta device takes the file's tensors as they are (in its own dtypes).
    assign = any(t.is_meta for t in own.values())
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own}, strict=True, assign=assign)


def _first(keys: list[str], n: int = 3) -> str:
    return ", ".join(keys[:n]) + (" …" if len(keys) > n else "")


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    names = (getattr(model, "default_cfg", None) or {}).get("classifier") or ()
    names = (names,) if isinstance(names, str) else tuple(names)
    return tuple(f"{n}." for n in names if n)


# Key maps: a vendor's layout onto timm's. Each takes the checkpoint and the (built) model and
# returns the checkpoint in the model's names; what they drop or transform is said here.
KEY_MAPS: dict[str, Callable[[dict, nn.Module], dict]] = {"timm": lambda state, model: state}


def map_keys(name: str, state: dict, model: nn.Module) -> dict:
    return KEY_MAPS[name](state, model)


def _dinov2_hf_to_timm(state: dict, model: nn.Module) -> dict:
    """transformers' Dinov2Model / Dinov2WithRegistersModel (both the 4.x names — ``attention.attention
    .query``, ``mlp.weights_in`` — and the 5.x names — ``attention.q_proj``, ``mlp.gate_proj``) onto
    timm's VisionTransformer: query/key/value stacked into ``qkv``, SwiGLU's gate and up projections
    stacked into ``fc1``, layer scales renamed, the class token's position folded into the class
    token where timm adds no position to it (register models), the position grid resampled to the
    model's as transformers does at run time (bicubic, in float32), and the unused ``mask_token``
    dropped (it only serves masked pre-training)."""
    if not any(k.startswith("embeddings.") for k in state):
        return state  # already timm's names (e.g. saved by milcache fine-tune)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key == "embeddings.mask_token":
            continue
        out[_dinov2_name(key)] = value
    for prefix in sorted({k.rsplit(".attn.", 1)[0] for k in out if ".attn.q." in k}):
        for part in ("weight", "bias"):
            q, k, v = (out.pop(f"{prefix}.attn.{name}.{part}", None) for name in ("q", "k", "v"))
            if q is not None:
                out[f"{prefix}.attn.qkv.{part}"] = torch.cat([q, k, v])
    for prefix in sorted({k.rsplit(".mlp.", 1)[0] for k in out if ".mlp.gate." in k}):
        for part in ("weight", "bias"):
            out[f"{prefix}.mlp.fc1.{part}"] = torch.cat(
                [out.pop(f"{prefix}.mlp.gate.{part}"), out.pop(f"{prefix}.mlp.up.{part}")]
            )
    return _fit_position_grid(out, model)


_DINOV2_NAMES = (
    ("embeddings.cls_token", "cls_token"),
    ("embeddings.register_tokens", "reg_token"),
    ("embeddings.position_embeddings", "pos_embed"),
    ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
    ("encoder.layer.", "blocks."),
    ("attention.attention.query.", "attn.q."),
    ("attention.attention.key.", "attn.k."),
    ("attention.attention.value.", "attn.v."),
    ("attention.output.dense.", "attn.proj."),
    ("attention.q_proj.", "attn.q."),
    ("attention.k_proj.", "attn.k."),
    ("attention.v_proj.", "attn.v."),
    ("attention.o_proj.", "attn.proj."),
    ("layer_scale1.lambda1", "ls1.gamma"),
    ("layer_scale2.lambda1", "ls2.gamma"),
    ("mlp.weights_in.", "mlp.fc1."),
    ("mlp.weights_out.", "mlp.fc2."),
    ("mlp.gate_proj.", "mlp.gate."),
    ("mlp.up_proj.", "mlp.up."),
    ("mlp.down_proj.", "mlp.fc2."),
    ("layernorm.", "norm."),
)


def _dinov2_name(key: str) -> str:
    for old, new in _DINOV2_NAMES:
        key = key.replace(old, new)
    return key


def _fit_position_grid(state: dict, model: nn.Module) -> dict:
    """Position embeddings (1 + grid², class first) onto the model's: the grid resampled when the
    checkpoint's differs, and the class entry added to the class token when timm's model keeps no
    position for it (``no_embed_class``)."""
    import torch.nn.functional as F

    pos = state.get("pos_embed")
    if pos is None or getattr(model, "pos_embed", None) is None:
        return state
    cls_pos, grid = pos[:, :1], pos[:, 1:]
    side, target = int(round(grid.shape[1] ** 0.5)), model.patch_embed.grid_size
    if (side, side) != tuple(target):
        grid = grid.reshape(1, side, side, -1).permute(0, 3, 1, 2).float()
        grid = F.interpolate(grid, size=tuple(target), mode="bicubic", align_corners=False)
        grid = grid.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)
    if getattr(model, "no_embed_class", False):
        state["pos_embed"] = grid
        state["cls_token"] = state["cls_token"] + cls_pos
    else:
        state["pos_embed"] = torch.cat([cls_pos, grid], dim=1)
    return state


KEY_MAPS["dinov2-hf"] = _dinov2_hf_to_timm


def _conch_v1_5(state: dict, model: nn.Module) -> dict:
    """CONCH v1.5's vision checkpoint (``pytorch_model_vision.bin``) has the tower's own names; its
    trunk's 224-px position grid is resampled to the model's as the vendor's trunk does at run time."""
    from milcache.extractor.architectures import dino_position_grid

    if "trunk.pos_embed" in state:
        state = {
            **state,
            "trunk.pos_embed": dino_position_grid(state["trunk.pos_embed"], model.trunk.patch_embed.grid_size),
        }
    return state


KEY_MAPS["conch-v1.5"] = _conch_v1_5


def _swin_v1(state: dict, model: nn.Module) -> dict:
    """A Swin checkpoint of the original code (or timm < 0.9, as CTransPath's): timm's own converter
    moves each stage's downsampling to the start of the next stage and drops the index and mask
    buffers that timm recomputes."""
    from timm.models.swin_transformer import checkpoint_filter_fn

    return checkpoint_filter_fn(state, model)


KEY_MAPS["swin-v1"] = _swin_v1


# --- families ---------------------------------------------------------------------------------------


@register_family("timm")
def timm_encoder(name: str, weights=None, pretrained=False, **options) -> Encoder:
    blueprint = Blueprint(name=name, architecture=name, pretrained=pretrained and weights is None)
    if weights is not None:
        blueprint.weights = weights_file(Path(weights))
    return build_timm(blueprint, **options)


@register_family("local-dir")
def local_dir_encoder(folder: str, weights=None, pretrained=False, **options) -> Encoder:
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise ExtractionError(f"local-dir:{folder}: no such folder")
    blueprint = folder_blueprint(path, f"local-dir:{folder}")
    if weights is not None:
        blueprint = replace(blueprint, weights=weights_file(Path(weights)))
    return build_timm(blueprint, **options)


@register_family("hf-hub")
def hub_encoder(repo_id: str, weights=None, pretrained=False, **options) -> Encoder:
    """A model from the local Hugging Face cache: a preset's repository is built as that preset
    (its architecture arguments and token rule), any other as timm's layout says."""
    from milcache.extractor.presets import preset_for_hub

    folder = hub_folder(repo_id)
    preset = preset_for_hub(repo_id)
    if preset is not None:
        return build_timm(preset_blueprint(preset, weights or folder, False), **options)
    return local_dir_encoder(str(folder), weights=weights, **options)


_VIDEO_MODELS = ("r3d_18", "mc3_18", "r2plus1d_18")


@register_family("tv")
def torchvision_video_encoder(
    name: str,
    weights=None,
    pretrained=False,
    *,
    args=None,
    token_rule=None,
    device=None,
    in_chans: int = 3,
    **overrides,
) -> Encoder:
    """torchvision's video ResNets as 3D patch encoders, the first convolution adapted to the number
    of modalities (pretrained RGB kernels averaged over their input channels and repeated)."""
    from torchvision.models import video

    if name not in _VIDEO_MODELS:
        raise ExtractionError(f"unknown torchvision 3D model {name!r}; choose one of {', '.join(_VIDEO_MODELS)}")
    if pretrained:
        raise ExtractionError("tv: backbones take local weights only: pass the checkpoint with --weights")
    if args or token_rule not in (None, DEFAULT_TOKEN_RULE):
        raise OptionError("tv: backbones take no --backbone-args and only the pooled token rule")
    torch.manual_seed(0)
    model = getattr(video, name)(weights=None)
    model.fc = nn.Identity()
    digest, state = "random-init", None
    if weights is not None:
        path = weights_file(Path(weights))
        state = {k: v for k, v in read_checkpoint(path).items() if not k.startswith("fc.")}
        digest = file_digest(path)
    # RGB weights load before the stem is adapted to the modalities; weights of an adapted model
    # (saved by fine-tune) after.
    adapted_weights = state is not None and state.get("stem.0.weight", torch.empty(0, 3)).shape[1] == in_chans != 3
    if state is not None and not adapted_weights:
        load_strictly(model, state, what=str(path), into=f"tv:{name}")
    if in_chans != model.stem[0].in_channels:
        _adapt_stem(model, in_chans)
    if adapted_weights:
        load_strictly(model, state, what=str(path), into=f"tv:{name} ({in_chans} channels)")
    size = overrides.get("input_size") or (112, 112)
    return Encoder(
        model=model.eval(),
        name=f"tv:{name}",
        dim=512,
        input_size=(int(size[0]), int(size[1])),
        mean=(0.0,) * in_chans,
        std=(1.0,) * in_chans,
        weights_digest=digest,
        extra={"kind": "video", **({} if in_chans == 3 else {"in_chans": in_chans})},
    )


def _adapt_stem(model: nn.Module, in_chans: int) -> None:
    stem = model.stem[0]
    adapted = nn.Conv3d(in_chans, stem.out_channels, stem.kernel_size, stem.stride, stem.padding, bias=False)
    with torch.no_grad():
        adapted.weight.copy_(stem.weight.mean(1, keepdim=True).repeat(1, in_chans, 1, 1, 1) * 3 / in_chans)
    model.stem[0] = adapted
