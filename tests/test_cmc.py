"""CMC: the Lab conversion against scikit-image, the cross-view loss against a float64 definition, gradients
at world size 2 against one process, views that are not raw sRGB refused, and two training steps whose
export gives the L and ab encoders as timm folders and the concatenated features back."""

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from skimage.color import rgb2lab

from conftest import logged, tiny_config
from distributed_utils import average_over_ranks, spawn
from models.colour import LAB_RANGES, rgb_to_lab, scale_lab
from pipeline.config import ConfigError, load_config
from pipeline.methods import build_method
from pipeline.methods.cmc import lab_views

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"
RAW = "{size: 16, color_jitter: null, grayscale: 0.0, mean: [0, 0, 0], std: [1, 1, 1]}"
RAW_VIEWS = f"data.views=[{RAW}]"
GLOBAL_BATCH = 8


def cmc_config(*extra):
    return tiny_config("cmc", RAW_VIEWS, *extra)


def images(rows=GLOBAL_BATCH, size=16, seed=0):
    return torch.rand(rows, 3, size, size, generator=torch.Generator().manual_seed(seed))


# --- Lab --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_lab_is_skimages_rgb2lab(dtype):
    rng = np.random.default_rng(0)
    rgb = rng.random((3, 3, 21, 17))
    rgb[0, :, :2, :2] = [[[0, 1], [0, 1]], [[0, 0], [1, 1]], [[1, 1], [0, 0]]]  # gamut corners
    rgb[1, :, 0, 0] = 0.04045  # the sRGB curve's knee
    expected = rgb2lab(rgb.transpose(0, 2, 3, 1)).transpose(0, 3, 1, 2)
    got = rgb_to_lab(torch.tensor(rgb, dtype=dtype))
    assert got.dtype == dtype
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-3, rtol=0)


def test_lab_stays_fp32_under_autocast():
    rgb = images(2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rgb_to_lab(rgb)
    torch.testing.assert_close(got, rgb_to_lab(rgb))


def test_scaled_lab_spans_minus_one_to_one_over_the_gamut():
    levels = torch.linspace(0, 1, 17, dtype=torch.float64)
    cube = torch.stack(torch.meshgrid(levels, levels, levels, indexing="ij")).reshape(1, 3, -1, 1)
    scaled = scale_lab(rgb_to_lab(cube))
    low, high = scaled.amin((0, 2, 3)), scaled.amax((0, 2, 3))
    torch.testing.assert_close(low, torch.full((3,), -1.0, dtype=torch.float64), atol=1e-4, rtol=0)
    torch.testing.assert_close(high, torch.ones(3, dtype=torch.float64), atol=1e-4, rtol=0)
    lab = rgb_to_lab(cube)
    for c, (lo, hi) in enumerate(LAB_RANGES):  # the map is the affine one: lo -> -1, hi -> 1
        torch.testing.assert_close(scaled[:, c], (2 * lab[:, c] - lo - hi) / (hi - lo))


def test_lab_views_split_l_from_ab():
    l, ab = lab_views(images(2))
    assert l.shape == (2, 1, 16, 16) and ab.shape == (2, 2, 16, 16)
    _, ab_grey = lab_views(images(2)[:, :1].expand(-1, 3, -1, -1))
    zero_ab = scale_lab(torch.zeros(1, 3, 1, 1))[:, 1:]  # grey has a = b = 0 (off the middle of their ranges)
    torch.testing.assert_close(ab_grey, zero_ab.expand_as(ab_grey), atol=1e-4, rtol=0)


# --- the loss -----------------------------------------------------------------------------------------------

def reference_cmc(z_l, z_ab, temperature):
    """float64: CE of L queries over all ab keys (positive: the same image) plus the same from ab to L."""
    z_l, z_ab = F.normalize(z_l.double(), dim=1), F.normalize(z_ab.double(), dim=1)
    labels = torch.arange(z_l.shape[0])
    s = z_l @ z_ab.T / temperature
    return F.cross_entropy(s, labels) + F.cross_entropy(s.T, labels)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_loss_is_the_definition(impl):
    torch.manual_seed(0)
    method = build_method(cmc_config(f"method.loss_impl={impl}"))
    x = images()
    loss, parts = method([x])
    with torch.no_grad():
        l, ab = lab_views(x)
        z_l = method.l_projector(method.l_backbone(l))
        z_ab = method.ab_projector(method.ab_backbone(ab))
    expected = reference_cmc(z_l, z_ab, 0.07)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close((parts["loss/l_to_ab"] + parts["loss/ab_to_l"]).double(), expected, rtol=1e-5, atol=1e-6)



def test_the_memory_form_is_moco_style_contrast_against_past_keys():
    torch.manual_seed(0)
    method = build_method(cmc_config("method.memory={size: 16, momentum: 0.9}", "method.loss_impl=chunked"))
    past_l, past_ab = method.l_queue.keys.clone().double(), method.ab_queue.keys.clone().double()
    x = images()
    loss, _ = method([x])
    with torch.no_grad():
        l, ab = lab_views(x)
        z_l = F.normalize(method.l_projector(method.l_backbone(l)).double(), dim=1)
        z_ab = F.normalize(method.ab_projector(method.ab_backbone(ab)).double(), dim=1)

    def moco(q, k, queue):  # positive: the momentum key of the same image (here equal to the online one)
        logits = torch.cat([(q * k).sum(1, keepdim=True), q @ queue.T], 1) / 0.07
        return F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long))

    expected = moco(z_l, z_ab, past_ab) + moco(z_ab, z_l, past_l)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    # The batch's keys joined the queues, and the key encoders follow the online ones after a step.
    torch.testing.assert_close(method.ab_queue.keys[:GLOBAL_BATCH].double(), z_ab, rtol=1e-5, atol=1e-6)
    assert int(method.l_queue.position) == GLOBAL_BATCH
    loss.backward()
    with torch.no_grad():
        for p in method.l_backbone.parameters():
            p.add_(1.0)
    method.after_step(0.5)
    online, key = next(method.l_backbone.parameters()), next(method.l_momentum.parameters())
    torch.testing.assert_close(key, online - 0.9)


