"""Writing tiled pyramidal TIFFs (the demo's slides, and the tests' and benchmarks' cohorts)."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_pyramid_tiff(
    path: Path,
    image: np.ndarray,
    mpp: float | None = 0.5,
    levels: int = 3,
    compression: str | None = None,
    tile: int = 64,
) -> Path:
    """A tiled pyramidal TIFF (levels as SubIFDs, each half the last), with mpp in its resolution tags."""
    import tifffile

    def resolution(level: int) -> dict:
        if mpp is None:
            return {}
        return {"resolution": (1e4 / (mpp * 2**level), 1e4 / (mpp * 2**level)), "resolutionunit": "CENTIMETER"}

    options = {"tile": (tile, tile), "photometric": "rgb", "compression": compression}
    with tifffile.TiffWriter(path, bigtiff=True) as tif:
        tif.write(image, subifds=levels - 1, **options, **resolution(0))
        for level in range(1, levels):
            tif.write(image[:: 2**level, :: 2**level], subfiletype=1, **options, **resolution(level))
    return Path(path)


def tissue_image(height: int, width: int, box: tuple[int, int, int, int] | None = None, seed: int = 0) -> np.ndarray:
    """White background; pink-purple stained 'tissue' noise everywhere or inside box (y0, x0, y1, x1)."""
    rng = np.random.default_rng(seed)
    image = np.full((height, width, 3), 255, np.uint8)
    y0, x0, y1, x1 = box or (0, 0, height, width)
    stain = np.stack(
        [
            rng.integers(150, 230, (y1 - y0, x1 - x0)),
            rng.integers(40, 120, (y1 - y0, x1 - x0)),
            rng.integers(120, 200, (y1 - y0, x1 - x0)),
        ],
        -1,
    )
    image[y0:y1, x0:x1] = stain.astype(np.uint8)
    return image
