"""Recipes, heads and the MoCo v3 ViT as their official code has them (issue 9, section 2).

Each recipe's values are checked against its source, cited beside each value; each head against a module
built here to the official shape (same parameters, same output with the weights copied); MoCo v3's fixed
position embedding against a float64 formula written from its definition; its initialisation by the
bounds of the distributions it draws from.
"""

import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from models.backbones import create_backbone, sincos_position_embedding
from models.heads import mlp_head
from pipeline.config import HeadConfig, load_config
from pipeline.methods import build_method

CONFIGS = Path(__file__).resolve().parents[1] / "launch" / "configs"

MOCOV3 = "facebookresearch/moco-v3"
SOLO = "vturrisi/solo-learn scripts/pretrain/cifar/mocov3.yaml"
MOCOV2 = "facebookresearch/moco main_moco.py --mlp --moco-t 0.2 --aug-plus --cos"
SIMCLR = "google-research/simclr README, CIFAR-10 command"
SDCLR = "VITA-Group/SDCLR@34c932e cmds/shell_scrips/cifar-10-LT.sh --prune True --prune_percent 0.9 --prune_dual_bn True"
CMC = "HobbitLong/CMC train_CMC.py"
DIM = "rdevon/DIM scripts/deep_infomax.py"
AMDIM = "Philip-Bachman/amdim-public"
METAUG = "jiangmengli/metaug train_MetAug.py"


def head(hidden, out, layers, last_bn, bias=True, hidden_bn=True, init_std=None):
    return HeadConfig(hidden_dim=hidden, out_dim=out, layers=layers, last_bn=last_bn, bias=bias, hidden_bn=hidden_bn,
                      init_std=init_std)


# CMC's code settings, the same in both CMC recipes
CMC_SETTINGS = [
    ("method.temperature", 0.07, f"{CMC}: --nce_t 0.07"),
    ("method.memory_bank.negatives", 16384, f"{CMC}: --nce_k 16384"),
    ("method.memory_bank.momentum", 0.5, f"{CMC}: --nce_m 0.5"),
    ("model.projector.out_dim", 128, f"{CMC}: --feat_dim 128"),
    ("model.backbone_args", {"zero_init_last": False}, "HobbitLong/CMC models/resnet.py: BatchNorm weights 1"),
    ("optim.name", "sgd", f"{CMC}: torch.optim.SGD(model.parameters())"),
    ("optim.lr", 0.03, f"{CMC}: --learning_rate 0.03"),
    ("optim.scale_lr", False, f"{CMC}: the lr is not scaled by the batch"),
    ("optim.momentum", 0.9, f"{CMC}: --momentum 0.9"),
    ("optim.weight_decay", 1e-4, f"{CMC}: --weight_decay 1e-4"),
    ("optim.no_decay_norm_bias", False, f"{CMC}: SGD(model.parameters())"),
    ("optim.warmup_epochs", 0, f"{CMC}: no warm-up"),
    ("train.epochs", 240, f"{CMC}: --epochs 240"),
    ("views.0.color_jitter", None, f"{CMC}: RandomResizedCrop, RandomHorizontalFlip, RGB2Lab, no jitter"),
    ("views.0.mean", (0.0, 0.0, 0.0), "HobbitLong/CMC dataset.py RGB2Lab: sRGB in [0, 1] into Lab (scaled in Lab)"),
]

