#!/usr/bin/env bash
# Wheels for a GPU machine without a package index, built on a machine with one for the GPU machine's Python
# (3.12, x86-64 by default) into .gpu-wheels/ (git-ignored), to be copied there with the checkout. A typical GPU
# image already holds a CUDA torch, lightning, transformers, tokenizers and the rest dstlm imports, but not
# DeepSpeed, its hjson and pydantic, or jsonargparse (dstlm's command line): those are the wheels built here, at
# the versions the project's tests run with (pyproject.toml). Then on the GPU machine: benchmarks/gpu_checks.sh.
#
#     bash benchmarks/gpu_wheels.sh        # ~6 MB
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
dest=.gpu-wheels
mkdir -p "$dest"
"$PY" -m pip download --quiet --dest "$dest" --only-binary=:all: --no-deps --python-version 3.12 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
    hjson==3.1.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
    jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
# DeepSpeed publishes a source archive only; its wheel is pure Python (the ops are built at first use)
"$PY" -m pip wheel --quiet --no-deps --wheel-dir "$dest" deepspeed==0.19.8
ls -1 "$dest"
du -sh "$dest"
