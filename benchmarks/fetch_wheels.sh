#!/usr/bin/env bash
# Download the wheels that benchmarks/gpu.sh installs on a bare GPU machine (Python 3.12, x86-64,
# PyTorch + transformers + timm present, no geospatial stack, no network there) into .whl/ at the
# repo root (ignored by git: /.whl/ is in .gitignore and .git/info/exclude). Run here, from the repo
# root, where PyPI is reachable:  bash benchmarks/fetch_wheels.sh
#
# Carried: rasterio (GDAL inside) and its deps the image lacks (affine, cligj, click-plugins; attrs,
# certifi, click, pyparsing and numpy are in the image); terratorch for the peer (only its
# tiled_inference.py is loaded); timm pinned (gpu.sh installs it only if the image's timm is older
# than 1.0.20, which DINOv3's RoPE needs); zstandard and tifffile (the COG blocks encoded while
# streaming). Not carried, not needed by the benchmark path: shapely,
# pyogrio, geopandas (only --vector imports them).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.whl/' >> .git/info/exclude; }
WHEELS=(rasterio==1.4.4 affine==3.0.1 cligj==0.7.2 click-plugins==1.1.1.2 terratorch==1.2.13 timm==1.0.31
        zstandard==0.25.0 tifffile==2025.10.16)
for spec in "${WHEELS[@]}"; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$spec" 2>&1 | grep -v '^WARNING: Location' || true
done
ls -la .whl
du -sh .whl
