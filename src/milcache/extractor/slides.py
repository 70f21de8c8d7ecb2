"""Reading large 2D images as pyramids: OpenSlide for vendor whole-slide formats, tifffile for
pyramidal (and plain) TIFF, Pillow for PNG / JPEG. One interface: level sizes and downsamples, mpp,
``read_region`` (RGB uint8, white outside the image) and ``thumbnail``."""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from milcache.errors import ExtractionError

_OPENSLIDE_SUFFIXES = {".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".svslide", ".bif", ".tif", ".tiff"}
_PIL_LIMIT_HINT = (
    "it is larger than Pillow's pixel limit; save it as a tiled pyramidal TIFF "
    "(e.g. `vips tiffsave in.png out.tif --tile --pyramid`) and list that file instead"
)


@dataclass
class EncodedWindow:
    """A window of a JPEG-tiled level as the file tiles it needs: its top-left (``y``, ``x``) in
    the level's pixels, the level's size, its tile grid, and the tile indices (row-major)."""

    y: int
    x: int
    level_height: int
    level_width: int
    tile_height: int
    tile_width: int
    across: int  # tiles per row of the level
    indices: list[int]


class SlideReader:
    """A pyramid of one image. ``dimensions[l]`` is (width, height) of level l."""

    path: Path
    dimensions: list[tuple[int, int]]
    downsamples: list[float]
    mpp: float | None  # microns per level-0 pixel, when the file says

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """RGB uint8 (height × width × 3) of level ``level`` whose top-left is level-0 (x, y)."""
        raise NotImplementedError

    def encoded_region(self, x: int, y: int, level: int, width: int, height: int) -> EncodedWindow | None:
        """``read_region``'s window as compressed file tiles, for decoding on the device (white
        outside the level); None when the level is not stored as JPEG tiles that decode to its
        RGB pixels, or a tile the window needs is missing from the file."""
        page = self._jpeg_page(level)
        if page is None:
            return None
        d = self.downsamples[level]
        lx, ly = int(math.floor(x / d)), int(math.floor(y / d))
        w, h = self.dimensions[level]
        x0, y0, x1, y1 = max(lx, 0), max(ly, 0), min(lx + int(width), w), min(ly + int(height), h)
        indices = [index for index, _, _ in _tiles_overlapping(page, x0, y0, x1, y1)]
        if any(not page.databytecounts[i] for i in indices):  # the CPU path fills missing tiles
            return None
        return EncodedWindow(ly, lx, h, w, page.tilelength, page.tilewidth, _tiles_across(page), indices)

    def jpeg_stream(self, key) -> bytes:
        """The complete JPEG stream of the file tile ``key`` of ``encoded_region``."""
        from milcache.extractor.jpeg import complete_stream

        level, index = key
        page = self._jpeg_page(level)
        return complete_stream(_raw_tile(page, index), page.jpegtables)

    def _jpeg_page(self, level: int):
        """The level's tifffile page when its tiles are JPEG streams of its RGB pixels, else None."""
        return None

    def close(self) -> None:
        pass

    def best_level(self, downsample: float) -> int:
        """The most downsampled level that is still at least as detailed as ``downsample``."""
        candidates = [i for i, d in enumerate(self.downsamples) if d <= downsample * 1.01]
        return max(candidates, key=lambda i: self.downsamples[i]) if candidates else 0

    def thumbnail(self, max_side: int = 2048) -> tuple[np.ndarray, float]:
        """An RGB thumbnail whose longer side is at most ``max_side``, and its level-0 downsample."""
        from PIL import Image

        w0, h0 = self.dimensions[0]
        target = max(w0, h0) / max_side
        level = self.best_level(max(target, 1.0))
        w, h = self.dimensions[level]
        image = self.read_region(0, 0, level, w, h)
        scale = max(w, h) / max_side
        if scale > 1:
            size = (max(1, round(w / scale)), max(1, round(h / scale)))
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        return image, w0 / image.shape[1]


def _rgb(array: np.ndarray, top: float | None = None) -> np.ndarray:
    """RGB uint8 from grey, RGB or RGBA of any depth; deeper pixels are scaled by ``top``, the
    brightest value of the whole image (so that every tile of a slide is scaled alike)."""
    if array.ndim == 2:
        array = np.repeat(array[..., None], 3, axis=2)
    if array.shape[2] == 4:  # RGBA: composite onto white
        alpha = array[..., 3:4].astype(np.float32) / 255
        array = (array[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)
    if array.dtype != np.uint8:
        top = top or float(array.max()) or 1.0
        array = np.clip(np.rint(array.astype(np.float32) * (255 / top)), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(array[..., :3])


def _paste(source_read, full_w: int, full_h: int, x: int, y: int, width: int, height: int, top=None) -> np.ndarray:
    """Read the part of a window that lies inside the image; white everywhere else."""
    out = np.full((height, width, 3), 255, np.uint8)
    x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + width, full_w), min(y + height, full_h)
    if x1 > x0 and y1 > y0:
        out[y0 - y : y1 - y, x0 - x : x1 - x] = _rgb(source_read(x0, y0, x1, y1), top)
    return out


class OpenSlideReader(SlideReader):
    def __init__(self, path: Path) -> None:
        import openslide

        self.path = path
        try:
            self._slide = openslide.OpenSlide(str(path))
        except openslide.OpenSlideError as exc:
            raise ExtractionError(f"{path}: OpenSlide cannot read it ({exc})") from None
        self.dimensions = list(self._slide.level_dimensions)
        self.downsamples = [float(d) for d in self._slide.level_downsamples]
        mpp = self._slide.properties.get("openslide.mpp-x")
        self.mpp = float(mpp) if mpp else None
        self._pages: list | None = None  # tifffile pages of the levels (Aperio), opened on first use
        self._tif = None

    def read_region(self, x, y, level, width, height):
        region = self._slide.read_region((int(x), int(y)), level, (int(width), int(height)))
        return _rgb(np.asarray(region))  # transparent (outside the scan) becomes white

    def encoded_region(self, x, y, level, width, height):
        d = self.downsamples[level]
        if (x / d) % 1 or (y / d) % 1:  # OpenSlide renders such a window at a sub-pixel offset
            return None
        return super().encoded_region(x, y, level, width, height)

    def _jpeg_page(self, level: int):
        """Aperio SVS (the common scanner format) is a TIFF whose levels are its tiled pages, in
        order: their JPEG tiles go to the device as they are. Other vendors' files stay with
        OpenSlide."""
        if self._pages is None:
            self._pages = self._aperio_pages()
        return self._pages[level] if level < len(self._pages) else None

    def _aperio_pages(self) -> list:
        import openslide
        import tifffile

        if openslide.OpenSlide.detect_format(str(self.path)) != "aperio":
            return []
        try:
            self._tif = tifffile.TiffFile(self.path)
        except (tifffile.TiffFileError, OSError):
            return []
        tiled = [p for p in self._tif.pages if p.is_tiled]
        sizes = [(int(p.imagewidth), int(p.imagelength)) for p in tiled]
        if sizes[: len(self.dimensions)] != self.dimensions:  # not the layout OpenSlide reads: leave it
            return []
        return [p if _rgb_jpeg_tiles(p) and p.planarconfig == 1 else None for p in tiled[: len(self.dimensions)]]

    def close(self):
        self._slide.close()
        if self._tif is not None:
            self._tif.close()


class TiffReader(SlideReader):
    """Pyramidal TIFF (levels as SubIFDs or pages). Tiled levels are read tile by tile straight
    from the file (tifffile decodes each tile; the last decoded tiles are kept, since neighbouring
    output tiles share file tiles); other layouts through zarr."""

    _CACHED_TILES = 64  # decoded file tiles kept per reader (a 256² RGB tile is 192 kB)

    def __init__(self, path: Path) -> None:
        import tifffile
        import zarr

        self.path = path
        try:
            self._tif = tifffile.TiffFile(path)
            series = self._tif.series[0]
        except (tifffile.TiffFileError, OSError, IndexError) as exc:
            raise ExtractionError(f"{path}: not a readable TIFF ({exc})") from None
        self._levels = [zarr.open(self._tif.aszarr(series=0, level=i), mode="r") for i in range(len(series.levels))]
        self._tiled = [_plain_tiled_page(level) for level in series.levels]
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        axes = series.axes
        if not (axes.startswith("YX")):
            raise ExtractionError(f"{path}: expected an RGB or grey image (axes YX[S]), found axes {axes}")
        self.dimensions = [(int(lv.shape[1]), int(lv.shape[0])) for lv in self._levels]
        self.downsamples = [self.dimensions[0][0] / w for w, _ in self.dimensions]
        self.mpp = _tiff_mpp(series.levels[0].keyframe)
        # Deeper than 8 bits: one scale for the whole slide, from its smallest level (a tile
        # scaled by its own maximum would make faint tissue as bright as the brightest).
        smallest = self._levels[-1]
        self._top = (float(np.max(smallest[:])) or 1.0) if smallest.dtype != np.uint8 else None

    def read_region(self, x, y, level, width, height):
        d = self.downsamples[level]
        lx, ly = int(math.floor(x / d)), int(math.floor(y / d))
        w, h = self.dimensions[level]
        if self._tiled[level] is not None:
            read = lambda x0, y0, x1, y1: self._read_tiled(level, x0, y0, x1, y1)  # noqa: E731
        else:
            array = self._levels[level]
            read = lambda x0, y0, x1, y1: array[y0:y1, x0:x1]  # noqa: E731
        return _paste(read, w, h, lx, ly, int(width), int(height), self._top)

    def _read_tiled(self, level: int, x0: int, y0: int, x1: int, y1: int) -> np.ndarray:
        """The window [y0:y1, x0:x1] of a tiled level, pasted from the file tiles it overlaps."""
        page = self._tiled[level]
        th, tw = page.tilelength, page.tilewidth
        out = None
        for index, top, left in _tiles_overlapping(page, x0, y0, x1, y1):
            tile = self._file_tile(level, index)
            if out is None:
                out = np.empty((y1 - y0, x1 - x0, *tile.shape[2:]), tile.dtype)
            ya, yb, xa, xb = max(y0, top), min(y1, top + th), max(x0, left), min(x1, left + tw)
            out[ya - y0 : yb - y0, xa - x0 : xb - x0] = tile[ya - top : yb - top, xa - left : xb - left]
        return out if out.shape[-1] != 1 else out[..., 0]

    def _jpeg_page(self, level: int):
        page = self._tiled[level]
        return page if page is not None and _rgb_jpeg_tiles(page) else None

    def _file_tile(self, level: int, index: int) -> np.ndarray:
        key = (level, index)
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        page = self._tiled[level]
        data = _raw_tile(page, index) if page.databytecounts[index] else None
        segment, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        tile = segment.reshape(page.tilelength, page.tilewidth, -1)
        self._cache[key] = tile
        if len(self._cache) > self._CACHED_TILES:
            self._cache.popitem(last=False)
        return tile

    def close(self):
        self._tif.close()


def _tiles_across(page) -> int:
    return -(-page.imagewidth // page.tilewidth)


def _tiles_overlapping(page, x0: int, y0: int, x1: int, y1: int):
    """(index, top, left) of the file tiles of a tiled page that overlap [y0:y1, x0:x1]."""
    if y1 <= y0 or x1 <= x0:
        return
    th, tw, across = page.tilelength, page.tilewidth, _tiles_across(page)
    for ty in range(y0 // th, (y1 - 1) // th + 1):
        for tx in range(x0 // tw, (x1 - 1) // tw + 1):
            yield ty * across + tx, ty * th, tx * tw


def _raw_tile(page, index: int) -> bytes:
    """The file tile's bytes as stored (compressed), read under the file's lock."""
    fh = page.parent.filehandle
    with fh.lock:
        fh.seek(page.dataoffsets[index])
        return fh.read(page.databytecounts[index])


def _plain_tiled_page(level):
    """The level's one 2D tiled page (interleaved samples), or None for layouts left to zarr."""
    page = level.keyframe
    simple = len(level.pages) == 1 and page.is_tiled and page.tiledepth == 1 and page.imagedepth == 1
    return page if simple and (page.samplesperpixel == 1 or page.planarconfig == 1) else None


def _rgb_jpeg_tiles(page) -> bool:
    """8-bit JPEG tiles that any JPEG decoder turns into the level's RGB (YCbCr colour, as
    libjpeg assumes for three components) or grey pixels; JPEG tiles stored as RGB or CMYK are
    left to tifffile, which knows the TIFF tags that say so."""
    if page.compression != 7 or page.bitspersample != 8:
        return False
    return (page.samplesperpixel == 3 and page.photometric == 6) or (
        page.samplesperpixel == 1 and page.photometric == 1
    )


def _tiff_mpp(page) -> float | None:
    """Microns per pixel from TIFF resolution tags (pixels per centimetre or inch)."""
    try:
        x_res = page.tags["XResolution"].value
        unit = int(page.tags["ResolutionUnit"].value) if "ResolutionUnit" in page.tags else 2
    except KeyError:
        return None
    pixels_per_unit = x_res[0] / x_res[1] if isinstance(x_res, tuple) else float(x_res)
    if pixels_per_unit <= 0 or unit not in (2, 3):
        return None
    microns = 25_400.0 if unit == 2 else 10_000.0
    mpp = microns / pixels_per_unit
    return mpp if mpp < 100 else None  # 72 dpi and friends are screen defaults, not a scan resolution


class ImageReader(SlideReader):
    """A plain image (PNG, JPEG, BMP …) held in memory as one level."""

    def __init__(self, path: Path) -> None:
        from PIL import Image

        self.path = path
        try:
            with Image.open(path) as image:
                self._image = _rgb(np.asarray(image.convert("RGBA" if "A" in image.getbands() else "RGB")))
        except Image.DecompressionBombError:
            raise ExtractionError(f"{path}: {_PIL_LIMIT_HINT}") from None
        except OSError as exc:
            raise ExtractionError(f"{path}: not a readable image ({exc})") from None
        h, w = self._image.shape[:2]
        self.dimensions, self.downsamples, self.mpp = [(w, h)], [1.0], None

    def read_region(self, x, y, level, width, height):
        h, w = self._image.shape[:2]
        return _paste(lambda x0, y0, x1, y1: self._image[y0:y1, x0:x1], w, h, int(x), int(y), int(width), int(height))


def open_slide(path: str | Path) -> SlideReader:
    """The right reader for a file: vendor formats through OpenSlide, TIFF through tifffile."""
    path = Path(path)
    if not path.exists():
        raise ExtractionError(f"{path}: file missing")
    suffix = path.suffix.lower()
    if suffix in _OPENSLIDE_SUFFIXES:
        import openslide

        vendor = openslide.OpenSlide.detect_format(str(path))
        if vendor and vendor != "generic-tiff":
            return OpenSlideReader(path)
        if suffix in (".tif", ".tiff"):
            return TiffReader(path)
        if vendor is None:
            raise ExtractionError(f"{path}: OpenSlide does not recognise this {suffix} file")
        return OpenSlideReader(path)
    return ImageReader(path)
