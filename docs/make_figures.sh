#!/usr/bin/env bash
# The README's figures, docs/figures/overlay.png and docs/figures/curves.png, made from the built-in
# synthetic data set by the README's commands: its first training command (where runs/cpu holds
# that run finished, sgdc-train says "nothing to do"), then sgdc-predict on the run's validation
# images; the overlay of one of them is enlarged 4 times (nearest neighbour), the curves are
# sgdc-train's curves.png. Run from anywhere: bash docs/make_figures.sh
#
# Environment, for a quicker check (tests/test_readme.py runs it so): PYTHON (default python),
# RUN (the run folder, default runs/cpu), FIGURES (default docs/figures), TRAIN_FLAGS (flags
# appended to the training command, e.g. "--epochs 1"), IMAGE (the overlay shown, default val_0001).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python}"
RUN="${RUN:-runs/cpu}"
FIGURES="${FIGURES:-docs/figures}"
IMAGE="${IMAGE:-val_0001}"

# shellcheck disable=SC2086  # TRAIN_FLAGS is a list of flags
"$PYTHON" -m sgdc_kernels.segmentation.train --data synthetic --image-size 64 --num-train 192 --num-val 64 --backbone resnet10t --dim 32 --depth 2 --guide-ch 8 --batch-size 16 --epochs 6 --lr 2e-3 --workers 0 --device cpu --out "$RUN" ${TRAIN_FLAGS:-}
"$PYTHON" -m sgdc_kernels.segmentation.predict --checkpoint "$RUN/last.pt" --data synthetic --out "$RUN/predict"

mkdir -p "$FIGURES"
"$PYTHON" - "$RUN/predict/overlays/$IMAGE.png" "$FIGURES/overlay.png" <<'PY'
import sys

from PIL import Image

with Image.open(sys.argv[1]) as im:
    im.resize((4 * im.width, 4 * im.height), Image.NEAREST).save(sys.argv[2], optimize=True)
PY
cp "$RUN/curves.png" "$FIGURES/curves.png"
echo "wrote $FIGURES/overlay.png and $FIGURES/curves.png"