# recipe -> [(key, expected value, source)]; "views.i.x" is view i of the resolved view list.
FIDELITY = {
    "mocov3_vits16_imagenet": [
        ("model.backbone", "vit_small_patch16_224", f"{MOCOV3} vits.py vit_small: patch 16, width 384, depth 12"),
        ("model.backbone_args", {"num_heads": 12}, f"{MOCOV3} vits.py vit_small: num_heads=12"),
        ("model.vit_init", "sincos_xavier", f"{MOCOV3} vits.py VisionTransformerMoCo: sin-cos position embedding, init"),
        ("model.freeze_patch_embed", True, f"{MOCOV3} CONFIG.md ViT-Small: --stop-grad-conv1"),
        ("model.projector", head(4096, 256, 3, "no_affine", bias=False), f"{MOCOV3} moco/builder.py MoCo_ViT: _build_mlp(3, ...)"),
        ("model.predictor", head(4096, 256, 2, "no_affine", bias=False), f"{MOCOV3} moco/builder.py MoCo_ViT: _build_mlp(2, ...)"),
        ("method.batch_norm", "sync", f"{MOCOV3} main_moco.py: convert_sync_batchnorm when distributed"),
        ("method.temperature", 0.2, f"{MOCOV3} CONFIG.md ViT-Small: --moco-t=.2"),
        ("method.momentum", 0.99, f"{MOCOV3} main_moco.py: --moco-m 0.99"),
        ("method.momentum_schedule", "cosine", f"{MOCOV3} CONFIG.md: --moco-m-cos"),
        ("optim.name", "adamw", f"{MOCOV3} CONFIG.md ViT-Small: --optimizer=adamw"),
        ("optim.lr", 1.5e-4, f"{MOCOV3} CONFIG.md ViT-Small: --lr=1.5e-4"),
        ("optim.scale_lr", True, f"{MOCOV3} main_moco.py: init_lr = lr * batch_size / 256"),
        ("optim.weight_decay", 0.1, f"{MOCOV3} CONFIG.md ViT-Small: --weight-decay=.1"),
        ("optim.no_decay_norm_bias", False, f"{MOCOV3} main_moco.py: AdamW(model.parameters())"),
        ("optim.warmup_epochs", 40, f"{MOCOV3} CONFIG.md ViT-Small: --warmup-epochs=40"),
        ("train.epochs", 300, f"{MOCOV3} CONFIG.md ViT-Small: --epochs=300"),
        ("views.0.scale", (0.08, 1.0), f"{MOCOV3} main_moco.py: --crop-min 0.08 (the ViT commands keep it)"),
        ("views.0.blur.probability", 1.0, f"{MOCOV3} main_moco.py augmentation1 (BYOL's)"),
        ("views.1.blur.probability", 0.1, f"{MOCOV3} main_moco.py augmentation2"),
        ("views.1.solarize", 0.2, f"{MOCOV3} main_moco.py augmentation2"),
    ],
    "mocov3_resnet18_cifar": [
        ("model.projector", head(4096, 256, 2, "no_affine", bias=False), f"{MOCOV3} builder.py MoCo_ResNet; {SOLO}: proj 4096 -> 256"),
        ("model.predictor", head(4096, 256, 2, "none", bias=False), f"{MOCOV3} builder.py MoCo_ResNet: last_bn=False"),
        ("model.cifar_stem", True, "solo-learn: 3x3 stride-1 conv1, no max-pool for CIFAR"),
        ("model.backbone_args", {"zero_init_last": False}, "solo-learn: torchvision resnet18 (zero_init_residual=False)"),
        ("method.batch_norm", "sync", f"{SOLO}: sync_batchnorm: True"),
        ("method.temperature", 0.2, f"{SOLO}: temperature 0.2"),
        ("method.momentum", 0.99, f"{SOLO}: base_tau 0.99, final_tau 1.0"),
        ("optim.name", "lars", f"{SOLO}: lars"),
        ("optim.lr", 0.3, f"{SOLO}: lr 0.3 at batch 256"),
        ("optim.scale_lr", True, "solo-learn main_pretrain.py: lr x batch/256"),
        ("optim.weight_decay", 1e-6, f"{SOLO}: weight_decay 1e-6"),
        ("optim.lars_trust", 0.02, f"{SOLO}: eta_lars 0.02"),
        ("optim.lars_clip", True, f"{SOLO}: grad_clip_lars True (solo-learn's LARS: clip_lr)"),
        ("optim.no_decay_norm_bias", True, f"{SOLO}: exclude_bias_n_norm: True"),
        ("data.batch_size", 256, f"{SOLO}: batch_size 256, one device"),
        ("train.epochs", 1000, f"{SOLO}: max_epochs 1000"),
        ("views.0.solarize", 0.0, "solo-learn augmentations/asymmetric.yaml: solarization 0.0, 0.2"),
        ("views.1.solarize", 0.2, "solo-learn augmentations/asymmetric.yaml"),
        ("views.0.color_jitter.saturation", 0.2, "solo-learn augmentations/asymmetric.yaml"),
    ],
    "mocov2_resnet50_imagenet": [
        ("model.projector", head(2048, 128, 2, "none", bias=True, hidden_bn=False), "facebookresearch/moco moco/builder.py: mlp"),
        ("model.backbone_args", {"zero_init_last": False}, "facebookresearch/moco: torchvision resnet50"),
        ("method.queue_size", 65536, f"{MOCOV2}: --moco-k 65536"),
        ("method.momentum", 0.999, f"{MOCOV2}: --moco-m 0.999"),
        ("method.temperature", 0.2, MOCOV2),
        ("method.batch_norm", "shuffle", "facebookresearch/moco moco/builder.py: _batch_shuffle_ddp"),
        ("optim.name", "sgd", MOCOV2),
        ("optim.lr", 0.03, f"{MOCOV2}: --lr 0.03 at batch 256"),
        ("optim.weight_decay", 1e-4, f"{MOCOV2}: --wd 1e-4"),
        ("optim.no_decay_norm_bias", False, "facebookresearch/moco main_moco.py: SGD(model.parameters())"),
        ("optim.warmup_epochs", 0, f"{MOCOV2}: --cos, no warm-up"),
        ("train.epochs", 200, f"{MOCOV2}: --epochs 200"),
        ("views.0.scale", (0.2, 1.0), "facebookresearch/moco main_moco.py aug_plus: RandomResizedCrop(scale=(0.2, 1.))"),
        ("views.0.blur.probability", 0.5, "facebookresearch/moco main_moco.py aug_plus"),
    ],
    "simclr_resnet18_cifar": [
        ("model.projector", head(512, 128, 3, "scale", init_std=0.01),
         "google-research/simclr tf2/model.py ProjectionHead: 3 layers, BN on each, the last center=False; Dense N(0, 0.01)"),
        ("method.temperature", 0.5, f"{SIMCLR}: --temperature=0.5"),
        ("optim.name", "lars", "google-research/simclr: --optimizer lars (default)"),
        ("optim.lr", 1.0, f"{SIMCLR}: --learning_rate=1.0"),
        ("optim.scale_lr", True, "google-research/simclr: --learning_rate_scaling linear (lr x batch/256)"),
        ("optim.weight_decay", 1e-4, f"{SIMCLR}: --weight_decay=1e-4"),
        ("optim.no_decay_norm_bias", True, "google-research/simclr model_util.py: exclude batch_normalization, bias"),
        ("optim.warmup_epochs", 10, "google-research/simclr: --warmup_epochs 10 (default)"),
        ("data.batch_size", 512, f"{SIMCLR}: --train_batch_size=512"),
        ("train.epochs", 1000, f"{SIMCLR}: --train_epochs=1000"),
        ("views.0.blur", None, f"{SIMCLR}: --use_blur=False"),
        ("views.0.color_jitter.brightness", 0.4, f"{SIMCLR}: --color_jitter_strength=0.5 (0.8 x 0.5)"),
        ("views.0.color_jitter.hue", 0.1, f"{SIMCLR}: --color_jitter_strength=0.5 (0.2 x 0.5)"),
        ("views.0.mean", (0.0, 0.0, 0.0), "google-research/simclr data_util.py: pixels in [0, 1], no mean"),
    ],
    "sdclr_resnet18_cifar10lt": [
        ("model.projector", head(512, 128, 3, "affine"), "VITA-Group/SDCLR models/resnet_prune_multibn.py proj_head"),
        ("model.backbone_args", {"zero_init_last": False}, "VITA-Group/SDCLR models/resnet_prune_multibn.py: zero_init_residual=False"),
        ("method.sdclr.prune_ratio", 0.9, f"{SDCLR}"),
        ("method.temperature", 0.2, f"{SDCLR}: pretrain_temp 0.2"),
        ("method.batch_norm", "sync", "VITA-Group/SDCLR train_simCLR.py: convert_sync_batchnorm"),
        ("optim.name", "sgd", f"{SDCLR}: --optimizer sgd"),
        ("optim.lr", 0.5, f"{SDCLR}: pretrain_lr 0.5"),
        ("optim.scale_lr", False, "VITA-Group/SDCLR train_simCLR.py: SGD(lr=args.lr), not scaled"),
        ("optim.weight_decay", 1e-4, "VITA-Group/SDCLR train_simCLR.py: SGD(weight_decay=1e-4)"),
        ("optim.no_decay_norm_bias", False, "VITA-Group/SDCLR train_simCLR.py: SGD(model.parameters())"),
        ("optim.warmup_epochs", 10, "VITA-Group/SDCLR train_simCLR.py: warm_up_iters = 10 epochs"),
        ("optim.min_lr", 1e-6, "VITA-Group/SDCLR train_simCLR.py: cosine_annealing to 1e-6"),
        ("data.batch_size", 512, f"{SDCLR}: batch_size 512"),
        ("train.epochs", 2000, f"{SDCLR}: pretrain_epochs 2000"),
        ("views.0.scale", (0.1, 1.0), "VITA-Group/SDCLR train_simCLR.py: --resizeLower 0.1"),
        ("views.0.color_jitter.saturation", 0.4, "VITA-Group/SDCLR train_simCLR.py: ColorJitter(0.4, 0.4, 0.4, 0.1)"),
        ("views.0.mean", (0.485, 0.456, 0.406), "VITA-Group/SDCLR models: NormalizeByChannelMeanStd (ImageNet's)"),
    ],
    "cmc_resnet50_imagenet": CMC_SETTINGS + [
        ("model.projector.layers", 1, "HobbitLong/CMC models/resnet.py: one Linear(2048, feat_dim) head"),
        ("views.0.scale", (0.08, 1.0), "HobbitLong/CMC README: crop 0.08-1 for the ImageNet ResNets"),
    ],
    "cmc_resnet18_cifar": CMC_SETTINGS + [
        ("model.projector.layers", 1, "HobbitLong/CMC models/resnet.py: one Linear(512, feat_dim) head"),
        ("views.0.scale", (0.2, 1.0), "HobbitLong/CMC train_CMC.py: --crop_low 0.2 (and MetAug's CMC setting)"),
    ],
    "dim_resnet18_cifar": [
        ("method.estimator", "jsd", f"{DIM}: routine(measure='JSD', mode='fd')"),
        ("method.critic_units", 1024, f"{DIM}: build(mi_units=1024)"),
        ("model.projector.out_dim", 64, f"{DIM}: build(global_units=64)"),
        ("optim.lr", 1e-4, f"{DIM}: optimizer learning_rate 1e-4 (cortex's Adam)"),
        ("optim.min_lr", 1e-4, f"{DIM}: a constant lr"),
        ("data.batch_size", 64, f"{DIM}: batch_size train 64"),
        ("train.epochs", 1000, f"{DIM}: epochs 1000"),
    ],
    "amdim_resnet18_cifar": [
        ("method.n_rkhs", 1024, f"{AMDIM} train.py: --n_rkhs 1024"),
        ("method.clip", 20.0, f"{AMDIM} train.py: --tclip 20.0"),
        ("method.score_reg", 0.05, f"{AMDIM} costs.py: the score regulariser's weight 0.05"),
        ("optim.lr", 2e-4, f"{AMDIM} train.py: --learning_rate 0.0002"),
        ("optim.betas", (0.8, 0.999), f"{AMDIM} task_self_supervised.py: Adam(betas=(0.8, 0.999))"),
        ("optim.weight_decay", 1e-5, f"{AMDIM} task_self_supervised.py: Adam(weight_decay=1e-5)"),
        ("train.epochs", 300, f"{AMDIM} task_self_supervised.py: epochs = 300 for CIFAR"),
        ("data.batch_size", 200, f"{AMDIM} train.py: --batch_size 200"),
        ("views.0.color_jitter.brightness", 0.4, f"{AMDIM} datasets.py TransformsC10: ColorJitter(0.4, 0.4, 0.4, 0.2) at p 0.8"),
        ("views.0.color_jitter.hue", 0.2, f"{AMDIM} datasets.py"),
        ("views.0.grayscale", 0.25, f"{AMDIM} datasets.py: RandomGrayscale(p=0.25)"),
    ],
    "metaug_cmc_resnet18_cifar": [
        ("method.name", "metaug_cmc", f"{METAUG}: CMC's Lab views, memory banks and an encoder per view"),
        ("method.ori", True, f"{METAUG}: the third view, the whole Lab image"),
        ("method.metaug.form", "released", f"{METAUG}: the released training step"),
        ("model.projector.out_dim", 128, f"{METAUG}: --feat_dim 128"),
        ("method.memory_bank.negatives", 1024, f"{METAUG}: --nce_k 1024"),
        ("method.memory_bank.momentum", 0.5, f"{METAUG}: --nce_m 0.5"),
        ("method.oucl.beta", 16.0, f"{METAUG}: CircleLoss gamma 16"),
        ("method.oucl.weighted", False, f"{METAUG}: alpha_enable_gh no"),
        ("method.oucl.margins", False, f"{METAUG}: delta_enable_gh no"),
        ("method.metaug.delta", 1e-5, f"{METAUG}: --mt_loss_hp 1e-5"),
        ("method.metaug.inner_lr", 1e-3, f"{METAUG}: --bb_learning_rate 1e-3"),
        ("method.metaug.scope", "encoder", f"{METAUG}: fast weights over the whole encoder"),
        ("method.metaug.generator_lr", 0.03, f"{METAUG}: generators' SGD lr 0.03"),
        ("optim.name", "sgd", f"{METAUG}: torch.optim.SGD for the encoders"),
        ("optim.lr", 0.03, f"{METAUG}: --learning_rate 0.03"),
        ("optim.scale_lr", False, f"{METAUG}: the lr is not scaled by the batch"),
        ("optim.weight_decay", 1e-4, f"{METAUG}: --weight_decay 1e-4"),
        ("data.batch_size", 64, f"{METAUG}: --batch_size 64"),
        ("views.0.scale", (0.2, 1.0), f"{METAUG}: RandomResizedCrop(scale=(crop_low 0.2, 1))"),
    ],
}


