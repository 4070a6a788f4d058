"""Issue 12, section 5: every configuration problem is one line naming its key, file or value, found
before any process group forms (load_config, or launch/pretrain.py's start-up checks)."""

import importlib.util
import json
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.data.loader import batches_per_epoch

ROOT = Path(__file__).resolve().parents[1]


def pretrain_main():
    """launch/pretrain.py's main, in this process: its checks run before it imports DeepSpeed."""
    spec = importlib.util.spec_from_file_location("pretrain_script", ROOT / "launch" / "pretrain.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


@pytest.mark.parametrize(
    "override, key",
    [
        ("method.temperature=.inf", "method.temperature"),
        ("method.temperature=.nan", "method.temperature"),
        ("optim.lr=.inf", "optim.lr"),
        ("optim.weight_decay=-.inf", "optim.weight_decay"),
        ("optim.betas=[0.9, .nan]", "optim.betas.1"),
        ("train.time_limit_minutes=.inf", "train.time_limit_minutes"),
        ("data.views=[{size: 32, blur: {probability: .nan}}]", "data.views.list\\[ViewRecipe\\].0.blur.probability"),
        ("model.backbone_args={scale: .inf}", "model.backbone_args.scale"),
    ],
)
def test_non_finite_floats_are_refused_everywhere(override, key):
    with pytest.raises(ConfigError, match=f"{key}[^;]*: Input should be a finite number"):
        load_config(None, [override])


def test_an_unknown_backbone_is_refused_with_timm_names_close_to_it():
    with pytest.raises(ConfigError, match=r"model.backbone: .*'resnet1888' is not a timm architecture \(close: resnet18\b"):
        load_config(None, ["model.backbone=resnet1888"])
    with pytest.raises(ConfigError, match="'hf-hub:timm/resnet18.a1_in1k' is not a timm architecture"):
        load_config(None, ["model.backbone=hf-hub:timm/resnet18.a1_in1k"])  # weights are never loaded
    assert load_config(None, ["model.backbone=resnet18.a1_in1k"]).model.backbone == "resnet18.a1_in1k"


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "No such file or directory"),
        (b"\xff\xfe{}", "not UTF-8 text \\(byte 0"),
        (b'{"zero_optimization": {"reduce_bucket_size": 5e8,}}', "not JSON: Expecting property name .*line 1 column 50"),
        (b'{"a": ', "not JSON"),
        (b"[1, 2]", "a DeepSpeed configuration is a JSON object, got list"),
        (b'{"zero_optimization": 2}', "zero_optimization is a JSON object, got 2"),
        (b'{"steps_per_print": 1, "steps_per_print": 2}', "key 'steps_per_print' appears twice"),
        (b'{"gradient_clipping": NaN}', "NaN is not a number"),
        (b'{"train_batch_size": 1024}', "train_batch_size is set from data.batch_size and optim.accumulation_steps"),
        (b'{"zero_optimization": {"stage": 3}}', "zero_optimization.stage is set from engine.zero_stage"),
    ],
)
def test_a_bad_deepspeed_file_is_named_at_validation(tmp_path, content, message):
    path = tmp_path / "ds.json"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(ConfigError, match=f"engine.deepspeed_config: .*{path}: {message}"):
        load_config(None, [f"engine.deepspeed_config={path}"])


def test_a_good_deepspeed_file_is_read_once_validated(tmp_path):
    extra = {"zero_optimization": {"reduce_bucket_size": 5e8}, "wall_clock_breakdown": False}
    (tmp_path / "ds.json").write_text(json.dumps(extra))
    cfg = load_config(None, [f"engine.deepspeed_config={tmp_path / 'ds.json'}", "engine.zero_stage=2"])
    assert cfg.engine.deepspeed_json() == extra
    assert load_config(None).engine.deepspeed_json() == {}


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["engine.offload_optimizer=true"], "engine.offload_optimizer needs engine.zero_stage 1, 2 or 3"),
        (["data.seed=-1"], "data.seed: Input should be greater than or equal to 0"),  # DALI: a random seed
        ([f"train.seed={2**64}"], "train.seed: Input should be less than 4294967296"),
        (["data.num_threads=100000"], "data.num_threads: Input should be less than or equal to 256"),
    ],
)
def test_settings_that_fail_inside_deepspeed_or_dali_are_refused(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, overrides)


def test_recipe_files_that_cannot_be_read_are_named(tmp_path):
    (tmp_path / "latin1.yaml").write_bytes(b"train:\n  output: caf\xe9\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 20: b'\\xe9'\)"):
        load_config(tmp_path / "latin1.yaml")
    (tmp_path / "child.yaml").write_text("base: latin1.yaml\noptim: {lr: 0.1}\n")
    with pytest.raises(ConfigError, match=r"child.yaml: base latin1.yaml: .*latin1.yaml: not UTF-8 text"):
        load_config(tmp_path / "child.yaml")
    (tmp_path / "orphan.yaml").write_text("base: gone.yaml\n")
    with pytest.raises(ConfigError, match=r"orphan.yaml: base gone.yaml: .*gone.yaml: No such file or directory"):
        load_config(tmp_path / "orphan.yaml")
    (tmp_path / "two.yaml").write_text("base: [a.yaml, b.yaml]\n")
    with pytest.raises(ConfigError, match=r"two.yaml: base must name one recipe file, got \['a.yaml', 'b.yaml'\]"):
        load_config(tmp_path / "two.yaml")
    (tmp_path / "bell.yaml").write_text("optim:\n  lr: \x07\n")
    with pytest.raises(ConfigError, match=r"bell.yaml: character '\\x07' at position 13"):
        load_config(tmp_path / "bell.yaml")
    (tmp_path / "set.yaml").write_text("optim:\n  betas: !!set {0.9, 0.99}\n")
    with pytest.raises(ConfigError, match=r"set.yaml: \{.*\} is a YAML set, not a setting's value"):
        load_config(tmp_path / "set.yaml")
    (tmp_path / "indent.yaml").write_text("optim:\n  lr: 0.1\n name: sgd\n")
    with pytest.raises(ConfigError, match=r"indent.yaml, line 3, column 2: expected <block end>"):
        load_config(tmp_path / "indent.yaml")


