import torch

from scale_runner import Runner


def test_train_val_returns_metrics(tmp_path, tiny_parts):
    runner = Runner(**tiny_parts(tmp_path))
    metrics = runner.train()
    assert set(metrics) == {'mse', 'val_loss'}
    assert runner.epoch == 2 and runner.iter == 16
    assert (tmp_path / 'checkpoints' / 'epoch_2' / 'manifest.json').is_file()
    runner.close()
