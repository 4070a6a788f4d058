"""The DALI pipeline on the CPU: shapes, dtypes, each augmentation, epochs across ranks, resume."""

from collections import Counter

import numpy as np
import pytest
import torch

from conftest import encode, image_folder, make_shards
from data_shards.shards import read_manifest
from pipeline.config import Blur, ColorJitter, DataConfig, ViewPreset, ViewRecipe
from pipeline.data.loader import ShardLoader, parse_decimal

HALF = (0.5, 0.5, 0.5)


def plain(size=16, **kw) -> ViewRecipe:
    """A view with every augmentation off unless asked for, normalised to [-1, 1]."""
    base = dict(size=size, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=0.0, color_jitter=None, grayscale=0.0, mean=HALF, std=HALF)
    return ViewRecipe(**{**base, **kw})


def config(views, batch_size=8, **kw) -> DataConfig:
    return DataConfig(views=views, batch_size=batch_size, num_threads=1, shuffle_buffer=16, **kw)


def first_batch(folder, cfg, **kw):
    return next(iter(ShardLoader(folder, cfg, **kw)))


def to_pixels(view: torch.Tensor) -> torch.Tensor:
    """Undo the [-1, 1] normalisation of `plain` views."""
    return (view.float() * 0.5 + 0.5) * 255


@pytest.fixture(scope="module")
def patterns(tmp_path_factory):
    """32x32 images: left half dark, right half bright, with a colour tint; and a checkerboard."""
    root = tmp_path_factory.mktemp("patterns")
    halves = np.zeros((32, 32, 3), np.uint8)
    halves[:, 16:] = 220
    halves[..., 0] = np.maximum(halves[..., 0], 90)  # red tint everywhere
    checker = ((np.indices((32, 32)).sum(0) % 2) * 255).astype(np.uint8)[..., None].repeat(3, -1)
    images = {f"a/{i}.png": encode(halves) for i in range(12)} | {f"b/{i}.png": encode(checker) for i in range(12)}
    return make_shards(image_folder(root / "src", images), root / "shards")


def text_rows(texts, width=18):
    """Rows as the reader makes them: [length, text zero-padded to `width`]."""
    rows = torch.zeros(len(texts), 1 + width, dtype=torch.uint8)
    for r, text in enumerate(texts):
        rows[r, 0] = len(text)
        rows[r, 1 : 1 + len(text)] = torch.tensor(list(text), dtype=torch.uint8)
    return rows


@pytest.mark.parametrize(
    "text, limit, expected",
    [
        (b"0", 10, 0),
        (b"9", 10, 9),
        (b"123456789012345678", 10**18, 123456789012345678),
        (b"", 10, None),  # empty
        (b"10", 10, None),  # out of range
        (b"-3", 10, None),  # was 3
        (b"1.5", 100, None),  # was 15
        (b"abc", 10, None),  # was -1, i.e. silently "unlabeled"
        (b"07", 10, None),  # not canonical
        (b"3\0", 10, None),  # a NUL inside, not padding
        (b" 3", 10, None),
        (b"\xc2\xb3", 10, None),  # a Unicode digit
    ],
)
def test_parse_decimal_is_strict(text, limit, expected):
    values, ok = parse_decimal(text_rows([text]), limit)
    assert bool(ok[0]) == (expected is not None)
    assert values[0].item() == (expected if expected is not None else -1)


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_shapes_dtypes_labels_indices(small_shards, dtype):
    batch = first_batch(small_shards, config(ViewPreset(preset="simclr", size=20, blur=True), dtype=dtype))
    assert len(batch.views) == 2
    for v in batch.views:
        assert v.shape == (8, 3, 20, 20) and v.dtype == getattr(torch, dtype) and v.device.type == "cpu"
    assert batch.labels.dtype == torch.int64 and set(batch.labels.tolist()) <= {0, 1, 2}
    assert len(set(batch.indices.tolist())) == 8 and batch.valid.all()


def test_labels_and_indices_match_the_shards(cifar_shards):
    """Every sample's label and index, as read by DALI, equal the stored .cls and .id."""
    from test_create import shard_samples

    stored = {int(s["id"]): int(s["cls"]) for s in shard_samples(cifar_shards).values()}
    loader = ShardLoader(cifar_shards, config(ViewPreset(preset="simclr", size=32), batch_size=100), train=False)
    seen = {}
    for batch in loader:
        seen.update(zip(batch.indices[batch.valid].tolist(), batch.labels[batch.valid].tolist()))
    assert seen == stored


