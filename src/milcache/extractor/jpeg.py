"""JPEG tiles decoded on the compute device (``--decode gpu``).

On a GPU the decode workers, not the backbone, are what limits tile extraction from JPEG-tiled
slides. So workers can hand over the slide's compressed file tiles instead of pixels
(``EncodedTiles``: each file tile's JPEG stream once per batch, and where each piece of it lands in
which output tile); the main process decodes a whole batch of streams in one
``torchvision.io.decode_jpeg`` call (nvjpeg on CUDA) and pastes and resizes the pieces on the
device. The pixels are those of the CPU path (``TileSource.read``) within JPEG decoder tolerance
(exact where both run libjpeg-turbo, as on the CPU).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch

_SOI, _EOI = b"\xff\xd8", b"\xff\xd9"


@dataclass
class EncodedTiles:
    """A batch of output tiles as compressed file tiles. ``pieces`` rows are (output row, stream,
    source y, source x, output y, output x, height, width) in the pixels of the window read
    (``sides[row]`` square, white where no piece lands), which is then resized to ``size``."""

    streams: list[np.ndarray]  # complete JPEG streams (uint8), each file tile once
    pieces: np.ndarray  # P × 8 int64
    sides: np.ndarray  # per output row: the side of the window read from the level
    size: int  # output tile side

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
    CUDA); per stream on torchvision versions that take a single tensor only."""
    inputs = [torch.from_numpy(s) for s in streams]
    with warnings.catch_warnings():  # torchvision ≥ 0.29 points to TorchCodec for its image decoders
        warnings.simplefilter("ignore", DeprecationWarning)
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device))
        except (TypeError, ValueError):  # torchvision < 0.19: one tensor a call
            return [decode_jpeg(t, mode=ImageReadMode.RGB, device=device) for t in inputs]


def decode_tiles(encoded: EncodedTiles, device: torch.device) -> torch.Tensor:
    """The batch's tiles as uint8 n × size × size × 3 on ``device`` (``TileSource.read``'s layout)."""
    import torch.nn.functional as F

    decoded = _decode(encoded.streams, device)
    size, n = encoded.size, len(encoded)
    out = torch.full((n, 3, size, size), 255, dtype=torch.uint8, device=device)
    pieces = encoded.pieces
    for row in range(n):
        side = int(encoded.sides[row])
        canvas = out[row] if side == size else torch.full((3, side, side), 255, dtype=torch.uint8, device=device)
        for _, stream, sy, sx, dy, dx, h, w in pieces[pieces[:, 0] == row].tolist():
            canvas[:, dy : dy + h, dx : dx + w] = decoded[stream][:, sy : sy + h, sx : sx + w]
        if side != size:  # the window is another size than the tile: resized as the CPU path does (bilinear)
            resized = F.interpolate(
                canvas[None].float(), size=(size, size), mode="bilinear", antialias=True, align_corners=False
            )
            out[row] = resized[0].round_().clamp_(0, 255).to(torch.uint8)
    return out.permute(0, 2, 3, 1)


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
