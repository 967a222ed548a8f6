"""Fixtures: a real head (coordinator + HTTP API) with real rank processes serving the tiny model. Helpers the tests
share live in support.py. The tests mirror the package: tests/engine/, tests/head/, tests/kernels/ (with the kernel
tests' own preamble, kernel_checks.py), tests/model/, tests/parallel/, tests/serve/, tests/cluster/ (real Slurm),
tests/bench/, tests/gpu/."""

from __future__ import annotations

import os

import pytest
import torch

# No CUDA GPU: the Triton kernel tests run in Triton's interpreter (tests/kernels/kernel_checks.py). Set before anything
# imports triton; the serving code stays on the torch reference for CPU tensors either way (ops.use_triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support import start_head


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # one tiny checkpoint per test session, shared with rank processes through the environment
    os.environ.setdefault("EEP_HPC_CACHE", str(tmp_path_factory.mktemp("eep-cache")))


@pytest.fixture(scope="session")
def api(tmp_path_factory):
    running = start_head(tmp_path_factory.mktemp("run"), ranks=1)
    yield running
    running.stop()