def value(cfg, key: str):
    """cfg's value at a dotted key; "views.i..." reads the i-th resolved view."""
    first, *rest = key.split(".")
    node = cfg.data.view_recipes() if first == "views" else getattr(cfg, first)
    for part in rest:
        node = node[int(part)] if isinstance(node, list) else node[part] if isinstance(node, dict) else getattr(node, part)
    return node


@pytest.mark.parametrize("recipe", sorted(FIDELITY))
def test_recipe_values_are_its_sources(recipe):
    cfg = load_config(CONFIGS / f"{recipe}.yaml")
    wrong = [f"{key} = {value(cfg, key)!r}, {source} gives {expected!r}"
             for key, expected, source in FIDELITY[recipe] if value(cfg, key) != expected]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("recipe", sorted(FIDELITY) + ["sdmp_mocov3_vits16_imagenet", "sdmp_mocov3_resnet18_cifar"])
def test_recipe_header_names_source_and_deviations(recipe):
    header = "".join(line for line in (CONFIGS / f"{recipe}.yaml").read_text().splitlines(True) if line.startswith("#"))
    assert "Source:" in header and "/" in header  # a paper and an owner/repository
    if not recipe.startswith("sdmp_"):  # those take MoCo v3's recipe, whose header lists them
        assert "Deviations that remain:" in header


