"""The method contract: a method registered in this file alone trains through the real loop; the loop and
the configuration know no method by name; multi-crop losses against float64 definitions."""

import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from pydantic import Field

from conftest import tiny_config
from distributed_utils import spawn
from pipeline.checkpoint import complete_checkpoints, read_meta
from pipeline.config import REGISTRY, ConfigError, load_config
from pipeline.methods import Method, MethodConfig, build_method, register_method
from pipeline.methods.base import Views

ROOT = Path(__file__).resolve().parents[1]


class ToyConfig(MethodConfig):
    scale: float = Field(1.0, gt=0.0)


@register_method("toy_cosine")
class ToyCosine(Method):
    """Negative cosine similarity of the two views' projections (a toy: it collapses, but trains)."""

    Config = ToyConfig
    views = Views(global_views=2)

    def forward(self, views):
        z1, z2 = (F.normalize(self.projector(self.backbone(v)), dim=1) for v in views)
        loss = -self.cfg.method.scale * (z1 * z2).sum(1).mean()
        return loss, {"loss/cosine": loss.detach()}

    def before_step(self, step):
        self.seen = getattr(self, "seen", []) + [step]
        return {"toy/before_step": float(step)}


def _train_toy(rank, world, shards, out):
    from pipeline.train import train

    cfg = load_config(None, [
        "method.name=toy_cosine", "method.scale=2.0", f"train.data={shards}", f"train.output={out}",
        "data.views=[{size: 16}, {size: 16}]", "data.eval_size=16", "data.eval_resize=16", "data.batch_size=8",
        "data.num_threads=1", "model.backbone=test_vit",
        "model.projector={hidden_dim: 32, out_dim: 16, layers: 1}", "engine.precision=fp32", "train.max_steps=2",
        "train.log_every=1", "train.knn_every=0", "optim.name=adamw",
    ])
    train(cfg)


@pytest.mark.slow
def test_a_method_registered_in_a_test_file_trains_two_steps(small_shards, tmp_path):
    spawn(_train_toy, 1, str(small_shards), str(tmp_path / "run"))
    ckpt = complete_checkpoints(tmp_path / "run" / "checkpoints")[-1]
    meta = read_meta(ckpt)
    assert meta["step"] == 2 and meta["config"]["method"] == {"name": "toy_cosine", "batch_norm": "local", "scale": 2.0}
    card = (tmp_path / "run" / "backbone" / "README.md").read_text()
    assert '"scale": 2.0' in card and "temperature" not in card and "sdmp" not in card  # only its own settings



def test_a_key_of_another_method_is_refused_naming_its_owner():
    with pytest.raises(ConfigError, match=r"method.scale: not a setting of method.name=simclr \(it belongs to (\w+, )*toy_cosine\)"):
        load_config(None, ["method.scale=2"])
    with pytest.raises(ConfigError, match=r"method.temperature: not a setting of method.name=toy_cosine"):
        load_config(None, ["method.name=toy_cosine", "method.temperature=0.1"])


def test_the_loop_and_the_configuration_name_no_method():
    names = [name for name in REGISTRY if not name.startswith("toy_")]
    train = (ROOT / "pipeline" / "train.py").read_text().lower()
    assert not [n for n in names if re.search(rf"\b{n}\b", train)]
    # config.py's view presets carry the augmentation recipes' names (simclr, byol): data, not methods.
    config = (ROOT / "pipeline" / "config.py").read_text().lower()
    config = config[:config.index("def simclr_views")] + config[config.index("class dataconfig"):]
    config = config.replace('viewpreset(preset="simclr")', "")
    assert not [n for n in names if re.search(rf"\b{n}\b", config)]
    for preview in (ROOT / "launch" / "preview.py", ROOT / "pipeline" / "data" / "preview.py"):  # each method shows its views
        assert not [n for n in names if re.search(rf"\b{n}\b", preview.read_text().lower())], preview


# --- multi-crop --------------------------------------------------------------------------------------------

MULTICROP = "data.views=[{size: 32}, {size: 32}, {size: 16}, {size: 16}]"


def views(sizes, rows=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, 3, s, s, generator=g) for s in sizes]


