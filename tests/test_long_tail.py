"""Long-tailed shard sets (`create --long-tail`) and balanced evaluation: the CIFAR-LT count profile, the
subset on disk, the balanced held-out split, and per-class / balanced / many-medium-few-shot accuracies."""

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest
import torch

from conftest import ROOT, encode, image_folder, make_shards, random_images, tiny_config
from data_shards import create
from test_create import shard_samples
from data_shards.create import long_tail_counts
from data_shards.shards import read_manifest
from pipeline.eval import accuracy_report, balanced_accuracy, shot_groups

# 5 classes x 40 images, factor 10: floor(40 * 10 ** (-c / 4)) = floor(40, 22.49, 12.65, 7.11, 4.0)
PROFILE_40 = [40, 22, 12, 7, 4]


def samples(folder: Path) -> list[tuple[int, str]]:
    """(label, source name) of every sample of a shard set, in key order."""
    rows = shard_samples(folder)
    return [(int(r["cls"]), json.loads(r["json"])["source"]) for _, r in sorted(rows.items())]


def per_class(folder: Path, num_classes: int) -> list[int]:
    counts = Counter(label for label, _ in samples(folder))
    return [counts[c] for c in range(num_classes)]


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    """5 class folders c0..c4 of 40 random JPEGs each."""
    return image_folder(tmp_path_factory.mktemp("lt") / "src", random_images(200, classes=5, size=20))


# ---------------------------------------------------------------- the profile


def test_profile_matches_published_cifar_lt_counts():
    assert long_tail_counts([5000] * 10, 100) == [5000, 2997, 1796, 1077, 645, 387, 232, 139, 83, 50]  # CIFAR-10-LT
    cifar100 = long_tail_counts([500] * 100, 100)
    assert cifar100[0] == 500 and cifar100[-1] == 5 and sum(cifar100) == 10847  # CIFAR-100-LT, 10,847 images
    assert long_tail_counts([500] * 100, 10)[-1] == 50 and sum(long_tail_counts([5000] * 10, 10)) == 20431
    assert long_tail_counts([40] * 5, 10) == PROFILE_40
    assert long_tail_counts([7, 7, 7], 1) == [7, 7, 7] and long_tail_counts([9], 50) == [9]
    assert long_tail_counts([10] * 4, 1e6) == [10, 1, 1, 1]  # at least one image per class


def test_profile_with_unequal_classes_keeps_its_shape():
    # n_max is the largest head every class can supply at its place: here the head class limits it ...
    assert long_tail_counts([10, 50, 50], 4) == [10, 5, 2]
    # ... here a middle class does (3 images at ratio 1/2 allow a head of 6), and a big tail changes nothing.
    assert long_tail_counts([50, 3, 50], 4) == [6, 3, 1]
    for available in ([13, 80, 41, 29, 55], [100, 90, 80, 70, 60], [5, 500, 500, 500, 500]):
        counts = long_tail_counts(available, 10)
        assert all(k <= a for k, a in zip(counts, available))
        ratios = [10 ** (-c / 4) for c in range(5)]
        assert counts == [max(1, math.floor(counts[0] * r + 1e-9)) for r in ratios]
        assert min(available) <= counts[0] <= max(available)
    with pytest.raises(ValueError):
        long_tail_counts([5, 0, 5], 10)


# ---------------------------------------------------------------- create --long-tail


def test_long_tail_subset_follows_the_profile_and_the_manifest_records_it(src, tmp_path):
    out = make_shards(src, tmp_path / "a", "--long-tail", "10", "--seed", "3")
    manifest = read_manifest(out)
    assert per_class(out, 5) == PROFILE_40 and manifest.num_samples == sum(PROFILE_40)
    assert manifest.class_names == ["c0", "c1", "c2", "c3", "c4"]
    assert manifest.args["long_tail"] == 10 and manifest.args["long_tail_counts"] == PROFILE_40


