"""Sources of instances behind one small interface, found through one registry.

A source answers two questions: what are the instances of this bag (``plan``: coordinates and
attributes), and what are the pixels of this batch of them (``read``). The extraction loop, the
writer, progress, resume and sharding know nothing else about it.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from milcache.errors import ExtractionError, MilcacheError
from milcache.registry import Registry
from milcache.store.tables import BagSpec


def _named(kind: str, cls: type[Source]) -> None:
    cls.kind = kind


# The built-in sources register when ``milcache.extractor`` is imported; other packages can add one
# through the ``milcache.sources`` entry-point group.
SOURCES: Registry[type[Source]] = Registry("source", entry_point_group="milcache.sources", on_add=_named)


@dataclass
class BagPlan:
    """The instances of one bag: coordinates (n × k int), per-instance attributes, and per-bag
    extras (small arrays such as a thumbnail) and meta (JSON) to keep in the store."""

    coords: np.ndarray
    attrs: dict[str, np.ndarray] = field(default_factory=dict)
    extras: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return int(self.coords.shape[0])


@dataclass
class PlannedBag:
    """What ``Source.plan_prepared`` gives the extraction loop: the plan, the pixels of the
    instances at ``positions`` (the loop embeds them), and the embeddings of the other instances
    when planning already computed them (``embedded``: their positions and a B × dim tensor)."""

    plan: BagPlan
    pixels: np.ndarray
    positions: np.ndarray
    embedded: tuple[np.ndarray, torch.Tensor] | None = None


def failure_reason(exc: Exception) -> str:
    """Why a bag failed, as recorded: our own errors say it already; a decoder of a broken file can
    raise anything, named by its type."""
    return str(exc) if isinstance(exc, MilcacheError) else f"{type(exc).__name__}: {exc}"


def plan_each(
    bags: list[BagSpec], prepared: list[dict], plan_one: Callable[[int, BagSpec, dict], PlannedBag]
) -> list[PlannedBag | str]:
    """``plan_one(i, bag, prepared)`` of every bag: its plan, or why it failed (a bag's failure,
    named; the others go on)."""
    results: list[PlannedBag | str] = []
    for i, (bag, items) in enumerate(zip(bags, prepared, strict=True)):
        try:
            results.append(plan_one(i, bag, items))
        except Exception as exc:
            results.append(failure_reason(exc))
    return results


class Source:
    """Base of every source. Instances are created in the main process and pickled into the data
    loader's workers, so they hold settings only; file handles are opened lazily, per process."""

    kind = "?"
    coord_names: list[str] = []
    # Help of each option of ``__init__`` that a user sets (``milcache extract`` makes one CLI option
    # of each, typed from the signature); the others are filled in by the extractor.
    option_help: dict[str, str] = {}

    def settings(self) -> dict:
        """The source's settings, recorded in store.json (a rerun must use the same)."""
        raise NotImplementedError

    def plan(self, bag: BagSpec) -> BagPlan:
        raise NotImplementedError

    # A source whose planning needs the compute device (CAM's network) sets this: its workers then
    # only ``prepare`` (decode), and the extraction loop calls ``plan_prepared`` in the main process
    # with its ``Embedder`` (the compute device and the backbone).
    plan_on_device = False

    def prepare(self, bag: BagSpec) -> dict:
        raise NotImplementedError

    def plan_prepared(self, bag: BagSpec, prepared: dict, embedder) -> PlannedBag:
        raise NotImplementedError

    def prepared_size(self, prepared: dict) -> tuple[int, int]:
        """How much planning ``prepared`` needs of the device (its count of network inputs) and of host
        memory while it waits (bytes): the loop gathers prepared bags up to a batch of inputs."""
        return 1, 0

    def plan_prepared_many(self, bags: list[BagSpec], prepared: list[dict], embedder) -> list[PlannedBag | str]:
        """``plan_prepared`` of several bags, each bag's result or, when it failed, why. Sources whose
        planning runs a network override this to run it once on all the bags' inputs."""
        return plan_each(bags, prepared, lambda _, bag, items: self.plan_prepared(bag, items, embedder))

    def read(self, bag: BagSpec, plan: BagPlan, indices: np.ndarray) -> np.ndarray:
        """Pixels of the instances ``indices`` of ``plan``: uint8 (b × H × W × C)."""
        raise NotImplementedError

    def read_encoded(self, bag: BagSpec, plan: BagPlan, indices: np.ndarray):
        """The same instances as compressed JPEG tiles (``jpeg.EncodedTiles``) for decoding on the
        compute device, or None where the source cannot (then ``read`` is used)."""
        return None

    def close(self) -> None:
        """Release file handles (end of a worker)."""

    def backbone_options(self, bags: list[BagSpec]) -> dict:
        """Options the backbone needs for this source's input (e.g. ``in_chans`` for volumes)."""
        return {}

    def embed(self, batch: torch.Tensor, forward: Callable, encoder) -> torch.Tensor:
        """Turn a batch from ``read`` (already on the device) into embeddings with ``forward``.
        Images: uint8 B × H × W × C → resized to the encoder's input, normalised."""
        return forward(normalise_images(batch, encoder))


