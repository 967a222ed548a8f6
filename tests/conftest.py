"""Fixtures: a real head (coordinator + HTTP API) with real rank processes serving the tiny model. Helpers the tests
share live in support.py; start_head and greedy are imported here too for modules that still import them from
conftest (test_fp8, test_gpu, test_nixl_ep)."""

from __future__ import annotations

import os

import pytest
import torch

# No CUDA GPU: the Triton kernel tests run in Triton's interpreter (tests/kernel_checks.py). Set before anything
# imports triton; the serving code stays on the torch reference for CPU tensors either way (ops.use_triton).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from support import RunningHead, greedy, start_head  # noqa: F401  (re-exported, see above)


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory):
    # one tiny checkpoint per test session, shared with rank processes through the environment
    os.environ.setdefault("EEP_HPC_CACHE", str(tmp_path_factory.mktemp("eep-cache")))


@pytest.fixture(scope="session")
def api(tmp_path_factory):
    running = start_head(tmp_path_factory.mktemp("run"), ranks=1)
    yield running
    running.stop()
