import io
import pipeline.methods  # noqa: F401  (registers the methods load_config validates against)
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from data_shards import create

ROOT = Path(__file__).resolve().parents[1]


def shared_datasets() -> Path | None:
    """../shared/datasets beside the checkout (or $SHARED_DATASETS)."""
    candidates = [os.environ.get("SHARED_DATASETS"), ROOT.parent / "shared" / "datasets", "/work/shared/datasets"]
    for c in candidates:
        if c and Path(c).is_dir():
            return Path(c)
    return None


def shared_file(name: str) -> Path:
    folder = shared_datasets()
    if folder is None or not (folder / name).is_file():
        pytest.skip(f"{name} not found in ../shared/datasets (set SHARED_DATASETS to its folder)")
    return folder / name


def encode(pixels: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, fmt, **kw)
    return buf.getvalue()


def image_folder(root: Path, images: dict[str, bytes]) -> Path:
    """Write {relative path: bytes} under root."""
    for rel, data in images.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def random_images(n: int, classes: int = 3, size: int = 24, seed: int = 0, fmt: str = "JPEG") -> dict[str, bytes]:
    rng = np.random.default_rng(seed)
    ext = "jpg" if fmt == "JPEG" else "png"
    return {
        f"c{i % classes}/{i:04d}.{ext}": encode(rng.integers(0, 256, (size, size + i % 5, 3), dtype=np.uint8), fmt)
        for i in range(n)
    }


def make_shards(src: Path, out: Path, *extra: str) -> Path:
    assert create.main([str(src), str(out), "--workers", "1", *extra]) == 0
    return out


@pytest.fixture(scope="session")
def cifar_archive() -> Path:
    return shared_file("cifar10-train.tar.gz")


@pytest.fixture(scope="session")
def cifar_shards(cifar_archive, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cifar") / "shards"
    assert create.main([str(cifar_archive), str(out), "--limit", "2000", "--workers", "2", "--shard-size-mb", "1"]) == 0
    return out


@pytest.fixture(scope="session")
def small_shards(tmp_path_factory) -> Path:
    """60 random labeled images in 3 classes, a few shards."""
    root = tmp_path_factory.mktemp("small")
    src = image_folder(root / "src", random_images(60))
    return make_shards(src, root / "shards", "--shard-size-mb", "0.05")


def logged(run: Path, tag: str) -> list[float]:
    """What a training run under `run` logged to TensorBoard as `tag`, in step order (the loop's kNN monitor,
    `eval/knn_top1`, runs before the first step and after the last)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(Path(run) / "tensorboard"))
    events.Reload()
    return [e.value for e in events.Scalars(tag)]


def tiny_config(method: str = "simclr", *extra: str):
    """A configuration small enough for CPU tests: timm's test ViT at 16x16, heads without BatchNorm
    (so results do not depend on how a batch is split across ranks)."""
    from pipeline.config import load_config

    overrides = [
        f"method.name={method}",
        "data.views=[{size: 16}, {size: 16}]",
        "data.batch_size=4",
        "model.backbone=test_vit",
        "model.projector={hidden_dim: 32, out_dim: 16, layers: 1}",
        "method.batch_norm=local",
        "engine.precision=fp32",
    ]
    if method == "mocov2":
        overrides.append("method.queue_size=16")
    if "mocov3" in method:
        overrides.append("model.predictor={hidden_dim: 32, out_dim: 16, layers: 1}")
    return load_config(None, overrides + list(extra))


@pytest.fixture(scope="session")
def digits(tmp_path_factory) -> Path:
    """The embedded default dataset (data_shards.sample): train/ and val/ shard sets."""
    from data_shards import sample

    out = tmp_path_factory.mktemp("digits")
    assert sample.build(out) == 0
    return out
