"""The embedding spec: what an embedding of a store means, in one object.

Two embeddings can be compared (trained on, predicted from, searched together) only if they were
made by the same encoder (name and architecture arguments), the same weights (by digest), the same
preprocessing (input size, crop, interpolation, mean / std), the same token rule, and read from the
same source geometry (source kind, mpp or level, tile / region / patch size, overlap). The store
owns the spec (store.json); every run folder records it; the store writer, predict, fine-tune and
index search compare it field by field and refuse a mismatch naming the field and both values.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

from milcache.errors import StoreMismatchError

# The token rule of stores written before it was recorded: the model's own pooled output.
DEFAULT_TOKEN_RULE = "pooled"


@dataclass(frozen=True)
class EmbeddingSpec:
    encoder: str
    dim: int
    weights_digest: str | None = None
    encoder_args: dict = field(default_factory=dict)
    preprocessing: dict = field(default_factory=dict)
    token_rule: str = DEFAULT_TOKEN_RULE
    source: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        # A JSON round trip makes tuples and lists compare equal, as they will once read back.
        return json.loads(json.dumps(asdict(self)))

    @classmethod
    def from_dict(cls, data: dict) -> EmbeddingSpec:
        """A spec from store.json or a run folder; ``backbone`` is the name older files used."""
        encoder = data.get("encoder", data.get("backbone"))
        known = {name: data[name] for name in cls.__dataclass_fields__ if name in data and name != "encoder"}
        return cls(encoder=encoder, **known)

    def differences(
        self, other: EmbeddingSpec, fields: tuple[str, ...] | None = None
    ) -> list[tuple[str, object, object]]:
        """(field, this value, the other's value) for every field that differs; nested settings are
        named to the leaf (``source.mpp``, ``preprocessing.mean``) so that a user sees what to fix."""
        mine, theirs = self.to_dict(), other.to_dict()
        found = []
        for name in fields or tuple(mine):
            found += _leaf_differences(name, mine.get(name), theirs.get(name))
        return found

    def require_same(self, other: EmbeddingSpec, *, this: str, that: str, advice: str, fields=None) -> None:
        """Refuse (StoreMismatchError) when ``other`` differs from this spec in any of ``fields``."""
        differing = self.differences(other, fields)
        if differing:
            sides = "; ".join(f"{name}: {this} {a!r}, {that} {b!r}" for name, a, b in differing)
            raise StoreMismatchError(f"embeddings made differently ({sides}); {advice}")


def _leaf_differences(name: str, a, b) -> list[tuple[str, object, object]]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _leaf_differences(f"{name}.{key}", a.get(key), b.get(key))
        return out
    return [] if a == b else [(name, a, b)]
