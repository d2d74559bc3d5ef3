"""Checkpoints, owned here: what a training checkpoint holds, and writing and reading it, local or S3.

A checkpoint is a folder with ``state.pt``: the method's state (weights, momentum encoders, queues,
prototypes), the optimiser and schedule, the epoch reached, the MLflow run id and the trial's config
(plain data). Random streams need no state: they are re-seeded from (seed, rank, epoch) at every
epoch start. Files are read with ``weights_only=True``: tensors and plain containers only, so a
checkpoint cannot run code when it is loaded.
"""

from __future__ import annotations

import io
import pickle
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch

from unmix_ray.storage import read_bytes

CHECKPOINT_FILE = "state.pt"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable or not one of ours."""


def write(method: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any, epoch: int,
          run_id: str | None, trial: dict[str, Any], directory: str | Path | None = None) -> Path:
    """Write a checkpoint folder (a fresh temporary one unless ``directory``) and return it."""
    folder = Path(directory) if directory is not None else Path(tempfile.mkdtemp(prefix="unmix-ckpt-"))
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "epoch": epoch, "run_id": run_id, "trial": trial},
               folder / CHECKPOINT_FILE)
    return folder


def state_file(location: str | Path) -> str:
    """The ``state.pt`` of a checkpoint folder, or ``location`` itself when it names the file."""
    location = str(location)
    return location if location.endswith(".pt") else f"{location.rstrip('/')}/{CHECKPOINT_FILE}"


def read(location: str | Path, endpoint_url: str | None = None, map_location: str | torch.device = "cpu") -> dict:
    """The state of a checkpoint: ``location`` is its folder or its ``state.pt``, local or
    ``s3://bucket/key`` (an S3-compatible endpoint from ``endpoint_url`` or the environment)."""
    name = state_file(location)
    try:
        data = read_bytes(name, endpoint_url)
    except (OSError, ValueError) as e:  # pyarrow raises OSError subclasses for missing objects
        raise CheckpointError(f"cannot read the checkpoint {name} ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else 'unreadable'})") from None
    try:
        state = torch.load(io.BytesIO(data), map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, zipfile.BadZipFile, EOFError, ValueError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{name} is not an unmix-ray checkpoint ({first[:200]})") from None
    if not isinstance(state, dict) or not {"model", "epoch", "trial"} <= set(state):
        raise CheckpointError(f"{name} is not an unmix-ray checkpoint (no model, epoch and trial entries)")
    return state


def load_into(state: dict, method: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
              scheduler: Any = None) -> int:
    """Restore ``state`` into the method (and optimiser and schedule); the epoch to continue from."""
    method.load_state_dict(state["model"])
    if optimizer is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None:
        scheduler.load_state_dict(state["scheduler"])
    return int(state["epoch"])

