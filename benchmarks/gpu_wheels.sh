#!/usr/bin/env bash
# Wheels of the pure-Python packages that the GPU machine's image lacks (hydra-core, omegaconf and antlr4, which
# the stage configs need), into .whl/ (git-ignored), for benchmarks/gpu_suite.sh to install there. Run here, where
# PyPI is reachable; the device machine reaches nothing.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl "hydra-core==1.3.*" "omegaconf==2.3.*"
python3 -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"  # published as a source archive only
ls -l .whl
