"""Configuration: recipes load, overrides apply, and every mistake names its key before anything runs."""

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config


ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "launch" / "configs").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.stem)
def test_recipes_validate(recipe):
    cfg = load_config(recipe)
    cfg.check(1)


def test_overrides_parse_yaml_values():
    cfg = load_config(None, ["optim.lr=0.5", "data.views={preset: byol, size: 64}", "engine.zero_stage=2"])
    assert cfg.optim.lr == 0.5 and cfg.data.view_recipes()[1].solarize == 0.2 and cfg.engine.zero_stage == 2


@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=3", "optim.lrr: Extra inputs are not permitted"),
        ("optim.lr=fast", "optim.lr: Input should be a valid number"),
        ("method.temperature=0", "method.temperature: Input should be greater than 0"),
        ("engine.zero_stage=4", "engine.zero_stage"),
        ("data.views=[]", "at least one view"),
        ("method.name=mocov3", "needs model.predictor"),
        ("model.cifar_stem=true model.backbone=vit_small_patch16_224", "cifar_stem needs a ResNet"),
        ("method.name=mocov2 data.batch_size=6 method.shuffle_groups=4", "must divide data.batch_size"),
        ("method.sdmp.weight=0.3", "method.sdmp: not a setting of method.name=simclr \\(it belongs to sdmp_mocov3, sdmp_simclr\\)"),
        ("method.name=byol", "method.name=.byol.: unknown method"),
        ("oops", "expected key=value"),
    ],
)
def test_bad_values_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, override.split())


def test_queue_must_hold_a_global_batch():
    cfg = load_config(None, ["method.name=mocov2", "method.queue_size=1000", "data.batch_size=256"])
    cfg.check(3)
    with pytest.raises(ValueError, match="method.queue_size=1000 cannot hold one global batch of 1024"):
        cfg.check(4)


def test_compile_under_zero3_is_refused():
    with pytest.raises(ValueError, match="model.compile"):
        load_config(None, ["engine.zero_stage=3", "model.compile=true"])


def test_pretrain_stops_before_any_process_group(tmp_path):
    """A wrong key exits with code 2 and the key's name, without importing DeepSpeed or touching data."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--data", str(tmp_path), "optim.mometum=0.9"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "optim.mometum: Extra inputs are not permitted" in out.stderr
    out = subprocess.run(
        [sys.executable, str(ROOT / "launch" / "pretrain.py"), "--data", str(tmp_path / "none")],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "no such shard folder" in out.stderr


def test_views_are_checked_against_what_the_method_takes():
    multicrop = "data.views={preset: multicrop, size: 32, local_size: 16, local_views: 2}"
    assert len(load_config(None, [multicrop]).data.view_recipes()) == 4  # SimCLR takes local views
    with pytest.raises(ConfigError, match=r"sdclr takes 2 global view\(s\); data.views gives 4 \(sizes \[32, 32, 16, 16\]\)"):
        load_config(None, [multicrop, "method.name=sdclr"])
    with pytest.raises(ConfigError, match="global views need one size"):
        load_config(None, ["data.views=[{size: 32}, {size: 16}]"])


def test_an_override_that_is_not_yaml_names_itself():
    with pytest.raises(ConfigError, match="method.sdmp"):
        load_config(None, ["method.sdmp={weight:"])


def test_recipes_compose_with_base(tmp_path):
    (tmp_path / "parent.yaml").write_text("method: {name: mocov2, queue_size: 512}\noptim: {lr: 0.1, weight_decay: 0.01}\n")
    (tmp_path / "child.yaml").write_text("base: parent.yaml\noptim: {lr: 0.2}\n")
    cfg = load_config(tmp_path / "child.yaml")
    assert (cfg.method.name, cfg.method.queue_size, cfg.optim.lr, cfg.optim.weight_decay) == ("mocov2", 512, 0.2, 0.01)
    (tmp_path / "loop.yaml").write_text("base: loop.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        load_config(tmp_path / "loop.yaml")


def test_overrides_address_list_items_and_anchored_views_stay_apart():
    recipe = ROOT / "launch" / "configs" / "mocov2_resnet50_imagenet.yaml"  # view 2 is a YAML alias of view 1
    with pytest.raises(ConfigError, match=r"global views need one size; data.views gives sizes \[32, 224\]"):
        load_config(recipe, ["data.views.0.size=32"])  # only the first view changed, not its alias
    cfg = load_config(recipe, ["data.views.0.size=32", "data.views.1.size=32"])
    assert [v.size for v in cfg.data.view_recipes()] == [32, 32]
    with pytest.raises(ConfigError, match="data.views.5.size: '5' is not an item of a list of 2"):
        load_config(recipe, ["data.views.5.size=32"])
    with pytest.raises(ConfigError, match="optim.lr.x: lr is a value, not a section"):
        load_config(recipe, ["optim.lr.x=1"])


def test_pretrain_refuses_a_train_and_val_pair_from_different_runs(small_shards, tmp_path):
    from conftest import image_folder, make_shards, random_images

    other = make_shards(image_folder(tmp_path / "src", random_images(12, seed=5)), tmp_path / "other")
    out = subprocess.run([sys.executable, str(ROOT / "launch" / "pretrain.py"), "--data", str(small_shards), "--val-data", str(other)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "different data_shards.create runs" in out.stderr


@pytest.mark.parametrize("cuda, cuda_bf16, cpu_bf16, expected", [
    (False, False, False, "fp32"), (False, False, True, "bf16"), (True, True, False, "bf16"), (True, False, False, "fp16")])
def test_auto_precision_is_what_the_machine_computes_natively(monkeypatch, cuda, cuda_bf16, cpu_bf16, expected):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: cuda_bf16)
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: cpu_bf16)
    cfg = load_config(ROOT / "launch" / "configs" / "default.yaml")
    assert cfg.engine.precision == expected  # resolved when loaded, so checkpoints record what ran
    assert load_config(None, ["engine.precision=bf16"]).engine.precision == "bf16"
