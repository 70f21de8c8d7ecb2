"""Sources of instances, encoders (presets, strict loading), and the GPU extraction loop."""

# The built-in sources register themselves on import.
from milcache.extractor import cam, tiles, volume  # noqa: F401
