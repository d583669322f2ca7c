#!/usr/bin/env bash
# Collect the wheels that scripts/gpu_check.sh installs on a GPU machine that has the GPU stack (torch with CUDA,
# transformers, accelerate, numpy, ...) but not this project's pins and no package index. Run it where a package
# index is reachable; it downloads only pure-Python wheels and pydantic_core's binary one, for the GPU image's
# Python (3.12, manylinux x86_64), at the versions of requirements/constraints.txt (about 12 MB together).
#
#   scripts/gpu_wheels.sh [DIR]        (default: shared/wheels)
set -euo pipefail
cd "$(dirname "$0")/.."
DIR=${1:-shared/wheels}
PY=${PY:-python3}
PYTHON_VERSION=${GPU_PYTHON_VERSION:-3.12}
# What the model path, the GPU tests and the benchmarks import that the GPU image lacks (platform-facts.md):
# diffusers and pydantic (+ its four small dependencies), importlib_metadata/zipp (diffusers), and pytest
# (+ pluggy, iniconfig, Pygments, packaging). Nothing else: mlflow, DVC, mediapipe, dlib, Prefect, Great
# Expectations and Streamlit stay off the model path and out of tests/gpu.
PACKAGES=(diffusers pydantic pydantic_core annotated-types typing-inspection typing_extensions importlib_metadata
          zipp pytest pluggy iniconfig Pygments packaging)
pins=()
for name in "${PACKAGES[@]}"; do
    pin=$(grep -i -E "^${name//[-_]/[-_]}==" requirements/constraints.txt | head -1 || true)
    if [ -z "$pin" ]; then  # not pinned there (pytest's own dependencies): the version installed here
        pin="$name==$("$PY" -c "import importlib.metadata as m; print(m.version('$name'))")" || {
            echo "no pin for $name in requirements/constraints.txt and none installed" >&2; exit 2; }
    fi
    pins+=("$pin")
done
mkdir -p "$DIR"
"$PY" -m pip download --no-deps --only-binary=:all: --python-version "$PYTHON_VERSION" \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 -d "$DIR" "${pins[@]}"
echo "wheels for Python $PYTHON_VERSION in $DIR: $(ls "$DIR"/*.whl | wc -l) files, $(du -sh "$DIR" | cut -f1)"
