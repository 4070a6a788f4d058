"""On a GPU, one training step of every method never waits for the host (no .item(), no host-to-device
copies of fresh tensors): torch.cuda.set_sync_debug_mode("error") turns any such wait into an error."""

import pytest
import torch

from conftest import tiny_config
from pipeline.config import REGISTRY
from pipeline.methods import build_method

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
BUILT_IN = [name for name, cls in REGISTRY.items() if cls.method_class.__module__.startswith("pipeline.methods")]


@pytest.mark.parametrize("name", BUILT_IN)
@pytest.mark.parametrize("feature_aug", [False, True], ids=["plain", "feature_aug"])
def test_one_step_does_not_sync_with_the_host(name, feature_aug):
    extra = ["method.feature_aug={prototypes: 4, heads: 2, memory: 32}"] if feature_aug else []
    if feature_aug and "feature_aug" not in REGISTRY[name].model_fields:
        pytest.skip(f"{name} has no feature augmentation")
    torch.manual_seed(0)
    method = build_method(tiny_config(name, *extra)).cuda()
    method.start_epoch(0)  # k-means and masks before the step, as the loop runs them
    views = [torch.randn(4, 3, 16, 16, device="cuda") for _ in range(2)]
    method(views)  # a first step: lazily built state (generators on the device) may copy once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, parts = method(views)
        loss.backward()
        method.after_step(0.5)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item()
