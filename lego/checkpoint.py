"""Crash-safe checkpoints of a training run, and resuming from them.

A run with a checkpoint directory ``DIR`` keeps one file, ``DIR/checkpoint.pt``: the
last complete state of the run (model, optimizer, training progress, RNG states and a
fingerprint of the settings that shape the results). It is replaced atomically: the
new state goes to a temporary file in ``DIR`` that is flushed and fsynced, then
``os.replace``-d over the old one, and ``DIR`` itself is fsynced. A process killed at
any moment leaves either the previous checkpoint or the new one, never a torn file.

``Checkpointer`` guards the directory: without ``resume`` an existing checkpoint is an
error (it is never silently overwritten); with ``resume`` the checkpoint must be
readable and its fingerprint equal to this run's, else a ``CheckpointError`` names the
file or the settings that differ. Stale temporary files of a killed save are ignored.
"""

from __future__ import annotations

import os
import random
import tempfile
import time
from typing import Any

import torch

CHECKPOINT_NAME = "checkpoint.pt"
# ASHEM keeps its state at the phase boundary under this name too, so that other runs
# can start their phase 2 from the same phase-1 model (``start_from``).
PHASE1_NAME = "phase1.pt"
FORMAT = 1


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: present without resume, corrupt, or from other
    settings."""


def save_atomic(obj: Any, path: str) -> None:
    """``torch.save(obj)`` to ``path`` atomically (temp file, flush, fsync, rename,
    directory fsync)."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> dict[str, Any]:
    """The RNG states that a run consumes: torch CPU, every CUDA device (if any), Python."""
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what ``rng_state`` returned."""
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class Checkpointer:
    """The checkpoint of one run in ``directory``.

    ``fingerprint``: the settings that shape the results (name -> value, plain Python
    values); a checkpoint with another fingerprint cannot be resumed. ``resume``: continue
    from ``directory``'s checkpoint if there is one (none: start afresh); without it, an
    existing checkpoint is an error. ``write``: whether this process saves (rank 0 only
    under ``torchrun``). Loaded tensors stay on the CPU (``load_state_dict`` moves them
    to the model's device), so a run may resume on another device.

    ``start_from``: when ``directory`` holds no checkpoint, start from this checkpoint
    file of another run instead, whose fingerprint may differ from this one only in the
    settings named in ``may_differ``.

    ``state``: the loaded checkpoint's ``state`` dict (what the run passed to ``save``),
    or ``None`` when the run starts afresh. ``elapsed()``: seconds spent on the run so
    far, the processes before a resume included (saved with every checkpoint).
    """

    def __init__(
        self,
        directory: str,
        fingerprint: dict[str, Any],
        *,
        resume: bool = False,
        write: bool = True,
        start_from: str | None = None,
        may_differ: tuple[str, ...] = (),
    ) -> None:
        self.directory = directory
        self.path = os.path.join(directory, CHECKPOINT_NAME)
        self.fingerprint = fingerprint
        self.write = write
        self.state: dict[str, Any] | None = None
        self._rng: dict[str, Any] | None = None
        self._started = time.perf_counter()
        self._elapsed_before = 0.0
        exists = os.path.exists(self.path)
        if exists and not resume:
            raise CheckpointError(
                f"{self.path} already exists; pass --resume to continue that run or choose "
                "another --checkpoint-dir"
            )
        if write:
            os.makedirs(directory, exist_ok=True)
        if exists:
            self._load(self.path)
        elif start_from is not None:
            if not os.path.isfile(start_from):
                raise CheckpointError(f"{start_from}: no such checkpoint file to start from")
            self._load(start_from, may_differ)

    def _load(self, path: str, may_differ: tuple[str, ...] = ()) -> None:
        try:
            saved = torch.load(path, map_location="cpu", weights_only=True)
            fmt, fingerprint = saved["format"], saved["fingerprint"]
            state, rng = saved["state"], saved["rng"]
        except Exception as e:  # unpickling errors vary: any failure means unreadable
            raise CheckpointError(
                f"{path} is corrupt or not a lego checkpoint ({type(e).__name__}: {e}); "
                "delete it to start afresh or choose another --checkpoint-dir"
            ) from None
        if fmt != FORMAT:
            raise CheckpointError(f"{path} has format {fmt}, this version reads {FORMAT}")
        names = sorted(fingerprint.keys() | self.fingerprint.keys())
        differ = [
            n
            for n in names
            if fingerprint.get(n) != self.fingerprint.get(n) and n not in may_differ
        ]
        if differ:
            details = "; ".join(
                f"{n}: checkpoint {fingerprint.get(n)!r}, now {self.fingerprint.get(n)!r}"
                for n in differ
            )
            fix = (
                "resume with the checkpoint's settings or choose another --checkpoint-dir"
                if path == self.path
                else "start from the file of a run with these settings"
            )
            raise CheckpointError(f"{path} was written with other settings ({details}); {fix}")
        self.state, self._rng = state, rng
        self._elapsed_before = saved.get("elapsed_s", 0.0)

    def restore_rng(self) -> None:
        """Put the RNGs back where the loaded checkpoint left them (no-op when fresh)."""
        if self._rng is not None:
            set_rng_state(self._rng)

    def elapsed(self) -> float:
        """Seconds of this process since the checkpointer was made, plus those that the
        loaded checkpoint had recorded."""
        return self._elapsed_before + time.perf_counter() - self._started

    def save(self, state: dict[str, Any], *, also_as: str | None = None) -> None:
        """Atomically replace the checkpoint with ``state`` (tensors, containers and
        plain Python values), this run's fingerprint and the current RNG states;
        ``also_as``: write the same to this file name in the directory too."""
        if self.write:
            saved = {
                "format": FORMAT,
                "fingerprint": self.fingerprint,
                "state": state,
                "rng": rng_state(),
                "elapsed_s": self.elapsed(),
            }
            save_atomic(saved, self.path)
            if also_as is not None:
                save_atomic(saved, os.path.join(self.directory, also_as))