def test_normalisation(patterns):
    recipe = plain(size=32, mean=(0.4, 0.5, 0.6), std=(0.2, 0.25, 0.3))
    batch = first_batch(patterns, config([recipe], batch_size=24))
    view = batch.views[0][batch.labels == 0]
    mean, std = torch.tensor(recipe.mean), torch.tensor(recipe.std)
    for columns, rgb in ((slice(2, 12), (90, 0, 0)), (slice(20, 30), (220, 220, 220))):
        expected = (torch.tensor(rgb) / 255 - mean) / std
        got = view[:, :, :, columns].permute(0, 2, 3, 1).reshape(-1, 3)
        assert torch.allclose(got, expected.expand_as(got), atol=1e-3)


def test_flips_flip(patterns):
    for flip, dark_side in ((0.0, slice(0, 6)), (1.0, slice(10, 16))):
        batch = first_batch(patterns, config([plain(flip=flip)], batch_size=24))
        pixels = to_pixels(batch.views[0])[batch.labels == 0]
        assert pixels[:, 1, :, dark_side].max() < 2, f"flip={flip}"


def test_crop_areas_and_ratios_within_the_recipe(small_shards):
    recipe = plain(scale=(0.2, 0.5), ratio=(0.5, 2.0))
    loader = ShardLoader(small_shards, config([recipe], batch_size=30), debug=True)
    areas, ratios = [], []
    for batch in loader:
        shape, extent = batch.debug["shape"], batch.debug["extent0"].float()
        areas += (extent[:, 0] * extent[:, 1] / (shape[:, 0] * shape[:, 1])).tolist()
        ratios += (extent[:, 1] / extent[:, 0]).tolist()
        anchor = batch.debug["anchor0"]
        assert (anchor >= 0).all() and (anchor + extent.int() <= shape[:, :2]).all()
    assert min(areas) > 0.2 * 0.8 and max(areas) < 0.5 * 1.2  # rounding to whole pixels on ~24 px images
    assert min(ratios) > 0.5 * 0.8 and max(ratios) < 2.0 * 1.25
    assert max(areas) - min(areas) > 0.1  # the area actually varies


def test_grayscale_and_jitter(patterns):
    gray = first_batch(patterns, config([plain(grayscale=1.0)], batch_size=24)).views[0]
    assert torch.allclose(gray[:, 0], gray[:, 1], atol=0.02) and torch.allclose(gray[:, 1], gray[:, 2], atol=0.02)
    same = first_batch(patterns, config([plain()], batch_size=24)).views[0]
    assert not torch.allclose(same[:, 0], same[:, 1], atol=0.02)
    jitter = ColorJitter(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, probability=1.0)
    jittered = first_batch(patterns, config([plain(color_jitter=jitter)], batch_size=24)).views[0]
    means = jittered[:, 0].mean((1, 2))
    assert means.std() > 0.05  # each image its own colour change
    none = first_batch(patterns, config([plain(color_jitter=jitter.model_copy(update={"probability": 0.0}))], batch_size=24))
    assert torch.equal(none.views[0], same)


def _solarized_share(patterns, p):
    batch = first_batch(patterns, config([plain(size=32, solarize=p)], batch_size=24))
    pixels = to_pixels(batch.views[0])
    bright = pixels[:, 1, :, 24:].mean((1, 2))  # right half: 220 when plain (patterns "a"), 255 or 0 (checker)
    return ((bright < 128) & (batch.labels == 0)).sum().item() / (batch.labels == 0).sum().item()


def test_solarize_probability(patterns):
    assert _solarized_share(patterns, 0.0) == 0
    assert _solarized_share(patterns, 1.0) == 1
    shares = [_solarized_share(patterns, 0.5)]
    assert 0 < shares[0] < 1


def test_blur_probability(patterns):
    def checker_contrast(blur):
        batch = first_batch(patterns, config([plain(size=32, blur=blur)], batch_size=24))
        pixels = to_pixels(batch.views[0])[batch.labels == 1]
        return pixels.std((1, 2, 3))

    sharp = checker_contrast(None)
    always = checker_contrast(Blur(probability=1.0, sigma=(2.0, 2.0)))
    never = checker_contrast(Blur(probability=0.0))
    assert (always < 0.2 * sharp).all() and torch.equal(never, sharp)


def test_byol_views_are_asymmetric(patterns):
    first, second = ViewPreset(preset="byol", size=32).recipes()
    assert (first.blur.probability, first.solarize) == (1.0, 0.0)
    assert (second.blur.probability, second.solarize) == (0.1, 0.2)
    # Behaviour: over many images the first view is never solarised and the second sometimes is.
    views = [plain(size=32, solarize=first.solarize), plain(size=32, solarize=second.solarize)]
    loader = ShardLoader(patterns, config(views, batch_size=12))
    flipped = Counter()
    for _ in range(8):
        for batch in loader:
            for i, v in enumerate(batch.views):
                bright = to_pixels(v)[:, 1, :, 24:].mean((1, 2))
                flipped[i] += ((bright < 128) & (batch.labels == 0)).sum().item()
    assert flipped[0] == 0 and flipped[1] > 0