def normalise_images(pixels: torch.Tensor, encoder, resize: bool = True) -> torch.Tensor:
    """uint8 B × H × W × C on the device → float B × C × H × W at the encoder's input size and norm:
    resized to input / crop_pct (the model card's resize), then its centre cropped to the input
    (with ``resize`` False: at the pixels' own size, as the saliency CAM reads a global view)."""
    import torch.nn.functional as F

    x = pixels.permute(0, 3, 1, 2).float().div_(255)
    if not resize:
        mean, std = encoder.normalisation(x.device)
        return x.sub_(mean).div_(std)
    height, width = encoder.input_size
    crop_pct = getattr(encoder, "crop_pct", 1.0)
    resized = (round(height / crop_pct), round(width / crop_pct))
    if tuple(x.shape[-2:]) != resized:
        mode = "bicubic" if encoder.interpolation == "bicubic" else "bilinear"
        x = F.interpolate(x, size=resized, mode=mode, antialias=True, align_corners=False)
    if resized != (height, width):
        top, left = (resized[0] - height) // 2, (resized[1] - width) // 2
        x = x[..., top : top + height, left : left + width]
    mean, std = encoder.normalisation(x.device)
    return x.sub_(mean).div_(std)


def register_source(kind: str) -> Callable[[type[Source]], type[Source]]:
    return SOURCES.register(kind)


def list_sources() -> list[str]:
    return SOURCES.names()


def create_source(kind: str, **settings) -> Source:
    """Build a source; settings left as None keep the source's defaults."""
    cls = SOURCES.get(kind)
    given = {k: v for k, v in settings.items() if v is not None}
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    foreign = sorted(set(given) - accepted)
    if foreign:
        names = ", ".join("--" + name.replace("_", "-") for name in foreign)
        raise ExtractionError(f"{names} do(es) not apply to --source {kind}")
    return cls(**given)


@dataclass
class SourceOption:
    """One user-settable option of one or more sources, as the CLI offers it."""

    name: str  # the parameter name (tile_size); the CLI spells it --tile-size
    kinds: list[str]
    type: type  # int, float, str or bool (a flag)
    nargs: int
    default: object
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def source_options() -> list[SourceOption]:
    """Every user-settable option of every registered source, read from the sources' signatures
    (so that an option is typed once, where the source takes it)."""
    found: dict[str, SourceOption] = {}
    for kind in list_sources():
        cls = SOURCES.get(kind)
        hints = typing.get_type_hints(cls.__init__)
        for name, parameter in inspect.signature(cls.__init__).parameters.items():
            if name not in cls.option_help:
                continue
            if name in found:
                found[name].kinds.append(kind)
                continue
            scalar, nargs = _scalar_type(hints[name])
            found[name] = SourceOption(name, [kind], scalar, nargs, parameter.default, cls.option_help[name])
    return list(found.values())


def _scalar_type(hint) -> tuple[type, int]:
    """int | None → (int, 1); tuple[int, int, int] | None → (int, 3)."""
    args = (
        [a for a in typing.get_args(hint) if a is not type(None)]
        if typing.get_origin(hint)
        in (
            types.UnionType,
            typing.Union,
        )
        else [hint]
    )
    inner = args[0]
    if typing.get_origin(inner) is tuple:
        items = typing.get_args(inner)
        return items[0], len(items)
    return inner, 1