@pytest.mark.parametrize("text, kind", [("- optim\n- data\n", "list"), ("just text\n", "str")])
def test_a_recipe_that_is_not_a_mapping_is_refused_with_an_override(tmp_path, text, kind):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ConfigError, match=f"r.yaml: a recipe is a mapping of sections, got {kind}"):
        load_config(tmp_path / "r.yaml", ["optim.lr=0.1"])


def test_a_key_given_twice_is_refused_with_its_line_and_file(tmp_path):
    (tmp_path / "block.yaml").write_text("optim:\n  lr: 0.1\n  weight_decay: 0.1\n  lr: 0.2\n")
    with pytest.raises(ConfigError, match=r"block.yaml, line 4: key 'lr' appears twice in one mapping \(first on line 2\)"):
        load_config(tmp_path / "block.yaml")
    (tmp_path / "top.yaml").write_text("optim: {lr: 0.1}\ndata: {batch_size: 8}\noptim: {name: sgd}\n")
    with pytest.raises(ConfigError, match=r"top.yaml, line 3: key 'optim' appears twice"):
        load_config(tmp_path / "top.yaml")
    (tmp_path / "child.yaml").write_text("base: top.yaml\n")  # in a base recipe too
    with pytest.raises(ConfigError, match=r"child.yaml: base top.yaml: .*top.yaml, line 3: key 'optim' appears twice"):
        load_config(tmp_path / "child.yaml")
    with pytest.raises(ConfigError, match=r"override data.views, line 1: key 'preset' appears twice"):
        load_config(None, ["data.views={preset: byol, preset: simclr}"])


def test_merge_keys_may_still_be_overridden_and_dates_stay_text(tmp_path):
    (tmp_path / "merge.yaml").write_text(
        "data:\n  views:\n    - &v {size: 32, flip: 0.0}\n    - {<<: *v, flip: 0.5}\ntrain: {output: runs/2024-01-01, data: 2024-01-02}\n"
    )
    cfg = load_config(tmp_path / "merge.yaml", ["train.val_data=2024-01-03"])
    assert [(v.size, v.flip) for v in cfg.data.view_recipes()] == [(32, 0.0), (32, 0.5)]
    assert (cfg.train.output, cfg.train.data, cfg.train.val_data) == ("runs/2024-01-01", "2024-01-02", "2024-01-03")


def test_batches_per_epoch_names_the_setting_the_folder_and_its_samples():
    assert batches_per_epoch("shards", 60, 10, 1, accumulation_steps=6) == 6
    assert batches_per_epoch("shards", 60, 15, 4) == 1
    with pytest.raises(ConfigError, match=r"data.batch_size=61 is larger than the samples a rank gets per epoch from shards \(60 samples, 60 for each of 1 rank"):
        batches_per_epoch("shards", 60, 61, 1)
    with pytest.raises(ConfigError, match=r"data.batch_size=16 .* shards \(60 samples, 15 for each of 4 rank"):
        batches_per_epoch("shards", 60, 16, 4)
    with pytest.raises(ConfigError, match=r"optim.accumulation_steps=7 exceeds the 6 batches of data.batch_size=10 a rank gets per epoch from shards \(60 samples"):
        batches_per_epoch("shards", 60, 10, 1, accumulation_steps=7)


@pytest.mark.parametrize(
    "args, world_size, message",
    [
        (["data.batch_size=61"], "1", "data.batch_size=61 is larger than the samples a rank gets per epoch from {data} (60 samples, 60"),
        (["data.batch_size=16"], "4", "data.batch_size=16 is larger than the samples a rank gets per epoch from {data} (60 samples, 15"),
        (["data.batch_size=8", "optim.accumulation_steps=8"], "1", "optim.accumulation_steps=8 exceeds the 7 batches of data.batch_size=8"),
        (["--output", "{file}/run", "data.batch_size=8"], "1", "train.output={file}/run: {file} is a file, not a folder"),
    ],
)
def test_pretrain_checks_data_and_output_before_anything_starts(small_shards, tmp_path, monkeypatch, capsys, args, world_size, message):
    monkeypatch.setenv("WORLD_SIZE", world_size)
    (tmp_path / "file").write_text("")
    fill = {"data": small_shards, "file": tmp_path / "file"}
    argv = ["--data", str(small_shards), "--output", str(tmp_path / "run")] + [a.format(**fill) for a in args]
    assert pretrain_main()(argv) == 2
    assert message.format(**fill) in capsys.readouterr().err
