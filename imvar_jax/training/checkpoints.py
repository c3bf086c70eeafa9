"""A training run's checkpoints with orbax's ``CheckpointManager``: the whole ``TrainState`` plus JSON extras.

Each checkpoint holds the step, the float32 params, the optimizer state, the EMA and the run's
key data (``TrainState``), and a JSON record beside it (the data iterator's position, the
settings) so a restarted run continues exactly where the saved one was. Saving is asynchronous
where orbax can be (the next steps run while the arrays are written); ``wait()`` before reading
a checkpoint back or exiting. Only the last ``keep`` checkpoints stay.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp

from .step import TrainState


class RunCheckpoints:
    """The checkpoints under ``folder`` (a run's ``checkpoints/``), one per saved step."""

    def __init__(self, folder: str | os.PathLike, *, save_every: int, keep: int = 3) -> None:
        self.folder = Path(folder).absolute()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=save_every,
                                               enable_async_checkpointing=True, create=True)
        self._manager = ocp.CheckpointManager(self.folder, options=options)

    def save(self, step: int, state: TrainState, extra: dict[str, Any], *, force: bool = False) -> bool:
        """Save at ``step`` if it is a save step (or ``force``); returns whether a save was started.

        The state is replicated, so it is copied to host memory first and saved from there: orbax
        saving device arrays compiled a small program per array shape (hundreds for the UNet) and
        made a tiny run's saves take seconds each. Writing the files stays asynchronous.
        """
        if not self._manager.should_save(step) and not force:
            return False
        host = jax.device_get(state)
        return self._manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(host),
                                                                 extra=ocp.args.JsonSave(extra)), force=force)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, like: TrainState, step: int | None = None) -> tuple[TrainState, dict[str, Any]]:
        """The state saved at ``step`` (default: the latest), with ``like``'s structure, dtypes and shardings."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"{self.folder}: no checkpoint to resume from")
        abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
        got = self._manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract),
                                                                   extra=ocp.args.JsonRestore()))
        return got.state, got.extra

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()
