"""GPU checks (`make test-gpu`): skipped without CUDA, never part of `make test`. Each check appends its figures as
one JSON line to $GPU_CHECKS_OUT when that is set (docs/GPU_CHECKS.md is written from them)."""

from __future__ import annotations

import json
import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (make test-gpu on a GPU host)")
        for item in items:
            item.add_marker(skip)


@pytest.fixture
def record(request):
    def write(**figures):
        path = os.environ.get("GPU_CHECKS_OUT")
        if path:
            with open(path, "a", encoding="utf-8") as out:
                out.write(json.dumps({"test": request.node.name, **figures}, default=str) + "\n")
    return write
