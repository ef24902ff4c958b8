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
