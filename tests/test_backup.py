"""The training backup is committed atomically and resumes where it left off."""

import json
import os

import keras
import numpy as np
import pytest

from train import backup


def _model():
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer="sgd", loss="mse")
    return model


def _data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(16, 3)).astype("float32"), rng.normal(size=(16, 2)).astype("float32")


def test_each_epoch_commits_one_weights_file_and_resume_starts_after_it(tmp_path):
    x, y = _data()
    model = _model()
    model.fit(x, y, epochs=2, verbose=0, callbacks=[backup.AtomicBackup(str(tmp_path))])
    assert sorted(os.listdir(tmp_path)) == ["epoch_2.weights.h5", backup.METADATA]
    epoch, weights = backup.committed(str(tmp_path))
    assert epoch == 2 and weights == str(tmp_path / "epoch_2.weights.h5")

    resumed = _model()
    history = resumed.fit(x, y, epochs=3, verbose=0, callbacks=[backup.AtomicBackup(str(tmp_path))])
    assert history.epoch == [2]
    assert backup.committed(str(tmp_path))[0] == 3


def test_a_write_that_dies_leaves_the_previous_backup_in_force(tmp_path, monkeypatch):
    x, y = _data()
    model = _model()
    model.fit(x, y, epochs=1, verbose=0, callbacks=[backup.AtomicBackup(str(tmp_path))])
    saved = [w.copy() for w in model.get_weights()]

    def dies(self, filepath, overwrite=True):
        with open(filepath, "wb") as stream:
            stream.write(b"\x89HDF half")
        raise KeyboardInterrupt

    monkeypatch.setattr(keras.Model, "save_weights", dies)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, epochs=2, verbose=0, callbacks=[backup.AtomicBackup(str(tmp_path))])
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["epoch_1.weights.h5", backup.METADATA]
    restored = _model()
    history = restored.fit(
        x, y, epochs=1, verbose=0, callbacks=[backup.AtomicBackup(str(tmp_path))]
    )
    assert history.epoch == []  # epoch 1 of 1 is done
    restored.load_weights(backup.committed(str(tmp_path))[1])
    for a, b in zip(restored.get_weights(), saved, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("text", ["", '{"epoch": ', "[1]", '{"batch": 0}'])
def test_metadata_that_is_not_a_backup_is_named(tmp_path, text):
    (tmp_path / backup.METADATA).write_text(text)
    with pytest.raises(ValueError, match=backup.METADATA):
        backup.committed(str(tmp_path))


def test_metadata_naming_a_missing_weights_file_is_named(tmp_path):
    (tmp_path / backup.METADATA).write_text(json.dumps({"epoch": 1, "weights": "gone.weights.h5"}))
    with pytest.raises(ValueError, match="gone.weights.h5"):
        backup.committed(str(tmp_path))


def test_a_backup_written_by_keras_backup_and_restore_still_resumes(tmp_path):
    x, y = _data()
    model = _model()
    callback = keras.callbacks.BackupAndRestore(str(tmp_path), delete_checkpoint=False)
    model.fit(x, y, epochs=1, verbose=0, callbacks=[callback])
    epoch, weights = backup.committed(str(tmp_path))
    assert epoch == 1 and weights.endswith("latest.weights.h5")
