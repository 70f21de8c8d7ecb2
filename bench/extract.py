"""End-to-end extraction throughput against the bare backbone, measured in the same run, per source.

For each source a cohort is generated (JPEG-compressed pyramidal TIFF slides; 16-bit mammogram-like
PNGs with two views per breast; multi-modal NIfTI volumes), then for each backbone:
  * bare: the embedding step alone (device transfer, normalisation, the backbone) on a random batch
    shaped like the source's batches, same batch size and precision;
  * end-to-end: `milcache extract` on the cohort (reading, decoding, tissue / CAM / foreground,
    transfer, model, store writes), with where the main thread's time went.

    python bench/extract.py --sources tiles --mix big --slides 32 --size 8192 --backbones resnet50 --batch-size 256 \\
        --workers 14 --precision bf16 [--compile]                                                          # GPU
    python bench/extract.py --sources tiles,cam,volume --backbones resnet18 --device cpu                     # CPU
    python bench/extract.py --backbones uni,h-optimus-0 --mix big --slides 1 --size 448 --batch-size 4 \
        --workers 1 --device cpu                          # presets' architectures (random weights), CPU

A preset name (``milcache encoders``) runs its architecture with its arguments, input size, crop and
token rule, with random weights (the cost of a forward does not depend on the weights' values).
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import torch

from milcache.devices import resolve_device, retain_freed_host_memory
from milcache.extractor.encoders import create_encoder
from milcache.extractor.loop import Embedder, ExtractConfig, extract
from milcache.extractor.pyramids import tissue_image, write_pyramid_tiff
from milcache.extractor.sources import create_source
from milcache.store.tables import read_manifest

DISTINCT_SLIDES = 4  # bags beyond these reuse a file: each bag still decodes all its tiles


def tiles_cohort(root: Path, bags: int, size: int) -> tuple[Path, dict]:
    rows = []
    for i in range(bags):
        name = f"slide{i % DISTINCT_SLIDES}.tif"
        if i < DISTINCT_SLIDES:
            write_pyramid_tiff(root / name, tissue_image(size, size, seed=i), compression="jpeg", tile=256)
        rows.append((f"slide{i}", name))
    return _manifest(root, rows), {"tile_size": 224}


def cam_cohort(root: Path, bags: int, size: int) -> tuple[Path, dict]:
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(bags):
        for view in ("cc", "mlo"):
            image = np.zeros((size, size * 3 // 4), np.uint16)
            margin = size // 10
            image[margin : size - margin, : size // 2] = rng.integers(15_000, 30_000, (size - 2 * margin, size // 2))
            Image.fromarray(image).save(root / f"b{i}-{view}.png")
            rows.append((f"breast{i}", f"b{i}-{view}.png"))
    return _manifest(root, rows), {"global_size": 224, "region_size": 224, "regions": 8}


def volume_cohort(root: Path, bags: int, size: int) -> tuple[Path, dict]:
    import nibabel as nib

    rng = np.random.default_rng(0)
    rows = []
    z, y, x = np.ogrid[:64, :size, :size]
    brain = ((z - 32) / 30) ** 2 + ((y - size / 2) / (size / 2.3)) ** 2 + ((x - size / 2) / (size / 2.6)) ** 2 < 1
    for i in range(bags):
        for channel in ("t1", "flair"):
            volume = (brain * (100 + 20 * rng.standard_normal(brain.shape))).astype(np.float32)
            nib.save(nib.Nifti1Image(np.transpose(volume, (2, 1, 0)), np.eye(4)), str(root / f"c{i}-{channel}.nii.gz"))
            rows.append((f"case{i}", f"c{i}-{channel}.nii.gz", channel))
    return _manifest(root, rows, ("bag_id", "path", "channel")), {"patch_size": (16, 64, 64), "min_foreground": 0.3}


def _manifest(root: Path, rows: list, columns=("bag_id", "path")) -> Path:
    pl.DataFrame(rows, schema=list(columns), orient="row").write_csv(root / "manifest.csv")
    return root / "manifest.csv"


COHORTS = {"tiles": tiles_cohort, "cam": cam_cohort, "volume": volume_cohort}


def encoder_settings(name: str, input_size) -> dict:
    """What ExtractConfig takes for ``name``: a preset's architecture, arguments, preprocessing and
    token rule (random weights), or a timm name with an input size."""
    from milcache.extractor.presets import PRESETS

    if name not in PRESETS:
        return {"backbone": name, "preprocessing": {"input_size": input_size} if input_size else {}}
    preset = PRESETS.get(name)
    data = preset.data()
    return {
        "backbone": preset.architecture,
        "backbone_args": dict(preset.args),
        "token_rule": preset.token_rule,
        "preprocessing": {k: data[k] for k in ("input_size", "mean", "std", "interpolation", "crop_pct")},
    }


def bare_throughput(
    backbone_name: str, source, manifest: Path, device, batch: int, precision: str, repeats: int, input_size, compile
) -> float:
    """Instances per second of the embedding step alone, on a random batch shaped like the source's."""
    bags = read_manifest(manifest).bags()
    settings = encoder_settings(backbone_name, input_size)
    backbone = create_encoder(
        settings["backbone"],
        args=settings.get("backbone_args"),
        token_rule=settings.get("token_rule"),
        **settings["preprocessing"],
        **source.backbone_options(bags),
    )
    embedder = Embedder(backbone, source, device, precision, compile=compile)
    plan = source.plan(bags[0])
    sample = source.read(bags[0], plan, np.arange(min(len(plan), batch)))
    shape = (batch, *sample.shape[1:])
    random = (
        torch.randint(0, 255, shape, dtype=torch.uint8)
        if sample.dtype == np.uint8
        else torch.randn(shape).to(torch.from_numpy(sample).dtype)
    )
    if device.type == "cuda":
        random = random.pin_memory()
    embedder(random)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        embedder(random)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return repeats * batch / (time.perf_counter() - start)


