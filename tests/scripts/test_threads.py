"""The CLI's thread default: one thread for the embedded models, torch's choice for others."""

import pytest
import torch

from hessdiff.scripts import _common
from hessdiff.scripts.cli import CLIError


def test_thread_default_follows_the_model():
    n = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        _common.set_threads(None, "google/ddpm-cifar10-32")
        assert torch.get_num_threads() == 2
        _common.set_threads(None, "mnist")
        assert torch.get_num_threads() == 1
        _common.set_threads(2, "mnist")  # --threads wins
        assert torch.get_num_threads() == 2
        with pytest.raises(CLIError, match="--threads must be a positive integer"):
            _common.set_threads(0, "mnist")
    finally:
        torch.set_num_threads(n)
