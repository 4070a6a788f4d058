"""Evaluation on the CPU: kNN against a direct computation, metrics, feature extraction on one and two
ranks (gloo), linear probe."""

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from pipeline.eval import (
    balanced_accuracy,
    extract_features,
    knn_accuracy,
    knn_predict,
    per_class_accuracy,
    top1_accuracy,
    train_linear_probe,
)

# ---------------------------------------------------------------- kNN


def direct_knn(train, train_labels, val, k, temperature, num_classes) -> np.ndarray:
    """The weighted kNN vote written out row by row, in float64 numpy."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    val = val / np.linalg.norm(val, axis=1, keepdims=True)
    predictions = []
    for query in val:
        sims = train @ query
        scores = np.zeros(num_classes)
        for j in np.argsort(-sims)[:k]:
            scores[train_labels[j]] += np.exp(sims[j] / temperature)
        predictions.append(scores.argmax())
    return np.array(predictions)


def random_set(n, dim, classes, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g, dtype=torch.float64), torch.randint(0, classes, (n,), generator=g)


@pytest.mark.parametrize("chunk_size", [None, 7])
@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_knn_matches_direct_computation(chunk_size, temperature):
    classes, ks = 5, (1, 5, 8, 20, 40)  # 8 samples per class on average: k runs past a class's size
    train, train_labels = random_set(40, 16, classes, seed=1)
    val, _ = random_set(50, 16, classes, seed=2)
    got = knn_predict(train, train_labels, val, ks, temperature, num_classes=classes, chunk_size=chunk_size)
    assert list(got) == sorted(ks)
    for k in ks:
        expected = direct_knn(train.numpy(), train_labels.numpy(), val.numpy(), k, temperature, classes)
        np.testing.assert_array_equal(got[k].numpy(), expected, err_msg=f"k={k}")


def test_knn_small_temperature_in_float32_does_not_overflow():
    """exp(1 / 0.01) overflows float32; the prediction must still match float64."""
    train, train_labels = random_set(60, 8, 4, seed=3)
    val, _ = random_set(30, 8, 4, seed=4)
    got = knn_predict(train.float(), train_labels, val.float(), (10,), temperature=0.01, num_classes=4)[10]
    expected = direct_knn(train.float().double().numpy(), train_labels.numpy(), val.float().double().numpy(), 10, 0.01, 4)
    np.testing.assert_array_equal(got.numpy(), expected)


def test_knn_edge_cases():
    train, labels = random_set(10, 4, 2, seed=5)
    assert knn_predict(train, labels, train[:3], (10,))[10].shape == (3,)  # k = N_train is allowed
    with pytest.raises(ValueError, match="k=11 exceeds the 10 training samples"):
        knn_predict(train, labels, train[:3], (5, 11))
    with pytest.raises(ValueError, match="positive"):
        knn_predict(train, labels, train[:3], (0, 5))
    with pytest.raises(ValueError, match="unlabeled"):
        knn_predict(train, torch.where(labels == 0, -1, labels), train[:3], (5,))
    with pytest.raises(ValueError, match="no validation features"):
        knn_predict(train, labels, train[:0], (5,))


def test_knn_tie_goes_to_lowest_class():
    train = torch.eye(2)
    query = torch.tensor([[1.0, 1.0]])  # equally similar to both training samples
    assert knn_predict(train, torch.tensor([1, 0]), query, (2,))[2].tolist() == [0]
    assert knn_predict(train, torch.tensor([0, 1]), query, (2,))[2].tolist() == [0]


def clusters(n, classes, dim, noise, seed, centres=None):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) if centres is None else centres
    labels = torch.randint(0, classes, (n,), generator=g)
    return centres[labels] + noise * torch.randn(n, dim, generator=g), labels


def test_knn_separable_clusters_and_random_labels():
    train, train_labels = clusters(1000, 10, 64, 0.3, seed=1)
    val, val_labels = clusters(500, 10, 64, 0.3, seed=2)
    accuracy = knn_accuracy(train, train_labels, val, val_labels)
    assert set(accuracy) == {20, 200} and min(accuracy.values()) > 0.99

    random_train, random_labels = random_set(1000, 64, 10, seed=3)
    random_val, random_val_labels = random_set(2000, 64, 10, seed=4)
    for acc in knn_accuracy(random_train.float(), random_labels, random_val.float(), random_val_labels).values():
        assert 0.06 < acc < 0.14  # chance is 0.1; 2,000 samples give a standard deviation of 0.007


def test_metrics():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 3])
    predictions = torch.tensor([0, 0, 0, 1, 1, 0, 3])
    assert top1_accuracy(predictions, labels) == pytest.approx(5 / 7)
    per_class = per_class_accuracy(predictions, labels, num_classes=4)
    assert per_class[[0, 1, 3]].tolist() == [0.75, 0.5, 1.0] and per_class[2].isnan()
    assert balanced_accuracy(predictions, labels, num_classes=4) == pytest.approx((0.75 + 0.5 + 1.0) / 3)


# ---------------------------------------------------------------- feature extraction


def toy_model() -> nn.Module:
    """Dropout makes the output depend on the mode; the extractor must run it in eval mode."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 16), nn.Dropout(0.5), nn.Linear(16, 8))