def worker_seconds_per_instance(source, manifest: Path, batch: int) -> float:
    """CPU seconds a decode worker spends per instance, doing what the workers do on one thread:
    plan and read, or for sources that plan on the device only ``prepare`` (decoding), their
    planning in the main process left out."""
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the workers run (_worker_init)
    spent, instances = 0.0, 0
    try:
        for bag in read_manifest(manifest).bags():
            start = time.process_time()
            if source.plan_on_device:
                source.prepare(bag)
                spent += time.process_time() - start
                instances += len(source.plan(bag))
                continue
            plan = source.plan(bag)
            for first in range(0, len(plan), batch):
                source.read(bag, plan, np.arange(first, min(first + batch, len(plan))))
            spent += time.process_time() - start
            instances += len(plan)
    finally:
        torch.set_num_threads(torch_threads)
    return spent / max(instances, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sources", default="tiles")
    parser.add_argument("--slides", type=int, default=2, help="Bags per cohort")
    parser.add_argument("--size", type=int, default=1024, help="Slide side / mammogram height / volume side")
    parser.add_argument("--backbones", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--precision", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the backbone on both sides")
    parser.add_argument(
        "--decode", default="auto", help="comma-separated --decode modes to run (cpu, gpu, auto), e.g. cpu,gpu on CUDA"
    )
    parser.add_argument("--rounds", type=int, default=1, help="interleaved rounds; each side's fastest is kept")
    parser.add_argument(
        "--mix",
        default="big,small",
        help="Bag-size mixes: big = --slides bags of --size; small = 4× the bags at half the size (many "
        "small bags: the case where per-bag batching used to leave ragged batches)",
    )
    parser.add_argument(
        "--allocator",
        choices=("retained", "plain"),
        default="retained",
        help="retained: glibc keeps freed memory for reuse from the start, for both sides (what extract does "
        "on the CPU); plain: glibc's defaults for both (a fresh page fault per 4 KB of every batch's activations)",
    )
    parser.add_argument(
        "--keep-at-fork",
        action="store_true",
        help="extract does not hand the retained free memory back before its workers fork (as before "
        "2026-12-06): the parent then copies those pages on write",
    )
    args = parser.parse_args()
    if args.keep_at_fork:
        import milcache.extractor.loop

        milcache.extractor.loop.release_free_host_memory = lambda: False
    if args.allocator == "retained":
        retain_freed_host_memory()
    else:
        import milcache.extractor.loop

        milcache.extractor.loop.retain_freed_host_memory = lambda: False
    if args.rounds < 1:
        parser.error("--rounds takes 1 or more")
    device = resolve_device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    released = "kept at the workers' fork" if args.keep_at_fork else "released before the workers fork"
    print(f"device: {name}; allocator: {args.allocator}, free memory {released}")
    for kind, mix in ((k, m) for k in args.sources.split(",") for m in args.mix.split(",")):
        root = Path(tempfile.mkdtemp())
        bags, size = (args.slides, args.size) if mix == "big" else (4 * args.slides, args.size // 2)
        try:
            manifest, settings = COHORTS[kind](root, bags, size)
            for backbone, decode in ((b, d) for b in args.backbones.split(",") for d in args.decode.split(",")):
                input_size = (64, 64) if kind == "volume" else None
                source = create_source(kind, **settings)
                config = ExtractConfig(
                    **encoder_settings(backbone, input_size),
                    device=args.device,
                    batch_size=args.batch_size,
                    workers=args.workers,
                    precision=args.precision,
                    compile=args.compile,
                    decode=decode,
                    overwrite=True,
                )
                # Interleaved rounds, each side's fastest kept: single runs on a shared VM vary by ±10 %.
                best: dict = {}
                for _ in range(args.rounds):
                    summary = extract(manifest, root / "store", source, config, progress=False)
                    bare = bare_throughput(
                        backbone,
                        source,
                        manifest,
                        device,
                        args.batch_size,
                        args.precision,
                        max(3, summary.instances // args.batch_size),
                        input_size,
                        args.compile,
                    )
                    t = summary.timings
                    steady = summary.instances / max(summary.seconds - t["start_up"], 1e-9)
                    if summary.instances_per_second > best.get("e2e", 0):
                        best.update(e2e=summary.instances_per_second, summary=summary)
                    best["steady"] = max(best.get("steady", 0), steady)
                    best["bare"] = max(best.get("bare", 0), bare)
                summary, t = best["summary"], best["summary"].timings
                e2e, steady, bare = best["e2e"], best["steady"], best["bare"]
                print(
                    f"{kind:>6} {mix:>5} {backbone} decode={decode} ({summary.decoded_on_device} on the device): "
                    f"{bags} bags, {summary.instances} instances  end-to-end "
                    f"{e2e:8.1f}/s  bare {bare:8.1f}/s  ratio {e2e / bare:.2f}; after start-up "
                    f"({t['start_up']:.1f}s) {steady:8.1f}/s  ratio {steady / bare:.2f}"
                    + (f"  (fastest of {args.rounds} rounds each)" if args.rounds > 1 else ""),
                    flush=True,
                )
                if device.type == "cpu" and (os.cpu_count() or 1) <= torch.get_num_threads():
                    # no core the model leaves free: the workers' decoding takes its share of them
                    worker = worker_seconds_per_instance(source, manifest, args.batch_size)
                    model = torch.get_num_threads() / bare  # core-seconds per instance
                    print(
                        f"         workers' CPU {worker * 1e3:.1f} ms an instance, the model's {model * 1e3:.1f} "
                        f"core-ms: sharing the cores, at most {model / (model + worker):.2f}x the bare backbone",
                        flush=True,
                    )
                print(
                    f"         main thread: waiting for pixels {t['waiting_for_pixels']:.1f}s, model+transfer "
                    f"{t['model_and_transfer']:.1f}s; writer busy {t['store_writes']:.1f}s; "
                    f"total {summary.seconds:.1f}s",
                    flush=True,
                )
        finally:
            shutil.rmtree(root)


if __name__ == "__main__":
    main()
