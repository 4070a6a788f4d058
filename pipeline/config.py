"""Typed, validated configuration: YAML recipe + `key=value` overrides -> one frozen `Config`.

Every model forbids unknown keys, so a typo stops the run naming the key, and every float must be finite;
cross-field checks (a queue the global batch does not fit, a method ZeRO-3 cannot run), the backbone's name
(asked of timm) and the DeepSpeed JSON file stop it before any process group forms. Recipes are read by one
YAML loader that refuses a key given twice (PyYAML would keep the last one silently).
"""

from __future__ import annotations

import difflib
import json
import os
from pathlib import Path
from typing import ClassVar, Literal

import timm
import yaml
from pydantic import BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

Probability = Field(ge=0.0, le=1.0)
Seed = Field(0, ge=0, lt=2**32)  # DALI takes a negative seed as "pick one at random"; 32 bits fit every generator


class Strict(BaseModel):
    # .inf and .nan are YAML floats: refused for every float, where bounds like `gt=0` would let inf through
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


def _ordered_range(value: tuple[float, float], low: float, high: float | None, name: str):
    lo, hi = value
    if not (low < lo <= hi and (high is None or hi <= high)):
        limit = f"<= {high}" if high is not None else ""
        raise ValueError(f"{name} must satisfy {low} < min <= max {limit}, got {value}")
    return value


class ColorJitter(Strict):
    brightness: float = Field(0.4, ge=0.0, le=1.0)
    contrast: float = Field(0.4, ge=0.0, le=1.0)
    saturation: float = Field(0.2, ge=0.0, le=1.0)
    hue: float = Field(0.1, ge=0.0, le=0.5)  # fraction of the colour circle, as in torchvision
    probability: float = Probability
    # torchvision: ColorJitter's operations in a random order per sample, contrast about the mean grey, hue in
    # HSV; color_twist: DALI's one fused op (fixed order, contrast about grey 128, hue rotating YIQ's chroma)
    form: Literal["torchvision", "color_twist"] = "torchvision"


class Blur(Strict):
    probability: float = Probability
    sigma: tuple[float, float] = (0.1, 2.0)  # pixels of the output view

    _sigma = field_validator("sigma")(lambda v: _ordered_range(v, 0.0, None, "sigma"))


class RandAugment(Strict):
    """RandAugment after the crop's resize, translations relative to the view's size. `form` "dali": DALI's
    (`nvidia.dali.auto_aug.rand_augment`): `n` operations per image, all at magnitude bin `m` of `bins`.
    "featmatch": GT-RIPL/FeatMatch's RandomAugment (util/random_augment.py): `n` operations drawn from its 16
    (pipeline.data.augment.FEATMATCH_SUITE), each at its own bin drawn uniformly from 0..`m` (`m` = bins - 1:
    the whole range, as its M 9 of 10 bins), padding black."""

    n: int = Field(2, ge=1)
    m: int = Field(15, ge=0)
    bins: int = Field(31, ge=2)
    form: Literal["dali", "featmatch"] = "dali"

    @model_validator(mode="after")
    def _m_in_bins(self):
        if self.m >= self.bins:
            raise ValueError(f"rand_augment.m must be < bins={self.bins}, got {self.m}")
        return self


class ViewRecipe(Strict):
    """One augmented view: random resized crop, translation, RandAugment, flip, colour jitter, grayscale,
    blur, solarise, normalise."""

    size: int = Field(224, ge=8, le=4096)
    scale: tuple[float, float] = (0.08, 1.0)  # fraction of the image area
    ratio: tuple[float, float] = (3 / 4, 4 / 3)  # width / height
    flip: float = Field(0.5, ge=0.0, le=1.0)
    color_jitter: ColorJitter | None = ColorJitter(probability=0.8)
    grayscale: float = Field(0.2, ge=0.0, le=1.0)
    blur: Blur | None = None
    solarize: float = Field(0.0, ge=0.0, le=1.0)
    interpolation: Literal["linear", "cubic"] = "linear"  # of the crop's resize (cubic: bicubic, as some official recipes use)
    translate: int = Field(0, ge=0)  # px: a shift by whole pixels, up to this either way per axis, padding black (RandomCrop(size, padding))
    rand_augment: RandAugment | None = None  # after the crop's resize, before the colour operations
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    _scale = field_validator("scale")(lambda v: _ordered_range(v, 0.0, 1.0, "scale"))
    _ratio = field_validator("ratio")(lambda v: _ordered_range(v, 0.0, None, "ratio"))

    @field_validator("std")
    @classmethod
    def _positive_std(cls, v):
        if min(v) <= 0:
            raise ValueError(f"std must be positive, got {v}")
        return v


