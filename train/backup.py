"""A `fit` backup that a kill at any instant leaves loadable.

`keras.callbacks.BackupAndRestore` writes `latest.weights.h5` in place and
then opens `training_metadata.json` for writing: a process killed between the
two (or inside either write) leaves an empty or truncated file, and the next
run stops in `json.loads` instead of resuming. `AtomicBackup` commits a
backup in two atomic steps:

  1. the weights go to `epoch_<n>.weights.h5` through a temporary name;
  2. `training_metadata.json` (epoch, batch and the weights' file name) is
     replaced atomically; this rename is the commit point.

Weights files no committed metadata names are removed after the commit. A
kill before step 2 leaves the previous backup in force.
"""

from __future__ import annotations

import glob
import json
import os

import keras

from tfquant import fileio

METADATA = "training_metadata.json"


def committed(backup_dir: str) -> tuple[int, str | None]:
    """(epoch to resume at, weights file) of the last committed backup.

    (0, None) when there is none. Raises ValueError naming the file when the
    metadata is not a backup this module wrote.
    """
    path = os.path.join(backup_dir, METADATA)
    if not os.path.exists(path):
        return 0, None
    with open(path) as stream:
        text = stream.read()
    try:
        state = json.loads(text)
        # Keras's own BackupAndRestore names no file: its weights are
        # latest.weights.h5 (a backup written before this module existed).
        name = state.get("weights", "latest.weights.h5")
        epoch, weights = int(state["epoch"]), os.path.join(backup_dir, name)
    except (ValueError, KeyError, TypeError, AttributeError) as error:
        raise ValueError(
            f"{path} is not a training backup ({error}); remove {backup_dir} to start over"
        ) from None
    if not os.path.exists(weights):
        raise ValueError(f"{path} names {weights}, which does not exist")
    return epoch, weights


class AtomicBackup(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` (epoch frequency) with atomic commits, see above."""

    def __init__(self, backup_dir: str):
        super().__init__(backup_dir, save_freq="epoch", delete_checkpoint=False)

    def on_train_begin(self, logs=None):
        self._load_model()

    def _load_model(self):
        epoch, weights = committed(self.backup_dir)
        if weights is not None:
            self.model.load_weights(weights)
            self.model._initial_epoch = epoch

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"epoch_{self._current_epoch}.weights.h5"
        final = os.path.join(self.backup_dir, name)
        partial = os.path.join(self.backup_dir, f".partial-{os.getpid()}.weights.h5")
        try:
            self.model.save_weights(partial, overwrite=True)
            os.replace(partial, final)
        finally:
            if os.path.exists(partial):
                os.remove(partial)
        state = {"epoch": self._current_epoch, "batch": self._last_batch_seen, "weights": name}
        fileio.write_atomically(os.path.join(self.backup_dir, METADATA), json.dumps(state))
        for stale in glob.glob(os.path.join(self.backup_dir, "*.weights.h5")):
            if os.path.basename(stale) != name:
                os.remove(stale)
