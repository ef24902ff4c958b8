"""This process's place in a sweep run: one process, or one rank of a ``torchrun`` group."""

from __future__ import annotations

import datetime as _dt
import os
from typing import Any

import torch

from hessdiff.eval.sweep.store import SweepError


class _Dist:
    """This process's place in a (possibly single-process) run."""

    def __init__(self, device: str, timeout_minutes: float = 30.0) -> None:
        if not (isinstance(timeout_minutes, int | float) and 0 < timeout_minutes < 1e6):
            raise SweepError(f"the process-group timeout must be a positive number of minutes, got {timeout_minutes!r}")
        self.timeout_minutes = float(timeout_minutes)
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.owns_group = False
        if device == "auto":
            device = f"cuda:{self.local_rank}" if torch.cuda.is_available() else "cpu"
        elif device == "cuda" and self.world > 1:
            device = f"cuda:{self.local_rank}"
        try:
            self.device = torch.device(device)
        except RuntimeError as err:
            raise SweepError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)") from err
        if self.device.type == "cuda":
            if not torch.cuda.is_available():
                raise SweepError(f"device {device!r} requested but no CUDA device is available; use --device cpu")
            torch.cuda.set_device(self.device)
        self.backend: str | None = None
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_available():
                raise SweepError("WORLD_SIZE > 1 but torch.distributed is not available in this PyTorch build")
            if dist.is_initialized():
                self.backend = str(dist.get_backend())
            else:
                self.backend = "nccl" if self.device.type == "cuda" else "gloo"
                dist.init_process_group(self.backend, timeout=_dt.timedelta(minutes=self.timeout_minutes))
                self.owns_group = True
            if dist.get_world_size() != self.world or dist.get_rank() != self.rank:
                raise SweepError("RANK / WORLD_SIZE disagree with the initialised process group")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            try:
                if self.backend == "nccl":
                    dist.barrier(device_ids=[self.device.index or 0])
                else:
                    dist.barrier()
            except RuntimeError as err:
                raise self._timed_out(err) from err

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.main else None]
        try:
            dist.broadcast_object_list(box, src=0, device=self.device if self.backend == "nccl" else None)
        except RuntimeError as err:
            raise self._timed_out(err) from err
        return box[0]

    def _timed_out(self, err: Exception) -> SweepError:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return SweepError(f"rank {self.rank} of {self.world}: waiting for the other processes failed ({first[:200]}); "
                          f"a process stopped, froze or died (the timeout is {self.timeout_minutes:g} min, "
                          "--dist-timeout). Finished items are kept: run again with --resume")

    def close(self) -> None:
        if self.owns_group:
            import torch.distributed as dist

            dist.destroy_process_group()