def simclr_views(size: int, blur: bool) -> list[ViewRecipe]:
    """SimCLR: two identical views; strength-1.0 jitter (0.8 each, hue 0.2); blur for ImageNet, not CIFAR."""
    view = ViewRecipe(
        size=size,
        color_jitter=ColorJitter(brightness=0.8, contrast=0.8, saturation=0.8, hue=0.2, probability=0.8),
        blur=Blur(probability=0.5) if blur else None,
    )
    return [view, view]


def byol_views(size: int, blur: bool) -> list[ViewRecipe]:
    """BYOL / MoCo v3: asymmetric; the first view always blurred, the second rarely, and solarised."""
    jitter = ColorJitter(brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1, probability=0.8)
    first = ViewRecipe(size=size, color_jitter=jitter, blur=Blur(probability=1.0) if blur else None)
    second = first.model_copy(update={"blur": Blur(probability=0.1) if blur else None, "solarize": 0.2})
    return [first, second]


def multicrop_views(size: int, local_size: int, local_views: int, blur: bool) -> list[ViewRecipe]:
    """Multi-crop (SwAV/DINO): two BYOL-style global views plus small local views."""
    first, second = (v.model_copy(update={"scale": (0.14, 1.0)}) for v in byol_views(size, blur))
    local = first.model_copy(
        update={"size": local_size, "scale": (0.05, 0.14), "blur": Blur(probability=0.5) if blur else None}
    )
    return [first, second] + [local] * local_views


class ViewPreset(Strict):
    preset: Literal["simclr", "byol", "multicrop"]
    size: int = Field(224, ge=8, le=4096)
    blur: bool = True
    local_size: int = Field(96, ge=8, le=4096)
    local_views: int = Field(6, ge=0, le=32)

    def recipes(self) -> list[ViewRecipe]:
        if self.preset == "simclr":
            return simclr_views(self.size, self.blur)
        if self.preset == "byol":
            return byol_views(self.size, self.blur)
        return multicrop_views(self.size, self.local_size, self.local_views, self.blur)


