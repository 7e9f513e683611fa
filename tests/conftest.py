import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))
os.environ.setdefault("PRUNEKIT_PROGRESS", "0")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One thread: on a shared 2-core machine, two OpenMP threads per process oversubscribe
    the cores and small batched LAPACK calls slow down a hundredfold."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


@pytest.fixture(autouse=True)
def _allocator_left_alone(monkeypatch):
    """Commands under test leave the C allocator as it is: keep_freed_memory() lasts for the
    whole process, so the first test to run a timing command would change how every later
    test allocates. The real call is tested in subprocesses (test_runtime, test_runtime_cli)."""
    import prunekit.runtime

    monkeypatch.setattr(prunekit.runtime, "keep_freed_memory", lambda: False)