def reference_simclr(z, temperature):
    """float64: global anchors NT-Xent over the 2B global keys; each local anchor against the same keys with
    its image's two global views as positives (weight 1/2 each); the mean over all anchors."""
    z = [F.normalize(v.double(), dim=1) for v in z]
    rows = z[0].shape[0]
    keys = torch.cat(z[:2])
    losses = []
    for v, anchors in enumerate(z):
        s = anchors @ keys.T / temperature
        for i in range(rows):
            if v < 2:
                own, pos = v * rows + i, (1 - v) * rows + i
                row = torch.cat([s[i, :own], s[i, own + 1:]])
                losses.append(torch.logsumexp(row, 0) - s[i, pos])
            else:
                losses.append(torch.logsumexp(s[i], 0) - 0.5 * (s[i, i] + s[i, rows + i]))
    return torch.stack(losses).mean()


def reference_mocov3(q, k, temperature):
    """float64: 2τ·CE of every (query view, other global key view) pair, twice the mean over pairs."""
    q = [F.normalize(v.double(), dim=1) for v in q]
    k = [F.normalize(v.double(), dim=1) for v in k]
    pairs = [(0, 1), (1, 0)] + [(v, g) for v in range(2, len(q)) for g in (0, 1)]
    ctr = lambda a, b: 2 * temperature * F.cross_entropy(a @ b.T / temperature, torch.arange(a.shape[0]))  # noqa: E731
    return 2 * torch.stack([ctr(q[a], k[b]) for a, b in pairs]).mean()


@pytest.mark.parametrize("local_views", [0, 2])
def test_simclr_multicrop_loss_is_the_definition(local_views):
    cfg = tiny_config("simclr", "data.views=" + str([{"size": 32}] * 2 + [{"size": 16}] * local_views))
    torch.manual_seed(0)
    method = build_method(cfg)  # LayerNorm ViT, head without BatchNorm: per-view passes equal grouped ones
    x = views([32, 32] + [16] * local_views)
    loss, _ = method(x)
    with torch.no_grad():
        z = [method.projector(method.backbone(v)) for v in x]
    torch.testing.assert_close(loss.double(), reference_simclr(z, cfg.method.temperature), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("local_views", [0, 2])
def test_mocov3_multicrop_loss_is_the_definition(local_views):
    cfg = tiny_config("mocov3", "data.views=" + str([{"size": 32}] * 2 + [{"size": 16}] * local_views))
    torch.manual_seed(0)
    method = build_method(cfg)
    x = views([32, 32] + [16] * local_views)
    loss, parts = method(x)
    with torch.no_grad():
        q = [method.query(v) for v in x]
        k = [method.key(v) for v in x[:2]]
    torch.testing.assert_close(loss.double(), reference_mocov3(q, k, cfg.method.temperature), rtol=1e-5, atol=1e-6)
    assert ("loss/local" in parts) == (local_views > 0)


def test_views_of_one_size_go_through_the_encoder_in_one_pass():
    calls = []
    encoder = lambda x: calls.append(x.shape) or x.mean((1, 2, 3))[:, None]  # noqa: E731
    out = Method.encode_by_size(encoder, views([32, 32, 16, 16, 16], rows=3))
    assert calls == [(6, 3, 32, 32), (9, 3, 16, 16)] and [o.shape[0] for o in out] == [3] * 5


@pytest.mark.slow
def test_the_multicrop_preset_trains_on_the_digits(digits, tmp_path):
    import subprocess
    import sys

    cmd = [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--data", str(digits / "train"), "--output", str(tmp_path / "run"),
           "data.views={preset: multicrop, size: 32, local_size: 16, local_views: 2, blur: false}", "data.batch_size=32",
           "model.projector={hidden_dim: 128, out_dim: 64, last_bn: affine}", "optim.name=adamw", "optim.lr=0.002",
           "optim.warmup_epochs=0", "train.max_steps=3", "train.log_every=1", "train.knn_every=0",
           "engine.precision=fp32"]  # bf16 autocast is 10x slower on CPUs without bf16 instructions
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    losses = [float(line.split("total=")[1].split()[0]) for line in done.stdout.splitlines() if "total=" in line]
    assert len(losses) == 3 and all(map(torch.isfinite, torch.tensor(losses)))