def test_sdmp_recipes_take_mocov3_recipes():
    for sdmp, base in [("sdmp_mocov3_vits16_imagenet", "mocov3_vits16_imagenet"), ("sdmp_mocov3_resnet18_cifar", "mocov3_resnet18_cifar")]:
        a, b = load_config(CONFIGS / f"{sdmp}.yaml"), load_config(CONFIGS / f"{base}.yaml")
        assert a.model == b.model and a.optim == b.optim and a.data == b.data and a.method.batch_norm == "sync"


# --- heads against modules of the official shape --------------------------------------------------------


def official_mocov3_mlp(layers: int, in_dim: int, hidden: int, out: int, last_bn: bool) -> nn.Sequential:
    """moco-v3's moco/builder.py _build_mlp, as its definition reads: bias-free Linear layers, BatchNorm and
    ReLU after each hidden one, and after the last a BatchNorm without affine when `last_bn`."""
    modules = []
    for i in range(layers):
        d_in, d_out = in_dim if i == 0 else hidden, out if i == layers - 1 else hidden
        modules.append(nn.Linear(d_in, d_out, bias=False))
        if i < layers - 1:
            modules += [nn.BatchNorm1d(d_out), nn.ReLU(inplace=True)]
        elif last_bn:
            modules.append(nn.BatchNorm1d(d_out, affine=False))
    return nn.Sequential(*modules)