def test_long_tail_is_reproducible_with_the_seed(src, tmp_path):
    a = make_shards(src, tmp_path / "a", "--long-tail", "10", "--seed", "3")
    b = make_shards(src, tmp_path / "b", "--long-tail", "10", "--seed", "3")
    c = make_shards(src, tmp_path / "c", "--long-tail", "10", "--seed", "4")
    assert samples(a) == samples(b)
    for shard in read_manifest(a).shards:
        assert (a / shard.tar).read_bytes() == (b / shard.tar).read_bytes()
    assert per_class(c, 5) == PROFILE_40
    assert {s for _, s in samples(a)} != {s for _, s in samples(c)}  # another seed, another subset


def test_long_tail_applies_to_training_only_with_a_balanced_disjoint_val_split(src, tmp_path):
    out = make_shards(src, tmp_path / "out", "--long-tail", "10", "--val-fraction", "0.25")
    train, val = samples(out / "train"), samples(out / "val")
    expected = long_tail_counts([30] * 5, 10)
    assert expected == [30, 16, 9, 5, 3]  # the held-out 10 per class come first; 30 per class remain
    assert per_class(out / "train", 5) == expected
    assert per_class(out / "val", 5) == [10] * 5
    train_sources, val_sources = {s for _, s in train}, {s for _, s in val}
    assert len(train_sources) == len(train) and len(val_sources) == len(val)
    assert not train_sources & val_sources
    assert all(s.startswith(f"c{label}/") for label, s in train + val)
    assert read_manifest(out / "train").args["long_tail_counts"] == expected
    # The held-out images are those a balanced run with the same seed holds out.
    plain = make_shards(src, tmp_path / "plain", "--val-fraction", "0.25")
    assert samples(plain / "val") == val
    assert train_sources <= {s for _, s in samples(plain / "train")}


def test_unlabeled_source_is_refused(tmp_path, capsys):
    flat = image_folder(tmp_path / "flat", {f"{i}.png": encode(torch.full((8, 8, 3), i, dtype=torch.uint8).numpy()) for i in range(6)})
    out = tmp_path / "out"
    assert create.main([str(flat), str(out), "--workers", "1", "--long-tail", "10"]) == 2
    assert "--long-tail needs labels" in capsys.readouterr().err
    assert not (out / "manifest.json").exists() and not (out / ".incomplete").exists()


def test_bad_factor_and_empty_class_are_refused(tmp_path, capsys):
    with pytest.raises(SystemExit):
        create.parse_args(["src", "out", "--long-tail", "0.5"])
    listing = tmp_path / "list.txt"  # integer labels 0..2 with no image of class 1
    image_folder(tmp_path, {f"{i}.png": encode(torch.full((8, 8, 3), i, dtype=torch.uint8).numpy()) for i in range(4)})
    listing.write_text("0.png,0\n1.png,2\n2.png,0\n3.png,2\n")
    assert create.main([str(listing), str(tmp_path / "out"), "--workers", "1", "--long-tail", "10"]) == 2
    assert "['1'] have no training images" in capsys.readouterr().err


# ---------------------------------------------------------------- metrics


def test_report_on_a_predictor_right_on_head_classes_and_wrong_on_tail_classes():
    # Training counts: class 0 many-shot (150), 1 medium (50), 2 and 3 few (10 and 0).
    train_labels = torch.tensor([0] * 150 + [1] * 50 + [2] * 10)
    # Unbalanced evaluation set: 30, 10, 5 and 0 images; class 3 is never evaluated.
    labels = torch.tensor([0] * 30 + [1] * 10 + [2] * 5)
    predictions = labels.clone()
    predictions[30:34] = 2  # class 1: 6 of 10 right
    predictions[40:] = 0  # class 2: always wrong
    report = accuracy_report(predictions, labels, train_labels, num_classes=4)
    assert report["top1"] == pytest.approx(36 / 45)
    assert report["balanced"] == pytest.approx((1 + 0.6 + 0) / 3)
    assert report["balanced"] == pytest.approx(balanced_accuracy(predictions, labels, 4))
    assert report["per_class"] == [1.0, pytest.approx(0.6), 0.0, None]
    assert (report["many"], report["medium"], report["few"]) == (1.0, pytest.approx(0.6), 0.0)
    assert (report["many_classes"], report["medium_classes"], report["few_classes"]) == (1, 1, 2)
    json.dumps(report, allow_nan=False)

    # Thresholds are parameters; a group without classes (or without evaluated classes) is None.
    report = accuracy_report(predictions, labels, train_labels, num_classes=4, many=200, few=5)
    assert report["many"] is None and report["medium"] == pytest.approx((1 + 0.6 + 0) / 3) and report["few"] is None
    assert shot_groups(train_labels, 4, many=200, few=5) == {"many": [], "medium": [0, 1, 2], "few": [3]}


