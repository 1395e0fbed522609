"""Fixtures of the GPU suite (`python -m pytest -q -m gpu`; every test here is marked `gpu` and is
skipped without CUDA, see tests/conftest.py). With CLIPFH_GPU_TESTS_DEVICE=cpu the same bodies run on
the CPU as a dry run of their logic: the CUDA-only fast paths are forced on there and compile with
"aot_eager" (inductor's C++ build takes minutes on a small CPU); nothing is measured by it."""
import os

import pytest
import torch

from utils import speed

# --deterministic sets it too, but cuBLAS reads it when CUDA starts, which is earlier in a test session
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")


class CompiledGraphs(list):
    """Every graph torch.compile built in a test (a graph break or a recompile adds one)."""


@pytest.fixture
def fast_paths(gpu_device, monkeypatch):
    """(device, graphs): speed.COMPILE_BACKEND records each graph it compiles in `graphs`; dynamo's caches
    are emptied before and after, and the process-wide switches a run sets (cuDNN autotuning,
    --deterministic) restored after."""
    if gpu_device == "cpu":  # dry run: apply the CUDA fast paths on the CPU
        monkeypatch.setattr(speed, "on_cuda", lambda device: True)
    backend = torch._dynamo.lookup_backend("inductor" if gpu_device.startswith("cuda") else "aot_eager")
    graphs = CompiledGraphs()

    def counting(graph_module, example_inputs):
        graphs.append(graph_module)
        return backend(graph_module, example_inputs)

    monkeypatch.setattr(speed, "COMPILE_BACKEND", counting)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", torch.backends.cudnn.benchmark)
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", torch.backends.cudnn.deterministic)
    deterministic = torch.are_deterministic_algorithms_enabled()  # --deterministic sets it for the process
    torch._dynamo.reset()
    yield gpu_device, graphs
    torch._dynamo.reset()
    torch.use_deterministic_algorithms(deterministic)