def official_mocov2_mlp(in_dim: int, out: int) -> nn.Sequential:
    """facebookresearch/moco's --mlp: a Linear(in, in) and ReLU before the encoder's Linear(in, out)."""
    return nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out))


HEADS = [  # recipe, head, input width (backbone features or projector output), the official module
    ("mocov3_resnet18_cifar", "projector", 512, lambda: official_mocov3_mlp(2, 512, 4096, 256, last_bn=True)),
    ("mocov3_resnet18_cifar", "predictor", 256, lambda: official_mocov3_mlp(2, 256, 4096, 256, last_bn=False)),
    ("mocov3_vits16_imagenet", "projector", 384, lambda: official_mocov3_mlp(3, 384, 4096, 256, last_bn=True)),
    ("mocov3_vits16_imagenet", "predictor", 256, lambda: official_mocov3_mlp(2, 256, 4096, 256, last_bn=True)),
    ("mocov2_resnet50_imagenet", "projector", 2048, lambda: official_mocov2_mlp(2048, 128)),
]


@pytest.mark.parametrize("recipe, which, in_dim, official", HEADS, ids=[f"{r}-{w}" for r, w, _, _ in HEADS])
def test_head_is_the_official_module(recipe, which, in_dim, official):
    torch.manual_seed(0)
    ours, theirs = mlp_head(in_dim, getattr(load_config(CONFIGS / f"{recipe}.yaml").model, which)), official()
    shapes = lambda m: [(n, tuple(t.shape)) for n, t in m.state_dict().items()]  # noqa: E731
    assert shapes(ours) == shapes(theirs)
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(16, in_dim)
    torch.testing.assert_close(ours(x), theirs(x), rtol=0, atol=0)
    for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()):  # the same running statistics
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_simclr_head_is_the_official_definition():
    """tf2/model.py's nonlinear ProjectionHead, written as its layers compute in training: Dense without bias
    (use_bn), BatchNorm with shift on the middle layers then ReLU, BatchNorm with scale only on the last."""
    torch.manual_seed(0)
    ours = mlp_head(512, load_config(CONFIGS / "simclr_resnet18_cifar.yaml").model.projector)
    linears = [m for m in ours if isinstance(m, nn.Linear)]
    norms = [m for m in ours if isinstance(m, nn.BatchNorm1d)]
    assert len(linears) == len(norms) == 3 and all(m.bias is None for m in linears)
    assert all(abs(m.weight.std().item() - 0.01) < 0.001 for m in linears)  # RandomNormal(stddev=0.01)
    assert norms[-1].bias is None and all(m.bias is not None for m in norms[:-1])
    for m in norms:  # non-trivial scales and shifts, so the test sees them
        m.weight.data.uniform_(0.5, 1.5)
        if m.bias is not None:
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(32, 512, dtype=torch.float64)
    h = x
    for i, (lin, bn) in enumerate(zip(linears, norms)):
        z = h @ lin.weight.double().T
        z = (z - z.mean(0)) / torch.sqrt(z.var(0, unbiased=False) + bn.eps) * bn.weight.double()
        h = (z + bn.bias.double()).relu() if i < 2 else z
    torch.testing.assert_close(ours.double()(x), h)