def test_shot_group_boundaries_follow_the_standard_thresholds():
    counts = [101, 100, 20, 19, 0]
    train_labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    assert shot_groups(train_labels, 5) == {"many": [0], "medium": [1, 2], "few": [3, 4]}
    with pytest.raises(ValueError):
        shot_groups(train_labels, 5, many=10, few=20)
    with pytest.raises(ValueError):
        accuracy_report(torch.tensor([0]), torch.tensor([5]), train_labels, num_classes=5)


def test_balanced_report_on_a_long_tailed_set_weights_classes_equally():
    """Always right on the head classes, always wrong on the tail: top-1 on the long-tailed training
    distribution looks good, balanced accuracy on balanced held-out images does not."""
    train_labels = torch.tensor(sum(([c] * n for c, n in enumerate([300, 120, 60, 25, 10])), []))
    val = torch.arange(5).repeat_interleave(20)
    predictions = torch.where(val < 2, val, torch.zeros_like(val))  # classes 0, 1 right; 2, 3, 4 -> class 0
    report = accuracy_report(predictions, val, train_labels, num_classes=5)
    assert report["balanced"] == pytest.approx(0.4) == report["top1"]  # balanced val: the two agree
    assert report["per_class"] == [1.0, 1.0, 0.0, 0.0, 0.0]
    assert (report["many"], report["medium"], report["few"]) == (1.0, 0.0, 0.0)
    on_train = accuracy_report(torch.where(train_labels < 2, train_labels, 0), train_labels, train_labels, 5)
    assert on_train["top1"] == pytest.approx(420 / 515) and on_train["balanced"] == pytest.approx(0.4)


# ---------------------------------------------------------------- evaluate.py on a long-tailed set


def test_evaluate_reports_balanced_and_group_accuracies(src, tmp_path, capsys):
    from models.backbones import create_backbone
    from models.export import encoder_spec, write_timm_folder

    shards = make_shards(src, tmp_path / "shards", "--long-tail", "10", "--val-fraction", "0.25")
    cfg = tiny_config("simclr", "data.eval_size=16", "data.eval_resize=16")
    model = create_backbone(cfg.model, 16)
    write_timm_folder(tmp_path / "backbone", model.state_dict(), encoder_spec(model), cfg, {"step": 0})
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "launch" / "evaluate.py")
    evaluate = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(evaluate)
    capsys.readouterr()  # the shard creation's report
    argv = ["--backbone", f"local-dir:{tmp_path / 'backbone'}", "--train", str(shards / "train"), "--val", str(shards / "val"),
            "--batch-size", "16", "--linear-epochs", "2", "--many-shot", "10", "--few-shot", "5"]
    assert evaluate.main(argv) == 0
    result = json.loads(capsys.readouterr().out)

    assert result["train_class_counts"] == [30, 16, 9, 5, 3] and result["val_images"] == 50
    assert (result["many_shot_classes"], result["medium_shot_classes"], result["few_shot_classes"]) == (2, 2, 1)
    assert "knn_k200_balanced" not in result  # k = 200 exceeds the 63 training images
    for prefix, top1 in (("knn_k20", "knn_top1_k20"), ("feature_probe", "feature_probe_top1")):
        per_class = result[f"{prefix}_per_class"]
        assert len(per_class) == 5 and all(0 <= a <= 1 for a in per_class)
        assert result[f"{prefix}_balanced"] == pytest.approx(sum(per_class) / 5)
        assert result[top1] == pytest.approx(sum(per_class) / 5)  # 10 held-out images per class
        assert result[f"{prefix}_many"] == pytest.approx(sum(per_class[:2]) / 2)
        assert result[f"{prefix}_medium"] == pytest.approx(sum(per_class[2:4]) / 2)
        assert result[f"{prefix}_few"] == pytest.approx(per_class[4])
