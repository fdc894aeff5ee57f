#!/usr/bin/env bash
# Quick start, 4-5 minutes on 2 CPU cores (packages installed): install, cut the bundled SpaceNet sample (real 0.5 m
# panchromatic imagery with OpenStreetMap building footprints) into COCO tiles, train a Swin-T Mask R-CNN
# for a few minutes from random weights, and run the main job on the scene -> out/quickstart/buildings.gpkg.
# Rerunning skips the install's downloads and resumes training from its checkpoint.
set -euo pipefail
cd "$(dirname "$0")"
ITERS="${ITERS:-80}"
SAMPLE=data/samples/spacenet_atlanta
OUT=out/quickstart
mkdir -p "$OUT"

python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
python -m pip install --quiet -e ".[dev]"

python -m pipeline prepare "$SAMPLE/sample_geotiff.tif" --labels "$SAMPLE/geotiff_labels.geojson" \
    --class-name building --tile 256 --overlap 32 --out "$OUT/tiles" --overwrite

MODEL="$OUT/model_${ITERS}it.pt"  # one checkpoint per run length, so a rerun resumes the right one
resume=()
[ -f "$MODEL" ] && resume=(--resume)
python -m pipeline train --config data/samples/swin_t_cpu.yaml --data "$OUT/tiles" --out "$MODEL" \
    --iters "$ITERS" --batch-size 2 "${resume[@]}"
python -m pipeline evaluate "$MODEL" --data "$OUT/tiles/val"

python -m pipeline run "$SAMPLE/sample_geotiff.tif" --checkpoint "$MODEL" -o "$OUT/buildings.gpkg" \
    --tile 256 --overlap 32 --score-threshold 0.3 --overwrite
echo "Open $OUT/buildings.gpkg in QGIS over $SAMPLE/sample_geotiff.tif."