def official_sdclr_proj_head(ch: int, out: int) -> nn.Sequential:
    """VITA-Group/SDCLR models/resnet_prune_multibn.py proj_head(ch, output_ch) on one of its BatchNorm sets:
    fc1 Linear(ch, ch) with a bias, then bias-free fc2 Linear(ch, ch) and fc3 Linear(ch, out), a BatchNorm
    after each, ReLU between."""
    return nn.Sequential(nn.Linear(ch, ch), nn.BatchNorm1d(ch), nn.ReLU(),
                         nn.Linear(ch, ch, bias=False), nn.BatchNorm1d(ch), nn.ReLU(),
                         nn.Linear(ch, out, bias=False), nn.BatchNorm1d(out))


def test_sdclr_head_is_the_official_module():
    """Ours leaves out fc1's bias: the BatchNorm after it subtracts the batch mean, so in training the
    official head gives the same output whatever that bias holds (its gradient is zero)."""
    torch.manual_seed(0)
    ours = mlp_head(512, load_config(CONFIGS / "sdclr_resnet18_cifar10lt.yaml").model.projector).double()
    theirs = official_sdclr_proj_head(512, 128).double()
    assert [type(m) for m in ours] == [type(m) for m in theirs]
    for a, b in zip(ours, theirs):
        for name, t in a.named_parameters():
            getattr(b, name).data.copy_(t.data.uniform_(0.5, 1.5) if isinstance(a, nn.BatchNorm1d) else t.data)
    theirs[0].bias.data.uniform_(-1.0, 1.0)
    x = torch.randn(32, 512, dtype=torch.float64, requires_grad=True)
    out_ours, out_theirs = ours(x), theirs(x)
    torch.testing.assert_close(out_ours, out_theirs)
    out_theirs.square().sum().backward()
    assert theirs[0].bias.grad.abs().max() < 1e-10


