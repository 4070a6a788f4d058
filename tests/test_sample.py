"""The embedded default dataset: real digit scans from scikit-learn, no network."""

from data_shards import sample, verify
from data_shards.shards import read_manifest
from pipeline.config import DataConfig, ViewPreset
from pipeline.data.loader import ShardLoader


def test_sample_builds_labeled_train_and_val(tmp_path):
    assert sample.main([str(tmp_path / "digits")]) == 0
    train, val = read_manifest(tmp_path / "digits" / "train"), read_manifest(tmp_path / "digits" / "val")
    assert train.class_names == val.class_names == [str(d) for d in range(10)]
    assert (train.num_samples, val.num_samples) == (1438, 359)
    assert verify.verify(tmp_path / "digits" / "train") == [] and verify.verify(tmp_path / "digits" / "val") == []
    cfg = DataConfig(views=ViewPreset(preset="simclr", size=32, blur=False), batch_size=64, num_threads=1)
    batch = next(iter(ShardLoader(tmp_path / "digits" / "train", cfg)))
    assert batch.views[0].shape == (64, 3, 32, 32) and set(batch.labels.tolist()) <= set(range(10))