def test_multicrop_sizes(small_shards):
    cfg = config(ViewPreset(preset="multicrop", size=24, local_size=12, local_views=3))
    batch = first_batch(small_shards, cfg)
    assert [tuple(v.shape[-2:]) for v in batch.views] == [(24, 24)] * 2 + [(12, 12)] * 3


# --- epochs, ranks and resume -------------------------------------------------------------------------


def epoch_indices(loader):
    return [i for batch in loader for i in batch.indices[batch.valid].tolist()]


@pytest.mark.parametrize("world_size", [2, 3])
def test_each_sample_once_per_epoch_across_ranks(small_shards, world_size):
    n = read_manifest(small_shards).num_samples  # 60
    cfg = config([plain()], batch_size=5 if world_size == 3 else 10)
    loaders = [ShardLoader(small_shards, cfg, rank=r, world_size=world_size) for r in range(world_size)]
    for _ in range(2):  # the second epoch rotates the DALI shards between ranks
        seen = [i for loader in loaders for i in epoch_indices(loader)]
        assert sorted(seen) == list(range(n))
    evals = [ShardLoader(small_shards, config([plain()], batch_size=7), train=False, rank=r, world_size=world_size) for r in range(world_size)]
    assert sorted(i for e in evals for i in epoch_indices(e)) == list(range(n))


def test_train_epoch_drops_only_the_incomplete_tail(small_shards):
    loaders = [ShardLoader(small_shards, config([plain()], batch_size=8), rank=r, world_size=2) for r in range(2)]
    assert len(loaders[0]) == 3  # 30 samples per rank -> 3 full batches of 8
    for _ in range(3):
        seen = [i for loader in loaders for i in epoch_indices(loader)]
        assert len(seen) == len(set(seen)) == 48


def record(loader, steps):
    out = []
    while len(out) < steps:
        for batch in loader:
            out.append((batch.indices.clone(), [v.clone() for v in batch.views]))
            if len(out) == steps:
                break
    return out


@pytest.mark.parametrize("stop_after", [2, 4])  # mid-epoch, and exactly at the end of an epoch
def test_resume_continues_with_the_same_samples_and_augmentations(small_shards, stop_after):
    cfg = config(ViewPreset(preset="byol", size=16), batch_size=6)
    reference = ShardLoader(small_shards, cfg, rank=1, world_size=2)  # 5 steps per epoch
    record(reference, stop_after)
    state = reference.state_dict()
    expected = record(reference, 7)  # crosses into the next epoch
    resumed = ShardLoader(small_shards, cfg, rank=1, world_size=2, state=state)
    got = record(resumed, 7)
    for (ei, ev), (gi, gv) in zip(expected, got):
        assert torch.equal(ei, gi)
        assert all(torch.equal(a, b) for a, b in zip(ev, gv))
    assert resumed.state_dict()["epoch"] == reference.state_dict()["epoch"]


def test_position_from_another_world_size_is_refused(small_shards):
    cfg = config([plain()])
    state = ShardLoader(small_shards, cfg, world_size=2).state_dict()
    with pytest.raises(ValueError, match="world_size"):
        ShardLoader(small_shards, cfg, world_size=3, state=state)


def test_evaluation_reader_resizes_and_centre_crops(patterns):
    cfg = config([plain()], batch_size=24, eval_size=16, eval_resize=32)
    batch = first_batch(patterns, cfg, train=False)
    assert batch.views[0].shape == (24, 3, 16, 16)
    pixels = to_pixels(batch.views[0])[batch.labels == 0]
    # the centre 16x16 of a 32x32 image with the dark/bright edge at x=16
    assert pixels[:, 1, :, :7].max() < 2 and pixels[:, 1, :, 9:].min() > 218


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_pipeline_matches_the_cpu_shapes(small_shards):
    cfg = config(ViewPreset(preset="byol", size=16), dtype="bfloat16")
    batch = first_batch(small_shards, cfg, device_id=0)
    assert all(v.is_cuda and v.dtype == torch.bfloat16 and v.shape == (8, 3, 16, 16) for v in batch.views)
    cpu = first_batch(small_shards, cfg, train=False)
    gpu = first_batch(small_shards, cfg, train=False, device_id=0)
    assert torch.equal(cpu.indices, gpu.indices)
    assert (cpu.views[0].float() - gpu.views[0].float().cpu()).abs().max() < 0.1