# --- MoCo v3's ViT: position embedding, initialisation, optimiser groups -----------------------------------


def sincos_by_definition(grid: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """The MoCo v3 embedding, entry by entry in float64: patch m of a grid x grid image at row m // grid,
    column m % grid; frequency i of dim/4 is temperature^(-i / (dim/4)); channels are [sin(row f), cos(row f),
    sin(col f), cos(col f)] in quarters."""
    quarter = dim // 4
    freqs = [temperature ** (-i / quarter) for i in range(quarter)]
    rows = []
    for m in range(grid * grid):
        row, col = divmod(m, grid)
        rows.append([math.sin(row * f) for f in freqs] + [math.cos(row * f) for f in freqs]
                    + [math.sin(col * f) for f in freqs] + [math.cos(col * f) for f in freqs])
    return torch.tensor(rows, dtype=torch.float64)


@pytest.fixture(scope="module")
def mocov3_vit():
    """The ViT-S recipe's backbone at 64x64 (a 4x4 grid of patches): all but the size as the recipe has it."""
    cfg = load_config(CONFIGS / "mocov3_vits16_imagenet.yaml", ["model.img_size=64"])
    torch.manual_seed(0)
    return create_backbone(cfg.model, img_size=64)


def test_sincos_position_embedding_is_the_definition(mocov3_vit):
    torch.testing.assert_close(sincos_position_embedding(14, 14, 384).double(), sincos_by_definition(14, 384), rtol=0, atol=1e-6)
    pos = mocov3_vit.pos_embed
    assert pos.shape == (1, 1 + 16, 384) and not pos.requires_grad
    assert torch.equal(pos[0, 0], torch.zeros(384))  # the class token's position embedding
    torch.testing.assert_close(pos[0, 1:].double(), sincos_by_definition(4, 384), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_position_embedding(2, 2, 6)


def test_vit_init_is_mocov3s(mocov3_vit):
    vit = mocov3_vit
    dim = vit.embed_dim
    assert dim == 384 and vit.blocks[0].attn.num_heads == 12  # model.backbone_args reaches timm

    def uniform_with_bound(w: torch.Tensor, bound: float):
        """Samples of U(-bound, bound): inside it, reaching close to it, with its standard deviation."""
        w = w.detach().double()
        assert w.abs().max() <= bound and w.abs().max() > 0.99 * bound
        assert abs(w.std().item() - bound / math.sqrt(3)) < 0.03 * bound / math.sqrt(3)

    for block in (vit.blocks[0], vit.blocks[-1]):
        qkv = block.attn.qkv
        assert qkv.weight.shape == (3 * dim, dim)
        for part in qkv.weight.chunk(3):  # q, k, v each with the xavier bound of a [dim, dim] matrix
            uniform_with_bound(part, math.sqrt(6 / (dim + dim)))
        for linear in (block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            uniform_with_bound(linear.weight, math.sqrt(6 / sum(linear.weight.shape)))
        for linear in (qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2):
            assert torch.equal(linear.bias, torch.zeros_like(linear.bias))
    proj = vit.patch_embed.proj  # xavier over (3 * 16 * 16, dim), as vits.py computes it
    uniform_with_bound(proj.weight, math.sqrt(6 / (3 * 16 * 16 + dim)))
    assert torch.equal(proj.bias, torch.zeros_like(proj.bias)) and not proj.weight.requires_grad
    assert 0 < vit.cls_token.abs().max() < 1e-5  # N(0, 1e-6)


def test_vit_init_needs_a_vit():
    with pytest.raises(ValueError, match="model.vit_init=sincos_xavier needs a ViT"):
        load_config(None, ["model.vit_init=sincos_xavier"])
    with pytest.raises(ValueError, match="backbone_args cannot set"):
        load_config(None, ["model.backbone_args={num_classes: 3}"])


def test_weight_decay_exclusions_are_the_recipes_choice():
    small = ["model.backbone=test_vit", "model.backbone_args={}", "model.img_size=32", "data.views={preset: byol, size: 32}", "model.projector.hidden_dim=32", "model.predictor.hidden_dim=32"]
    all_decay = build_method(load_config(CONFIGS / "mocov3_vits16_imagenet.yaml", small))
    names = {id(p): n for n, p in all_decay.named_parameters()}
    (group,) = all_decay.param_groups(0.1)  # moco-v3: AdamW(model.parameters()), weight decay on all
    trained = {names[id(p)] for p in group["params"]}
    assert group["weight_decay"] == 0.1
    assert {"backbone.cls_token", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias", "projector.1.weight"} <= trained
    assert not any(n.startswith(("backbone.pos_embed", "backbone.patch_embed", "momentum_encoder")) for n in trained)  # frozen
    assert trained == {n for n, p in all_decay.named_parameters() if p.requires_grad}

    timm_groups = build_method(load_config(CONFIGS / "mocov3_vits16_imagenet.yaml", small + ["optim.no_decay_norm_bias=true"]))
    names = {id(p): n for n, p in timm_groups.named_parameters()}
    decay = {g["weight_decay"]: {names[id(p)] for p in g["params"]} for g in timm_groups.param_groups(0.1)}
    assert {"backbone.cls_token", "backbone.blocks.0.norm1.weight", "backbone.blocks.0.attn.qkv.bias"} <= decay[0.0]
    assert "backbone.blocks.0.attn.qkv.weight" in decay[0.1]


def test_lars_takes_the_recipes_trust_coefficient_and_clipping():
    from pipeline.train import build_optimizer

    cfg = load_config(None, ["model.backbone=test_resnet", "optim.name=lars", "optim.lars_trust=0.02", "optim.lars_clip=true"])
    optimizer, _ = build_optimizer(build_method(cfg), cfg, world_size=1, total_steps=10, steps_per_epoch=5)
    assert {(g["trust_coeff"], g["trust_clip"]) for g in optimizer.param_groups} == {(0.02, True)}