def toy_images(n=23):
    g = torch.Generator().manual_seed(7)
    return torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 3, (n,), generator=g)


def fake_batches(images, labels, order, batch_size=4):
    """Batches of the samples in `order`, the last padded with copies of its last sample (valid=False),
    like the evaluation loader's."""
    batches = []
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        pad = batch_size - len(rows)
        rows = torch.cat([rows, rows[-1:].repeat(pad)])
        valid = torch.arange(batch_size) < batch_size - pad
        batches.append(SimpleNamespace(views=[images[rows]], labels=labels[rows], indices=rows, valid=valid))
    return batches


def expected_features(model, images):
    model.eval()
    with torch.no_grad():
        return nn.functional.normalize(model(images), dim=1)


def test_extract_features_valid_rows_in_index_order_and_mode_restored():
    images, labels = toy_images()
    model = toy_model()
    model[1].eval()  # a part kept in eval on purpose stays so
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    features, got_labels, indices = extract_features(model, fake_batches(images, labels, order), "cpu")

    assert model.training and model[2].training and not model[1].training
    assert indices.tolist() == list(range(len(images)))  # each valid sample once, padding dropped
    assert torch.equal(got_labels, labels) and features.dtype == torch.float32
    torch.testing.assert_close(features, expected_features(model, images))
    torch.testing.assert_close(features.norm(dim=1), torch.ones(len(images)))


def test_extract_features_dtypes_and_errors():
    images, labels = toy_images()
    model = toy_model()
    expected = expected_features(model, images)
    batches = fake_batches(images.bfloat16(), labels, torch.arange(len(images)))  # the loader's bf16 views
    features, _, _ = extract_features(model, batches, "cpu", dtype=torch.bfloat16)
    assert features.dtype == torch.float32
    torch.testing.assert_close(features, expected, atol=0.05, rtol=0)

    with pytest.raises(ValueError, match="no batches"):
        extract_features(model, [], "cpu")
    with pytest.raises(ValueError, match=r"\[batch, dim\]"):
        extract_features(nn.Identity(), batches, "cpu")


def _extract_on_two_ranks(rank, init_file, out_dir):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        images, labels = toy_images()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
        # Rank 0 holds 13 samples in 4 batches, rank 1 holds 10 in 3: different row counts to gather.
        mine = order[:13] if rank == 0 else order[13:]
        results = {
            "split": extract_features(toy_model(), fake_batches(images, labels, mine), "cpu"),
            # A rank without any batch still takes part and receives everyone's rows.
            "one_empty": extract_features(toy_model(), fake_batches(images, labels, order) if rank == 0 else [], "cpu"),
        }
        for name, (features, got_labels, indices) in results.items():
            np.savez(Path(out_dir) / f"{name}{rank}.npz", features=features, labels=got_labels, indices=indices)
    finally:
        dist.destroy_process_group()


def test_extract_features_two_ranks_equals_one_process(tmp_path):
    mp.spawn(_extract_on_two_ranks, args=(str(tmp_path / "init"), str(tmp_path)), nprocs=2)
    images, labels = toy_images()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    single = extract_features(toy_model(), fake_batches(images, labels, order), "cpu")
    for name in ("split", "one_empty"):
        for rank in (0, 1):
            got = np.load(tmp_path / f"{name}{rank}.npz")
            np.testing.assert_array_equal(got["indices"], single[2].numpy())
            np.testing.assert_array_equal(got["labels"], single[1].numpy())
            np.testing.assert_allclose(got["features"], single[0].numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------- linear probe


def test_linear_probe_separable_and_deterministic():
    centres = torch.randn(10, 32, generator=torch.Generator().manual_seed(0))
    train, train_labels = clusters(2000, 10, 32, 0.5, seed=1, centres=centres)
    val, val_labels = clusters(1000, 10, 32, 0.5, seed=2, centres=centres)
    train, val = train * 5 + 3, val * 5 + 3  # an offset and scale the BatchNorm in front absorbs
    first = train_linear_probe(train, train_labels, val, val_labels, epochs=10, batch_size=256, seed=3)
    again = train_linear_probe(train, train_labels, val, val_labels, epochs=10, batch_size=256, seed=3)
    assert first.accuracy > 0.95
    assert first.predictions.shape == (1000,) and first.accuracy == top1_accuracy(first.predictions, val_labels)
    for a, b in zip(first.head.state_dict().values(), again.head.state_dict().values()):
        assert torch.equal(a, b)
    assert not first.head.training

    sgd = train_linear_probe(train, train_labels, val, val_labels, epochs=10, batch_size=256, optimizer="sgd", batch_norm=False)
    assert sgd.accuracy > 0.95 and len(sgd.head) == 1


def test_linear_probe_rejects_unlabeled_and_unknown_optimizer():
    features, labels = random_set(20, 4, 2, seed=0)
    with pytest.raises(ValueError, match="unlabeled"):
        train_linear_probe(features, labels - 1, features, labels)
    with pytest.raises(ValueError, match="optimizer"):
        train_linear_probe(features, labels, features, labels, optimizer="lbfgs")
