"""Start-up of an encoder with weights from a file: milcache's (the architecture built on the meta
device, the file's tensors assigned, every tensor checked) against the usual way (the model built
with random initialisation, then the file loaded into it), measured in the same run.

    python bench/encoder_start.py --presets uni,h-optimus-0 --rounds 2
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

from milcache.extractor.encoders import create_encoder, layer_arguments, read_checkpoint
from milcache.extractor.presets import PRESETS


def usual_way(preset, path: Path) -> float:
    start = time.perf_counter()
    model = timm.create_model(preset.architecture, num_classes=0, **layer_arguments(preset.args))
    model.load_state_dict(read_checkpoint(path), strict=True)
    return time.perf_counter() - start


def milcache_way(preset, path: Path) -> float:
    start = time.perf_counter()
    create_encoder(preset.name, path)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", default="uni")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; each side's fastest is kept")
    args = parser.parse_args()
    print(f"CPU ({torch.get_num_threads()} threads), torch {torch.__version__}, timm {timm.__version__}")
    for name in args.presets.split(","):
        preset = PRESETS.get(name)
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.safetensors"
            model = timm.create_model(preset.architecture, num_classes=0, **layer_arguments(preset.args))
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
            del model
            usual, ours = [], []
            for _ in range(args.rounds):
                usual.append(usual_way(preset, path))
                ours.append(milcache_way(preset, path))
            print(
                f"{name:>14} ({preset.params}): random init + load {min(usual):6.1f}s   "
                f"meta + assign (strict) {min(ours):6.1f}s   ratio {min(usual) / min(ours):.1f}x",
                flush=True,
            )


if __name__ == "__main__":
    main()
