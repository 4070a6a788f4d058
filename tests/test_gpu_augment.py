"""On a GPU, DALI's "mixed" JPEG decoding and the augmentations on the GPU give what the CPU pipeline gives
from the same shards and seed: DALI draws every random parameter (crop boxes, jitter factors, coin flips)
on the CPU in the same order for both devices, so only decoding and arithmetic may differ, by a few grey
levels. The crop boxes are compared exactly first, so a change in the random streams is told apart from
a decoding difference."""

import numpy as np
import pytest
import torch

from conftest import encode, image_folder, make_shards
from pipeline.config import DataConfig, ViewPreset
from pipeline.data.loader import ShardLoader

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def smooth_jpegs(tmp_path_factory):
    """24 JPEGs of smooth colour gradients with a few edges, of several sizes: content on which any two
    correct JPEG decoders agree to a grey level or two (noise would magnify their rounding differences)."""
    root = tmp_path_factory.mktemp("smooth")
    rng = np.random.default_rng(0)
    images = {}
    for i in range(24):
        h, w = 48 + 8 * (i % 4), 64 + 8 * (i % 3)
        y, x = np.mgrid[0:h, 0:w] / max(h, w)
        a, b, c = rng.uniform(0.2, 1.0, 3)
        pixels = np.stack([a * x, b * y, c * (1 - x * y)], -1) * 255
        pixels[h // 4 : h // 2, w // 3 : w // 2] = rng.uniform(0, 255, 3)  # a flat block: edges to crop and blur
        images[f"c{i % 2}/{i:02d}.jpg"] = encode(pixels.astype(np.uint8), "JPEG", quality=95)
    return make_shards(image_folder(root / "src", images), root / "shards")


def first_batch(shards, cfg: DataConfig, device_id):
    return next(iter(ShardLoader(shards, cfg, train=True, device_id=device_id, debug=True)))


@pytest.mark.parametrize("hw_decoder_load", [0.0, 0.9], ids=["cuda-decoder", "hardware-decoder"])
def test_gpu_views_match_the_cpu_views(smooth_jpegs, hw_decoder_load):
    cfg = DataConfig(views=ViewPreset(preset="byol", size=32), batch_size=8, num_threads=2, shuffle_buffer=16,
                     hw_decoder_load=hw_decoder_load)
    cpu = first_batch(smooth_jpegs, cfg, None)
    gpu = first_batch(smooth_jpegs, cfg, 0)
    assert torch.equal(cpu.indices, gpu.indices)
    for name in cpu.debug:  # crop anchors and extents per view, the decoded shapes
        assert torch.equal(cpu.debug[name].cpu(), gpu.debug[name].cpu()), f"{name}: the random streams differ"
    for i, (recipe, a, b) in enumerate(zip(cfg.view_recipes(), cpu.views, gpu.views)):
        assert b.is_cuda and b.shape == a.shape and b.dtype == a.dtype
        std = torch.tensor(recipe.std).view(1, 3, 1, 1)
        levels = ((a - b.cpu()).abs() * std * 255).flatten()  # back to 8-bit grey levels
        mean, p99 = levels.mean().item(), levels.quantile(0.99).item()
        assert mean <= 2.0 and p99 <= 8.0, (
            f"view {i}: GPU and CPU views differ by {mean:.2f} grey levels on average, {p99:.1f} at the 99th "
            f"percentile, {levels.max().item():.1f} at most")
