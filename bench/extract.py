"""End-to-end tile extraction throughput against the bare backbone, measured in the same run.

A cohort of JPEG-compressed pyramidal TIFFs is generated, then for each backbone:
  * bare: the backbone alone on random input tensors (same batch size, precision, device);
  * end-to-end: `milcache extract` on the cohort (reading, decoding, tissue detection, transfer,
    model, store writes), with where the main thread's time went.

    python bench/extract.py --slides 8 --size 4096 --backbones resnet50,vit_base_patch16_224  # a GPU
    python bench/extract.py --slides 2 --size 1024 --backbones resnet18 --device cpu           # a CPU
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from tests.conftest import tissue_image, write_pyramid_tiff  # noqa: E402

from milcache.devices import resolve_device  # noqa: E402
from milcache.extractor.backbones import create_backbone  # noqa: E402
from milcache.extractor.loop import Embedder, ExtractConfig, extract  # noqa: E402
from milcache.extractor.sources import create_source  # noqa: E402


def make_cohort(root: Path, slides: int, size: int) -> Path:
    for i in range(slides):
        write_pyramid_tiff(root / f"slide{i}.tif", tissue_image(size, size, seed=i), compression="jpeg", tile=256)
    table = pl.DataFrame(
        {"bag_id": [f"slide{i}" for i in range(slides)], "path": [f"slide{i}.tif" for i in range(slides)]}
    )
    table.write_csv(root / "manifest.csv")
    return root / "manifest.csv"


def bare_throughput(name: str, device: torch.device, batch: int, precision: str, batches: int) -> float:
    embedder = Embedder(create_backbone(name), create_source("tiles"), device, precision, compile=False)
    pixels = torch.randint(0, 256, (batch, *embedder.backbone.input_size, 3), dtype=torch.uint8)
    if device.type == "cuda":
        pixels = pixels.pin_memory()
    embedder(pixels)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(batches):
        embedder(pixels)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batches * batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=2)
    parser.add_argument("--size", type=int, default=1024, help="Slide side in pixels")
    parser.add_argument("--backbones", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    root = Path(tempfile.mkdtemp())
    try:
        manifest = make_cohort(root, args.slides, args.size)
        print(f"cohort: {args.slides} JPEG pyramidal TIFFs of {args.size}² px; device: {name}")
        for backbone in args.backbones.split(","):
            config = ExtractConfig(
                backbone,
                device=args.device,
                batch_size=args.batch_size,
                workers=args.workers,
                precision=args.precision,
                overwrite=True,
            )
            summary = extract(manifest, root / "store", create_source("tiles", tile_size=224), config, progress=False)
            e2e = summary.instances_per_second
            bare = bare_throughput(
                backbone, device, args.batch_size, args.precision, max(3, summary.instances // args.batch_size)
            )
            t = summary.timings
            print(
                f"{backbone}: {summary.instances} tiles  end-to-end {e2e:8.1f} tiles/s  bare {bare:8.1f} tiles/s  "
                f"ratio {e2e / bare:.2f}"
            )
            print(
                f"  main thread: waiting for pixels {t['waiting_for_pixels']:.1f}s, model+transfer "
                f"{t['model_and_transfer']:.1f}s; writer thread busy {t['store_writes']:.1f}s; "
                f"total {summary.seconds:.1f}s"
            )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
