#!/usr/bin/env bash
# The GPU checks, in one go on a lent GPU machine whose Python has torch + timm but not the rest:
# wheels carried in .gpu/<set>/ (base: store, tables, slides; mini: volumes, DICOM; train: those and
# optuna, torchmil; 64 MiB travel at most), a
# trimmed imagecodecs in .gpu/site; results written to $OUT (or ./gpu-out).
#   bash bench/on_gpu.sh tests train extract encoders
set -uo pipefail
OUT=${OUT:-gpu-out}; mkdir -p "$OUT"
if compgen -G ".gpu/*/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .gpu/*/*.whl || exit 1
fi
export PYTHONPATH=$PWD/.gpu/site:/tmp/site:$PWD/src:$PWD
export PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$OUT/device.log"
python3 -c "import torch, torchvision, timm; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)" | tee -a "$OUT/device.log"
for step in "$@"; do
  case $step in
    tests) timeout 300 python3 -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py 2>&1 | tee "$OUT/tests.log" ;;
    train) for case in c a; do timeout 200 python3 bench/train_head.py --case $case --device cuda; done 2>&1 | tee "$OUT/train_head.log"
           timeout 150 python3 bench/train_head.py --case b --device cuda --loop-folds 5 2>&1 | tee -a "$OUT/train_head.log" ;;
    train-c) timeout 200 python3 bench/train_head.py --case c --device cuda 2>&1 | tee "$OUT/train_head_c.log" ;;
    profile) timeout 300 python3 -m cProfile -o "$OUT/extract.prof" bench/extract.py --sources tiles --mix big --slides 32 \
               --size 8192 --backbones resnet50 --precision bf16 --batch-size 256 --workers 14 2>&1 | tee "$OUT/profile.log" ;;
    extract) for extra in "--decode cpu,gpu" "--compile --decode cpu,gpu"; do  # eager, then the compiled ceiling; each decode
               timeout 300 python3 bench/extract.py --sources tiles --mix big --slides 32 --size 8192 --backbones resnet50 \
                 --precision bf16 --batch-size 256 --workers 14 $extra ${EXTRACT_ARGS:-}
             done 2>&1 | tee "$OUT/extract.log" ;;
    encoders) # the presets' architectures (ViT-L/16 as UNI, ViT-g/14 as H-optimus-0) at their input size, bf16 + SDPA
              timeout 400 python3 bench/extract.py --sources tiles --mix big --slides 8 --size 4096 --backbones uni,h-optimus-0 \
                --precision bf16 --batch-size 256 --workers 14 2>&1 | tee "$OUT/encoders.log" ;;
  esac
done
