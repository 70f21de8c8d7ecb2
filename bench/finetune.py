"""Fine-tuning throughput (bags/s, instances/s) end to end, against the bare training step measured
in the same run.

A tile cohort is generated (JPEG-compressed pyramidal TIFF slides), extracted with the backbone, a
mean-pooling head trained on it, then `milcache fine-tune` runs one epoch per variant (gradient
checkpointing off / on; bf16 on CUDA). The bare step is the backbone's forward + backward on K random
tiles of the same shape with the same precision, and every ``accumulate`` bags (fine-tune's default)
the clipped AdamW step: the ratio says what re-reading tiles and the loop cost.

    python bench/finetune.py --backbones resnet50,vit_base_patch16_224 --tile 224 --slides 16   # GPU
    python bench/finetune.py --backbones resnet18 --tile 64 --slides 8 --device cpu              # CPU
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import polars as pl
import torch

import milcache
import milcache.devices
from milcache.aggregator.config import FineTuneSettings
from milcache.devices import autocast, resolve_device, retain_freed_host_memory
from milcache.extractor.encoders import create_encoder
from milcache.extractor.pyramids import tissue_image, write_pyramid_tiff


def cohort(root: Path, slides: int, size: int) -> tuple[Path, Path]:
    rows = []
    for i in range(slides):
        write_pyramid_tiff(root / f"s{i}.tif", tissue_image(size, size, seed=i), compression="jpeg", tile=256)
        rows.append((f"s{i}", str(root / f"s{i}.tif"), i % 2))
    table = pl.DataFrame(rows, schema=["bag_id", "path", "label"], orient="row")
    table.write_csv(root / "slides.csv")
    table.select("bag_id", "label").write_csv(root / "labels.csv")
    return root / "slides.csv", root / "labels.csv"


def bare_step(
    name: str, tile: int, k: int, device, precision: str, checkpointing: bool, repeats: int, accumulate: int
) -> float:
    """Instances per second of the training step alone on K random tiles a bag: forward + backward,
    and every ``accumulate`` bags the clipped AdamW step fine-tune takes."""
    backbone = create_encoder(name, input_size=(tile, tile))
    model = backbone.model.to(device).train()
    if checkpointing:
        model.set_grad_checkpointing(True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=True)
    x = torch.randn(k, 3, tile, tile, device=device)
    for i in range(repeats + 1):
        if i == 1:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        with autocast(device, precision):
            loss = model(x).float().mean()
        loss.backward()
        if i % accumulate == 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * k / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbones", default="resnet18")
    parser.add_argument("--slides", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024, help="Slide side in pixels")
    parser.add_argument("--tile", type=int, default=64)
    parser.add_argument("--instances", type=int, default=16)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument(
        "--keep-at-fork",
        action="store_true",
        help="fine-tune does not hand the retained free memory back before each epoch's workers fork (as "
        "before 2026-12-06): the parent then copies those pages on write",
    )
    args = parser.parse_args()
    if args.keep_at_fork:
        milcache.devices.release_free_host_memory = lambda: False
    retain_freed_host_memory()  # as fine-tune does on the CPU, for both sides from the start
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}; K = {args.instances} instances per bag, tiles {args.tile}²")
    root = Path(tempfile.mkdtemp())
    try:
        slides, labels = cohort(root, args.slides, args.size)
        for backbone in args.backbones.split(","):
            store = root / f"store-{backbone}"
            milcache.extract(
                slides,
                store,
                backbone=backbone,
                tile_size=args.tile,
                input_size=args.tile,
                workers=args.workers,
                device=args.device,
                overwrite=True,
            )
            run = root / f"head-{backbone}"
            milcache.train_head(store, labels, run, head="mean", folds=2, epochs=2, device=args.device)
            for checkpointing in (False, True):
                out = root / f"ft-{backbone}-{checkpointing}"
                result = milcache.fine_tune(
                    run,
                    slides,
                    out,
                    epochs=1,
                    instances=args.instances,
                    val_fraction=0.0,
                    workers=args.workers,
                    checkpointing=checkpointing,
                    precision=args.precision,
                    device=args.device,
                )
                bags_per_s = args.slides / result.history[0]["seconds"]  # the epoch, not the start-up
                bare = bare_step(
                    backbone,
                    args.tile,
                    args.instances,
                    device,
                    args.precision,
                    checkpointing,
                    max(3, args.slides),
                    FineTuneSettings().accumulate,
                )
                print(
                    f"{backbone:>24} checkpointing {'on ' if checkpointing else 'off'}: {bags_per_s:6.2f} bags/s, "
                    f"{bags_per_s * args.instances:8.1f} instances/s end to end; bare step "
                    f"{bare:8.1f} instances/s; ratio {bags_per_s * args.instances / bare:.2f}"
                )
    finally:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