class DataConfig(Strict):
    views: ViewPreset | list[ViewRecipe] = ViewPreset(preset="simclr")
    batch_size: int = Field(256, ge=1)  # per rank
    # DALI CPU threads per rank; default: this rank's share of the cores (DALI aborts, naming nothing, when it cannot start them)
    num_threads: int | None = Field(None, ge=1, le=256)
    shuffle_buffer: int = Field(4096, ge=1)  # samples held by DALI's reader for shuffling
    seed: int = Seed
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    hw_decoder_load: float = Field(0.65, ge=0.0, le=1.0)  # share of JPEGs for the GPU's hardware decoder
    eval_size: int = Field(224, ge=8)  # evaluation: resize the shorter side to eval_resize, centre crop
    eval_resize: int = Field(256, ge=8)

    @field_validator("views")
    @classmethod
    def _some_views(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("at least one view is needed")
        return v

    @model_validator(mode="after")
    def _eval_crop_fits(self):
        if self.eval_size > self.eval_resize:
            raise ValueError(f"eval_size {self.eval_size} is larger than eval_resize {self.eval_resize}")
        return self

    def view_recipes(self) -> list[ViewRecipe]:
        return self.views.recipes() if isinstance(self.views, ViewPreset) else list(self.views)

    def threads(self) -> int:
        if self.num_threads is not None:
            return self.num_threads
        ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)  # torchrun, deepspeed
        return max(1, min(16, (os.cpu_count() or 2) // ranks_here))


def format_validation_error(error, prefix: str = "") -> str:
    """One line per problem, each naming the full key, e.g. `data.views.0.scale: ...`."""
    lines = []
    for err in error.errors():
        key = ".".join(str(p) for p in ((prefix,) if prefix else ()) + tuple(err["loc"]))
        got = f" (got {err['input']!r})" if err["type"] != "extra_forbidden" and "input" in err else ""
        lines.append(f"{key}: {err['msg']}{got}")
    return "; ".join(lines)


# --- models, methods, optimisation, engine, run ----------------------------------------------------------


class HeadConfig(Strict):
    """MLP head of `layers` Linear layers. Each hidden layer is followed by BatchNorm (`hidden_bn`) and ReLU;
    the last one by `last_bn`: "none", "affine" (BatchNorm on every layer, the output included),
    "no_affine" (a BatchNorm without scale and shift) or "scale" (scale, no shift: TensorFlow's
    center=False). A Linear followed by BatchNorm has no bias (the BatchNorm's shift replaces it); `bias` gives the others one. Each recipe states its method's head."""

    hidden_dim: int = Field(2048, ge=1)
    out_dim: int = Field(128, ge=1)
    layers: int = Field(2, ge=1, le=4)
    hidden_bn: bool = True
    last_bn: Literal["none", "affine", "no_affine", "scale"] = "none"
    bias: bool = True
    init_std: float | None = Field(None, gt=0.0)  # Linear weights N(0, std²), zero biases; None: PyTorch's init


class ModelConfig(Strict):
    backbone: str = "resnet18"  # any timm ResNet or ViT name
    cifar_stem: bool = False  # ResNets: 3x3 stride-1 first conv and no max-pool, for 32x32 inputs
    img_size: int | None = None  # ViTs: input size (default: the largest view's size)
    drop_path_rate: float = Field(0.0, ge=0.0, lt=1.0)
    projector: HeadConfig = HeadConfig()
    predictor: HeadConfig | None = None
    freeze_patch_embed: bool = False  # ViTs: keep the random patch projection fixed (MoCo v3)
    # ViTs: "sincos_xavier" as moco-v3's vits.py: a fixed 2-D sin-cos position embedding, xavier-uniform weights
    # (q, k, v as three matrices), zero biases, class token N(0, 1e-6)
    vit_init: Literal["timm", "sincos_xavier"] = "timm"
    # more timm.create_model arguments (num_heads: 12; a ResNet's stage widths, channels: [32, 64, 128, 256])
    backbone_args: dict[str, int | float | bool | str | list[int]] = {}
    channels_last: bool = True  # CNNs only
    grad_checkpointing: bool = False
    compile: bool = False

    @field_validator("backbone")
    @classmethod
    def _timm_architecture(cls, name):
        if not timm.is_model(name):  # a registry name (a pretrained tag is allowed); no hub or folder source
            close = difflib.get_close_matches(name, timm.list_models(), n=3)
            raise ValueError(f"{name!r} is not a timm architecture" + (f" (close: {', '.join(close)})" if close else ""))
        return name


class MethodConfig(Strict):
    """The `method:` section. Each method (pipeline/methods/) extends this class with its own settings and
    registers it; a recipe's section is validated against the chosen method's class only, so a key of
    another method is an error. The ground floor knows no method: `REGISTRY` is filled from above."""

    name: str
    batch_norm: Literal["local", "sync"] = "local"  # sync: SyncBatchNorm over all ranks when there are several

    method_class: ClassVar[type | None] = None  # the Method subclass this configures (set by register_method)


REGISTRY: dict[str, type[MethodConfig]] = {}  # method name -> its configuration class
DEFAULT_METHOD: list[str] = []  # the method a recipe without `method.name` runs (registered with default=True)


def method_config(section) -> MethodConfig:
    """A recipe's `method:` section validated against the chosen method's own class."""
    if isinstance(section, MethodConfig):
        return section
    section = {} if section is None else section
    if not isinstance(section, dict):
        raise ConfigError(f"method: expected a mapping with a name, got {section!r}")
    if not REGISTRY:
        raise ConfigError("no methods are registered: import pipeline.methods before loading a configuration")
    name = section.get("name", DEFAULT_METHOD[0] if DEFAULT_METHOD else None)
    if name not in REGISTRY:
        raise ConfigError(f"method.name={name!r}: unknown method; registered: {', '.join(sorted(REGISTRY))}")
    cls = REGISTRY[name]
    foreign = [key for key in section if key not in cls.model_fields]
    for key in foreign:
        owners = sorted(other for other, c in REGISTRY.items() if key in c.model_fields)
        if owners:
            raise ConfigError(f"method.{key}: not a setting of method.name={name} (it belongs to {', '.join(owners)})")
    try:
        return cls.model_validate({**section, "name": name})
    except ValidationError as e:
        raise ConfigError(format_validation_error(e, "method")) from None


class OptimConfig(Strict):
    name: Literal["sgd", "lars", "adamw"] = "sgd"
    lr: float = Field(0.3, gt=0.0)  # per 256 images of global batch when scale_lr
    scale_lr: bool = True
    weight_decay: float = Field(1e-4, ge=0.0)
    no_decay_norm_bias: bool = True  # timm's groups: no decay (nor LARS adaptation) on norms, biases, ViT tokens; false: all decay
    momentum: float = Field(0.9, ge=0.0, lt=1.0)  # sgd, lars
    lars_trust: float = Field(0.001, gt=0.0)  # LARS's trust coefficient (eta): 0.001 as timm and google-research; solo-learn 0.02
    lars_clip: bool = False  # LARC: the adapted LR clipped at the global one (solo-learn's clip_lr)
    betas: tuple[float, float] = (0.9, 0.999)  # adamw
    warmup_epochs: float = Field(10.0, ge=0.0)
    min_lr: float = Field(0.0, ge=0.0)
    grad_clip: float | None = Field(None, gt=0.0)
    accumulation_steps: int = Field(1, ge=1)


def native_precision() -> str:
    """bf16 where this machine computes it natively (CUDA with bf16, or a CPU with bf16 instructions), else
    fp16 on CUDA and fp32 on CPUs: bf16 autocast emulated on a CPU without them is about 10x slower than fp32."""
    import torch

    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if torch.ops.mkldnn._is_mkldnn_bf16_supported() else "fp32"


class EngineConfig(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 0
    # auto: native_precision() of the machine that loads the configuration (recorded resolved in checkpoints)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "bf16"
    offload_optimizer: bool = False  # ZeRO-Offload: needs zero_stage >= 1
    deepspeed_config: str | None = None  # a JSON file whose keys are merged under ours (launch/deepspeed/)

    @field_validator("precision")
    @classmethod
    def _resolve_auto(cls, v):
        return native_precision() if v == "auto" else v

    @model_validator(mode="after")
    def _offload_needs_zero(self):
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("engine.offload_optimizer needs engine.zero_stage 1, 2 or 3 (ZeRO-Offload)")
        return self

    @field_validator("deepspeed_config")
    @classmethod
    def _readable(cls, path):
        if path is not None:
            read_deepspeed_json(path)
        return path

    def deepspeed_json(self) -> dict:
        """The extra DeepSpeed settings of `deepspeed_config` (train.py sets its own keys over them)."""
        return read_deepspeed_json(self.deepspeed_config) if self.deepspeed_config else {}


# DeepSpeed settings train.py derives from the configuration: a file that set them would be overruled silently.
DEEPSPEED_OWNED = {
    "train_batch_size": "data.batch_size and optim.accumulation_steps",
    "train_micro_batch_size_per_gpu": "data.batch_size",
    "gradient_accumulation_steps": "optim.accumulation_steps",
    "gradient_clipping": "optim.grad_clip",
    "torch_autocast": "engine.precision",
    "zero_optimization.stage": "engine.zero_stage",
}


def read_deepspeed_json(path: str | Path) -> dict:
    """A DeepSpeed JSON file as a dict; anything else (missing, not UTF-8, not JSON, a key twice, NaN, not
    an object, a key the configuration owns) is a ConfigError naming the file."""
    tree = read_json(path)
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a DeepSpeed configuration is a JSON object, got {type(tree).__name__}")
    if not isinstance(tree.get("zero_optimization", {}), dict):
        raise ConfigError(f"{path}: zero_optimization is a JSON object, got {tree['zero_optimization']!r}")
    keys = set(tree) | {f"zero_optimization.{k}" for k in tree.get("zero_optimization", {})}
    owned = sorted(keys & DEEPSPEED_OWNED.keys())
    if owned:
        raise ConfigError(f"{path}: {owned[0]} is set from {DEEPSPEED_OWNED[owned[0]]}; remove it from the file")
    return tree


def read_json(path: str | Path):
    def unique(pairs):
        keys = [k for k, _ in pairs]
        twice = sorted({k for k in keys if keys.count(k) > 1})
        if twice:
            raise ConfigError(f"{path}: key {twice[0]!r} appears twice in one object")
        return dict(pairs)

    def no_constant(name):
        raise ConfigError(f"{path}: {name} is not a number DeepSpeed can take")

    text = read_text(path)
    try:
        return json.loads(text, object_pairs_hook=unique, parse_constant=no_constant)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not JSON: {e}") from None


def read_text(path: str | Path) -> str:
    """A UTF-8 text file; a missing, unreadable or undecodable one is a ConfigError naming it."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{path}: {e.strerror or e}") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start}: {e.object[e.start:e.start + 1]!r})") from None


class TrainConfig(Strict):
    epochs: int = Field(100, ge=1)
    max_steps: int | None = Field(None, ge=1)  # stop early (total steps still follow `epochs` for schedules)
    time_limit_minutes: float | None = Field(None, gt=0)  # stop (and save) once this much time has passed
    seed: int = Seed
    log_every: int = Field(20, ge=1)  # steps
    checkpoint_every: int = Field(1000, ge=1)  # steps; and at the end
    keep_checkpoints: int = Field(2, ge=1)
    knn_every: int = Field(10, ge=0)  # epochs; 0: only before and after training
    knn_k: int = Field(200, ge=1)
    output: str = "runs/default"
    data: str | None = None
    val_data: str | None = None
    resume: str = "auto"  # auto | never | a checkpoint folder
    deterministic: bool = False


class Config(Strict):
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    method: SerializeAsAny[MethodConfig] = Field(default_factory=lambda: method_config({}))
    optim: OptimConfig = OptimConfig()
    engine: EngineConfig = EngineConfig()
    train: TrainConfig = TrainConfig()

    @model_validator(mode="before")
    @classmethod
    def _method_class(cls, tree):
        if isinstance(tree, dict) and "method" in tree:
            tree = {**tree, "method": method_config(tree["method"])}
        return tree

    @model_validator(mode="after")
    def _consistent(self):
        if self.model.freeze_patch_embed and "vit" not in self.model.backbone:
            raise ValueError(f"model.freeze_patch_embed needs a ViT backbone, got {self.model.backbone}")
        if self.model.vit_init != "timm" and "vit" not in self.model.backbone:
            raise ValueError(f"model.vit_init={self.model.vit_init} needs a ViT backbone, got {self.model.backbone}")
        owned = {"num_classes", "img_size", "dynamic_img_size", "drop_path_rate", "base"} & set(self.model.backbone_args)
        if owned:
            raise ValueError(f"model.backbone_args cannot set {sorted(owned)}: the pipeline sets them (model.img_size, model.drop_path_rate)")
        if self.model.cifar_stem and "resnet" not in self.model.backbone:
            raise ValueError(f"model.cifar_stem needs a ResNet backbone, got {self.model.backbone}")
        return self

    def check(self, world_size: int) -> None:
        """The chosen method's own constraints (views, world size, engine), before any process group forms."""
        type(self.method).method_class.check(self, world_size)


class ConfigError(ValueError):
    """A recipe or override is wrong (the message names the key)."""


def _set_dotted(tree: dict, dotted: str, value) -> None:
    """tree[a][b]... = value for "a.b..."; a number addresses an item of a list (data.views.0.size)."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        node = node[_list_index(node, key, dotted)] if isinstance(node, list) else node.setdefault(key, {})
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"{dotted}: {key} is a value, not a section")
    node[_list_index(node, leaf, dotted) if isinstance(node, list) else leaf] = value


def _list_index(items: list, key: str, dotted: str) -> int:
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"{dotted}: {key!r} is not an item of a list of {len(items)}")
    return int(key)


class _RecipeLoader(yaml.SafeLoader):
    """PyYAML's safe loader, except that a key given twice in one mapping is an error (PyYAML keeps the
    last), and dates stay text (no setting is a date; a run folder may look like one)."""

    yaml_implicit_resolvers = {
        first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:timestamp"]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node, deep=False):
        lines = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *anchor` keys are meant to be overridden by the mapping's own
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                first = lines.get(key)
            except TypeError:
                continue  # an unhashable key: the safe loader's own error names it
            if first is not None:
                raise ConfigError(f"{self.name}, line {line}: key {key!r} appears twice in one mapping (first on line {first})")
            lines[key] = line
        return super().construct_mapping(node, deep)


def parse_yaml(text: str, source: str):
    """`text` as YAML through the recipe loader; an error is one line naming `source`, line and column."""
    try:
        loader = _RecipeLoader(text)
    except yaml.reader.ReaderError as e:  # a character YAML does not allow, found before any parsing
        raise ConfigError(f"{source}: character {chr(e.character)!r} at position {e.position}: {e.reason}") from None
    loader.name = source  # for the duplicate-key error
    try:
        return loader.get_single_data()
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{source}{where}: {e.problem or e.context}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{source}: {' '.join(str(e).split())}") from None
    finally:
        loader.dispose()


def read_recipe(path: str | Path, seen: tuple[Path, ...] = ()) -> dict:
    """A recipe's tree; `base: OTHER.yaml` (relative to the recipe) is read first and deep-merged under it."""
    path = Path(path)
    tree = parse_yaml(read_text(path), str(path))
    tree = {} if tree is None else tree
    if not isinstance(tree, dict):
        raise ConfigError(f"{path}: a recipe is a mapping of sections, got {type(tree).__name__}")
    def not_a_setting(value):
        raise ConfigError(f"{path}: {value!r} is a YAML {type(value).__name__}, not a setting's value")

    # YAML anchors alias one object: an override must change one view only
    tree = json.loads(json.dumps(tree, default=not_a_setting))
    base = tree.pop("base", None)
    if base is None:
        return tree
    if not isinstance(base, str):
        raise ConfigError(f"{path}: base must name one recipe file, got {base!r}")
    base_path = (path.parent / base).resolve()
    if base_path in seen:
        raise ConfigError(f"{path}: base {base} includes itself")
    try:
        return deep_merge(read_recipe(base_path, seen + (base_path,)), tree)
    except ConfigError as e:
        raise ConfigError(f"{path}: base {base}: {e}") from None


def deep_merge(base: dict, top: dict) -> dict:
    merged = dict(base)
    for key, value in top.items():
        merged[key] = deep_merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] = (), world_size: int | None = None) -> Config:
    """Recipe YAML (or the defaults) with `section.key=value` overrides (values parsed as YAML), checked
    with the method's own constraints for `world_size` ranks (default: $WORLD_SIZE, else 1)."""
    tree = read_recipe(path) if path is not None else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected key=value")
        _set_dotted(tree, key.strip(), parse_yaml(value, f"override {key.strip()}"))
    where = path or "configuration"
    try:
        tree["method"] = method_config(tree.get("method"))
        cfg = Config.model_validate(tree)
        cfg.check(int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size)
    except ValidationError as e:
        raise ConfigError(f"{where}: {format_validation_error(e)}") from None
    except ValueError as e:  # ConfigError included: the message names the key
        raise ConfigError(f"{where}: {e}") from None
    return cfg