def test_a_memory_that_is_not_a_multiple_of_the_global_batch_is_refused():
    with pytest.raises(ConfigError, match=r"method.memory.size=12 must be a multiple of the global batch"):
        load_config(None, ["method.name=cmc", RAW_VIEWS, "data.batch_size=8", "method.memory={size: 12}"], world_size=1)

def one_step_gradients(rank=0, world=1):
    torch.manual_seed(0)  # the same initial weights on every rank
    method = build_method(cmc_config())
    rows = GLOBAL_BATCH // world
    loss, _ = method([images()[rank * rows:(rank + 1) * rows]])
    loss.backward()
    grads = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    average_over_ranks(grads.values())
    return grads


def _gradients_worker(rank, world, out):
    grads = one_step_gradients(rank, world)
    if rank == 0:
        save_file(grads, out)


def assert_gradients_match(got, expected):
    assert got.keys() == expected.keys() and {k.split(".")[0] for k in expected} == {"l_backbone", "ab_backbone", "l_projector", "ab_projector"}
    for key in expected:
        error = (got[key] - expected[key]).norm() / expected[key].norm().clamp_min(1e-12)
        assert error <= 1e-5, f"{key}: relative error {error:.2e}"


def test_gradients_at_world_size_2_equal_one_process_on_the_whole_batch(tmp_path):  # 4: tests/test_four_ranks.py
    spawn(_gradients_worker, 2, str(tmp_path / "grads.safetensors"))
    assert_gradients_match(load_file(tmp_path / "grads.safetensors"), one_step_gradients())


# --- views ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("view, named", [
    ("{size: 16, color_jitter: null, grayscale: 0.0}", r"mean=\(0.485"),  # ImageNet normalisation
    ("{size: 16, grayscale: 0.0, mean: [0, 0, 0], std: [1, 1, 1]}", "color_jitter="),
    ("{size: 16, color_jitter: null, grayscale: 0.2, mean: [0, 0, 0], std: [1, 1, 1]}", "grayscale=0.2"),
])
def test_views_that_are_not_raw_srgb_are_refused(view, named):
    with pytest.raises(ConfigError, match=rf"method.name=cmc takes unnormalised sRGB views .* data.views\[0\] has .*{named}"):
        load_config(None, ["method.name=cmc", f"data.views=[{view}]"])


def test_two_views_are_refused():
    with pytest.raises(ConfigError, match=r"method.name=cmc takes 1 global view\(s\); data.views gives 2"):
        load_config(None, ["method.name=cmc", f"data.views=[{RAW}, {RAW}]"])


# --- training, export, evaluation -----------------------------------------------------------------------------

def _train_cmc(rank, world, shards, out):
    from pipeline.train import train

    train(load_config(None, [
        "method.name=cmc", f"train.data={shards}", f"train.output={out}", RAW_VIEWS, "data.eval_size=16",
        "data.eval_resize=16", "data.batch_size=8", "data.num_threads=1", "model.backbone=test_vit",
        "model.projector={hidden_dim: 32, out_dim: 16, layers: 1}", "engine.precision=fp32", "train.max_steps=2",
        "train.log_every=1", "train.knn_every=0", "optim.name=sgd", "optim.lr=0.03",
    ]))


