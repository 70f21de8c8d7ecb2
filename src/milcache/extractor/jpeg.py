"""JPEG tiles decoded on the compute device (``--decode gpu``).

On a GPU the decode workers, not the backbone, are what limits tile extraction from JPEG-tiled
slides (0.32x of the bare backbone on an H100 run). So workers can hand over the slide's
compressed file tiles instead of pixels (``EncodedTiles``: each file tile's JPEG stream once per
batch, and the grid of file tiles under each output tile); the main process decodes a whole batch
of streams in one ``torchvision.io.decode_jpeg`` call (nvjpeg on CUDA), gathers every tile's pixels
from them at once and resizes on the device. The pixels are those of the CPU path
(``TileSource.read``) within JPEG decoder tolerance (exact where both run libjpeg-turbo, as on
the CPU).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


@dataclass
class EncodedTiles:
    """A batch of output tiles as compressed file tiles. Row r's window (``sides[r]`` square, top
    left at (``origins[r]``) in its level's pixels, white outside the level's ``bounds[r]``) lies
    on a grid of file tiles of ``tile_shapes[r]``; ``cells[r, i, j]`` is the stream of the grid
    cell i, j counted from the cell holding the window's corner (-1: none). Windows are then
    resized to ``size``."""

    streams: list[np.ndarray]  # complete JPEG streams (uint8), each file tile once per batch
    cells: np.ndarray  # n × k × k int64
    origins: np.ndarray  # n × 2 (y, x)
    bounds: np.ndarray  # n × 2 (level height, width)
    tile_shapes: np.ndarray  # n × 2 (tile height, width)
    sides: np.ndarray  # n
    size: int

    def __len__(self) -> int:
        return len(self.sides)


def complete_stream(tile: bytes, tables: bytes | None) -> bytes:
    """A standalone JPEG stream from a TIFF tile: a tile written with shared ``JPEGTables`` (an
    abbreviated stream without its quantisation and Huffman tables) gets them spliced in after its
    start marker, as libjpeg would read the pair."""
    if not tables:
        return tile
    if not (tables.startswith(_SOI) and tables.endswith(_EOI) and tile.startswith(_SOI)):
        raise ValueError("not a JPEG tile with JPEG tables")
    return tables[:-2] + tile[2:]


def _decode(streams: list[np.ndarray], device: torch.device) -> list[torch.Tensor]:
    """Each stream as an RGB 3 × H × W uint8 tensor on ``device``: one batched call (nvjpeg on
    CUDA) on torchvision ≥ 0.20, which added batch decoding; one call a stream before that."""
    inputs = [torch.from_numpy(s) for s in streams]
    with warnings.catch_warnings():  # torchvision ≥ 0.29 points to TorchCodec for its image decoders
        warnings.simplefilter("ignore", DeprecationWarning)
        import torchvision
        from torchvision.io import ImageReadMode, decode_jpeg

        if tuple(int(v) for v in torchvision.__version__.split("+")[0].split(".")[:2]) >= (0, 20):
            return list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device))
        return [decode_jpeg(t, mode=ImageReadMode.RGB, device=device) for t in inputs]


def decode_tiles(encoded: EncodedTiles, device: torch.device) -> torch.Tensor:
    """The batch's tiles as uint8 n × size × size × 3 on ``device`` (``TileSource.read``'s layout):
    one batched decode, then every pixel of every tile gathered at once from the stacked file
    tiles (a few kernels a batch, whatever its size; the per-tile bookkeeping was done in the
    workers)."""
    decoded = _stacked(_decode(encoded.streams, device))  # U × H × W × 3
    size, n = encoded.size, len(encoded)
    out = torch.empty((n, size, size, 3), dtype=torch.uint8, device=device)
    cells = torch.from_numpy(encoded.cells).to(device)
    for side in np.unique(encoded.sides):  # one side a batch, unless a bag's images differ in scale
        rows = np.flatnonzero(encoded.sides == side)
        r = torch.from_numpy(rows).to(device)
        per_row = (encoded.origins, encoded.bounds, encoded.tile_shapes)
        (y, x), (h, w), (th, tw) = (torch.from_numpy(a[rows].T.copy()).to(device)[..., None] for a in per_row)
        step = torch.arange(int(side), device=device)
        ys, xs = y + step, x + step  # level pixels of the windows' rows and columns (m × side)
        inside = ((ys >= 0) & (ys < h))[:, :, None] & ((xs >= 0) & (xs < w))[:, None, :]
        cy, cx = ys.div(th, rounding_mode="floor"), xs.div(tw, rounding_mode="floor")
        stream = cells[r[:, None, None], (cy - cy[:, :1])[:, :, None], (cx - cx[:, :1])[:, None, :]]
        pixels = decoded[stream.clamp(min=0), (ys - cy * th)[:, :, None], (xs - cx * tw)[:, None, :]]
        pixels = torch.where((inside & (stream >= 0))[..., None], pixels, 255)
        if side != size:  # the window is another size than the tile: resized as the CPU path does (bilinear)
            channels_first = pixels.permute(0, 3, 1, 2).float()
            resized = F.interpolate(channels_first, (size, size), mode="bilinear", antialias=True, align_corners=False)
            pixels = resized.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        out[r] = pixels
    return out


def _stacked(tiles: list[torch.Tensor]) -> torch.Tensor:
    """Decoded file tiles (3 × H × W each) as one U × H × W × 3 tensor; tiles of different sizes
    (levels or images with other tile sizes in one batch) are padded to the largest."""
    if len({tuple(t.shape) for t in tiles}) == 1:
        return torch.stack(tiles).permute(0, 2, 3, 1)
    height, width = max(t.shape[1] for t in tiles), max(t.shape[2] for t in tiles)
    out = torch.full((len(tiles), height, width, 3), 255, dtype=torch.uint8, device=tiles[0].device)
    for i, tile in enumerate(tiles):
        out[i, : tile.shape[1], : tile.shape[2]] = tile.permute(1, 2, 0)
    return out


def decode_on_device(choice: str, device: torch.device) -> bool:
    """Whether JPEG tiles are decoded on the compute device: ``auto`` does on CUDA, where the
    workers' CPU decoding is the bottleneck, when torchvision can decode there; ``gpu`` insists
    (and needs CUDA and that decoder); ``cpu`` never."""
    from milcache.errors import OptionError

    if choice == "cpu" or (choice == "auto" and device.type != "cuda"):
        return False
    if device.type != "cuda":
        raise OptionError(f"--decode gpu needs a CUDA device; this run computes on {device} (use --decode cpu)")
    problem = decoder_problem(device)
    if problem and choice == "gpu":
        raise OptionError(f"--decode gpu: torchvision cannot decode JPEG on {device} ({problem}); use --decode cpu")
    return problem is None


def decoder_problem(device: torch.device) -> str | None:
    """Why torchvision cannot decode JPEG on ``device`` (a build without nvjpeg, say), or None:
    tried on a tiny image before any work, so that ``auto`` falls back to the workers instead of
    failing every bag."""
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 40, 90)).save(buffer, "JPEG")
    stream = np.frombuffer(bytearray(buffer.getvalue()), np.uint8)
    try:
        _decode([stream], device)
    except Exception as exc:  # any failure of the decoder itself
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    return None
