"""Test-suite settings: no hub access, deterministic and small thread counts."""

import os

# A hidden hub call must fail fast instead of hanging on the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
# Multi-threaded BLAS on small matrices is slower than one thread, and erratic on a shared machine.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)  # small tensors: threads cost more than they give; CI runs files serially

import pytest  # noqa: E402


@pytest.fixture(autouse=True, scope="session")
def _one_blas_thread():
    """One BLAS / OpenMP thread for the whole run (threadpoolctl, where installed)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        yield
        return
    with threadpool_limits(1):
        yield


@pytest.fixture(autouse=True)
def _one_thread():
    """Every test starts with one torch thread, and a test that changes the count (``--threads``) does not
    leak it into the next one; small tensors on a shared, oversubscribed CPU run faster on one thread."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