@pytest.mark.slow
def test_two_steps_train_and_export_both_encoders_whose_features_evaluation_concatenates(small_shards, tmp_path):
    import timm

    from pipeline.checkpoint import complete_checkpoints, read_meta
    from pipeline.frozen import load_backbone

    spawn(_train_cmc, 1, str(small_shards), str(tmp_path / "run"))
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    assert read_meta(ckpt)["step"] == 2 and {"l.safetensors", "ab.safetensors"} <= set(read_meta(ckpt)["files"])
    out = tmp_path / "run" / "backbone"
    l_encoder = timm.create_model(f"local-dir:{out / 'l'}", pretrained=True).eval()
    ab_encoder = timm.create_model(f"local-dir:{out / 'ab'}", pretrained=True).eval()
    assert (l_encoder.patch_embed.proj.in_channels, ab_encoder.patch_embed.proj.in_channels) == (1, 2)
    x = images(3)
    l, ab = lab_views(x)
    expected = torch.cat([l_encoder(l), ab_encoder(ab)], dim=1)
    features = load_backbone(f"local-dir:{out}").eval()
    torch.testing.assert_close(features(x), expected)
    data = timm.data.resolve_data_config({}, model=features)
    assert tuple(data["input_size"]) == (3, 16, 16) and tuple(data["mean"]) == (0, 0, 0) and tuple(data["std"]) == (1, 1, 1)


def _train_on_digits(rank, world, digits, out):
    from pipeline.train import train

    view = "{size: 16, scale: [0.3, 1.0], color_jitter: null, grayscale: 0.0, mean: [0, 0, 0], std: [1, 1, 1]}"
    train(load_config(None, [
        "method.name=cmc", f"data.views=[{view}]", f"train.data={digits}/train", f"train.val_data={digits}/val",
        f"train.output={out}", "data.eval_size=16", "data.eval_resize=16", "data.batch_size=16", "data.num_threads=1",
        "model.backbone=test_resnet", "model.projector={out_dim: 32, layers: 1, bias: true}", "engine.precision=fp32",
        "train.max_steps=200", "train.log_every=50", "train.knn_every=0", "train.knn_k=20", "optim.name=adamw",
        "optim.lr=1e-3", "optim.scale_lr=false", "optim.weight_decay=0.0", "optim.warmup_epochs=0",
    ]))


@pytest.mark.slow
def test_training_on_the_digits_lifts_knn_of_the_concatenated_features(digits, tmp_path):
    """200 steps (about 2 epochs) of the embedded digits through the DeepSpeed loop: the kNN monitor on the
    concatenated L and ab features ends well above the untrained encoders'."""
    spawn(_train_on_digits, 1, str(digits), str(tmp_path / "run"))
    before, after = logged(tmp_path / "run", "eval/knn_top1")
    assert after > before + 0.05, (before, after)  # measured: 0.797 -> 0.897


# --- CMC's half-width encoders -------------------------------------------------------------------------------


def official_half_resnet50_convs(in_channel: int) -> list[tuple[int, ...]]:
    """The conv weight shapes, in order, of HobbitLong/CMC models/resnet.py ResNet(Bottleneck, [3, 4, 6, 3],
    in_channel, is_half=True), the encoders of its ResNetV1: a 64-wide 7x7 stem, then stages of base 32
    (planes 32, 64, 128, 256, expansion 4), the downsample of a stage's first block after its three convs."""
    shapes, inplanes = [(64, in_channel, 7, 7)], 64
    for planes, blocks in zip((32, 64, 128, 256), (3, 4, 6, 3)):
        for block in range(blocks):
            shapes += [(planes, inplanes, 1, 1), (planes, planes, 3, 3), (planes * 4, planes, 1, 1)]
            if block == 0:
                shapes.append((planes * 4, inplanes, 1, 1))
            inplanes = planes * 4
    return shapes


def test_half_width_encoders_are_cmcs_resnetv1(tmp_path):
    """model.backbone_args.channels gives the ImageNet recipe CMC's half-width ResNet-50s, each with its
    Linear(1024, 128) head, and the export rebuilds them in timm from config.json."""
    import json

    import timm

    from models.export import encoder_spec, write_timm_folder

    cfg = load_config(CONFIGS / "cmc_resnet50_imagenet.yaml", ["model.backbone_args.channels=[32, 64, 128, 256]"])
    method = build_method(cfg)
    for view, channels in (("l", 1), ("ab", 2)):
        encoder = getattr(method, f"{view}_backbone")
        convs = [tuple(m.weight.shape) for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
        assert convs == official_half_resnet50_convs(channels)
        assert encoder.num_features == 1024
        head = [m for m in getattr(method, f"{view}_projector").modules() if isinstance(m, torch.nn.Linear)]
        assert [(h.in_features, h.out_features, h.bias is not None) for h in head] == [(1024, 128, True)]
        spec = json.loads(json.dumps(encoder_spec(encoder)))
        write_timm_folder(tmp_path / view, encoder.state_dict(), spec, cfg, {"step": 0})
        rebuilt = timm.create_model(f"local-dir:{tmp_path / view}", pretrained=True).eval()
        x = torch.rand(2, channels, 64, 64)
        torch.testing.assert_close(rebuilt(x), encoder.eval()(x))
