"""The FeatMatch fine-tuning loop behind `python launch/finetune.py --backbone local-dir:FOLDER|CHECKPOINT --train SHARDS --val SHARDS --labels-per-class N

FeatMatch semi-supervised fine-tuning of a pretrained backbone (Kuo et al., ECCV 2020; formulas in
shared/docs/METHODS.md): N labels per class, the rest of the training shards unlabeled.

- Labels. An evaluation pass over the training shards gives every sample's label by global index; N per
  class are kept, chosen by a seeded permutation of the global indices (`--seed`), independent of the
  loader's order. Training hides every other label (-1), so unlabeled images are used as such.
- Forms (`--form`). `released` (default): GT-RIPL/FeatMatch's training step (train/featmatch.py `train2`,
  pipeline.losses.featmatch): pseudo-labels sharpened at T 0.75, mixup of labeled and unlabeled, no
  threshold, consistency ramp-up, weights mix 0.5 / graph 2.0, prototypes by the released `extract_fp`,
  attention dropout 0.1, 1 weak + 8 RandAugment views. `fixmatch`: this project's first form (hard
  pseudo-labels over `--threshold`, one colour-jitter strong view, k-means prototypes of confident rows).
- Data. Each batch is `--labeled-batch` labeled images (pipeline.data.labeled.LabeledLoader, endless, as the
  official SSLDataLoader; 0: none apart) plus the rest from one DALI `ShardLoader` over all training shards
  (an epoch is one pass of it; its labeled images count as labeled rows). Views, of the whole image resized
  to the backbone's input: `released`, as ssltrainer.init_transform: weak = flip + a shift of up to size/16
  px padded black (RandomCrop(size, padding=size // 16)), and `--strong-views` strong ones, each the
  official RandomAugment (2 of its 16 operations, each magnitude uniform over its whole range: RandAugment
  form "featmatch", in DALI's auto_aug); `fixmatch`, weak = random resized crop at scale 0.5-1 + flip, strong
  = crop at scale 0.2-1 + flip + DALI's colour twist 0.4/0.4/0.4/0.1 with p 0.8 + grayscale 0.2, blur at 64
  px and above. Labeled rows of a batch are found by their global index. Views are sized and normalised as
  the backbone's config says.
- Model. backbone -> features f; AugF (models.prototype_attention.PrototypeAttention, `--heads`,
  `--attention-dropout` on its weights, φᵣ zero-initialised so AugF starts as relu(f): the released head
  starts at random, which would scramble a pretrained backbone's features) -> g; one linear classifier on
  both. With `--warm-start` the classifier starts as a linear probe on the labeled images' features (off by
  default: with few labels the folded probe can have large weights that the first steps in train-mode
  BatchNorm undo violently).
- Prototypes. A feature memory of the training set (weak-view features recorded during training, by global
  index; labeled rows carry their label, unlabeled rows their pseudo-label and its confidence) gives
  `--prototypes-per-class` (pk) prototypes per class at each extraction (see Optimisation). `released`: the class mean
  plus k-means centres, from labeled rows alone until every class has more than pk unlabeled rows over an
  adaptive confidence threshold (`--prototype-threshold`, 0.5, halved up to 5 times), then half from each
  (FeatureMemory.released_class_prototypes; the labeled rows' features from an eval-mode pass of their
  evaluation view before each extraction, as the official `get_labeled_featrues`). `fixmatch`: pk k-means
  cluster means per class over labeled rows and unlabeled ones whose confidence reaches
  `--prototype-threshold`. Until training records them (from the first step with AugF on), the memory's
  rows come from the evaluation pass above (unlabeled ones at confidence 0 unless `--warm-start`).
  `--memory-refresh pass` instead refills it with an evaluation pass over the training set after every
  epoch (one more forward epoch; its features use
  BatchNorm's running statistics, which only fit the training-mode features AugF sees once those
  statistics have settled: a pretrained backbone, not a random one).
- Losses (pipeline.losses.featmatch): L = L_clf + r·(λ_g·L_con-g + λ_f·L_con-f) with pseudo-labels from
  the weak view through AugF; r ramps linearly from 0 to 1 over `--rampup` of the steps (`released`: 75k of
  the CIFAR configs' 183k iterations; `fixmatch`: none). The released first forward (all views, train mode,
  for the pseudo-labels) runs without gradient, as only its detached outputs are used.
- Optimisation (`--schedule`). `released` (the released form's default): the official trainer's
  (train/trainer.py, util/scheduler.py SupConvScheduler, config/cifar10/*.json) with its CIFAR phases as
  shares of the run's steps: 3k of 183k iterations without AugF (no prototypes, the pseudo-labels and
  consistency from the plain classifier, no graph term: train1), the first prototypes at its end, then
  every `--prototype-every` (500) steps; torch SGD (Nesterov, momentum 0.95, weight decay 2e-4 on every
  parameter); lr per step piecewise linear: max/100 to max/10 over the AugF-free start, up to max (0.04)
  over a 75k cycle, back to max/10 over the next, down to max/10^4 over the last 30k. (SupConvScheduler also
  cycles momentum, but writes it to a key torch's SGD never reads: it stays 0.95, as here.) `cosine` (the
  fixmatch form's): timm's SGD (Nesterov, momentum 0.9) over timm's weight-decay groups (no decay on biases,
  norms and the backbone's `no_weight_decay()` tokens), AugF from the first step, prototypes every epoch
  (`--prototype-every 0`), timm's `CosineLRScheduler` per step: `--warmup-epochs` of linear warm-up (none
  by default), then cosine decay to 0 (as pipeline/train.py). Either way one pair of groups per part
  (backbone at `--backbone-lr-scale` x lr, AugF, classifier).
- Evaluation. Top-1 on --val after every epoch (a JSON line on stderr) with AugF ("val_top1", the paper's
  prediction) and without it ("val_top1_plain": backbone + classifier alone); the final JSON on stdout.
  `--output DIR` writes the fine-tuned classifier as a timm folder (config.json + model.safetensors, the
  classifier as the model's own head: `timm.create_model("local-dir:DIR", pretrained=True)` predicts
  classes), plus augf.safetensors (AugF weights and the last prototypes) and result.json.

One process, on a GPU when there is one (bf16 autocast), else the CPU.
"""

from __future__ import annotations

import json
import math
import sys
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
from safetensors.torch import save_file
from timm.optim import create_optimizer_v2, param_groups_weight_decay
from timm.scheduler import CosineLRScheduler

from data_shards.shards import ShardError, shared_class_names
from models.export import timm_config
from models.feature_memory import FeatureMemory
from models.prototype_attention import PrototypeAttention
from pipeline.checkpoint import CheckpointError, read_meta
from pipeline.config import Blur, ColorJitter, Config, DataConfig, RandAugment, ViewRecipe
from pipeline.data.labeled import LabeledLoader
from pipeline.data.loader import Batch, ShardLoader
from pipeline.frozen import eval_data_config, load_backbone
from pipeline.eval import balanced_accuracy, extract_features, top1_accuracy, train_linear_probe
from pipeline.losses.featmatch import (draw_mixup, featmatch_loss, featmatch_released_loss, mixup, pseudo_labels, rampup,
                                       soft_targets)


# ------------------------------------------------------------------------------------------- pieces


def backbone_config(spec: str) -> dict:
    """The timm config.json of the backbone `spec` names (written again by --output)."""
    if spec.startswith("local-dir:"):
        return json.loads((Path(spec[len("local-dir:"):]) / "config.json").read_text())
    meta = read_meta(Path(spec))
    encoders = meta.get("encoders") or {}
    if len(encoders) != 1:
        raise CheckpointError(f"{spec}: fine-tuning takes one encoder; this checkpoint has {sorted(encoders)}")
    return timm_config(Config.model_validate(meta["config"]), next(iter(encoders.values())))


def view_recipes(size: int, mean, std, strong_views: int = 1, strong: str = "jitter") -> list[ViewRecipe]:
    """[weak, strong × strong_views] at the backbone's input size and normalisation; `strong`: "randaugment"
    (the released views) or "jitter" (see the module docstring)."""
    if strong == "randaugment":  # ssltrainer.init_transform: Tsimp, then K x RandomAugment(N 2, M 9) on the whole image
        whole = ViewRecipe(size=size, scale=(1.0, 1.0), color_jitter=None, grayscale=0.0, mean=mean, std=std)
        weak = whole.model_copy(update={"translate": size // 16})
        strong_view = whole.model_copy(update={"flip": 0.0, "rand_augment": RandAugment(n=2, m=30, bins=31, form="featmatch")})
        return [weak] + [strong_view] * strong_views
    weak = ViewRecipe(size=size, scale=(0.5, 1.0), color_jitter=None, grayscale=0.0, mean=mean, std=std)
    jitter = ViewRecipe(
        size=size,
        scale=(0.2, 1.0),
        # The fixmatch form's strong view, DALI's fused colour twist: torchvision's jitter here put the
        # few-label test at 0.67, under its 0.8.
        color_jitter=ColorJitter(brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, probability=0.8, form="color_twist"),
        grayscale=0.2,
        blur=Blur(probability=0.5) if size >= 64 else None,
        mean=mean,
        std=std,
    )
    return [weak] + [jitter] * strong_views


def choose_labeled(labels: torch.Tensor, per_class: int, num_classes: int, seed: int) -> torch.Tensor:
    """bool [N]: the first `per_class` samples of each class in a seeded permutation of the global indices
    (`labels[i]` is sample i's class). A class with fewer samples keeps them all."""
    order = torch.randperm(labels.shape[0], generator=torch.Generator().manual_seed(seed))
    ranked = labels[order]
    chosen = torch.zeros(labels.shape[0], dtype=torch.bool)
    for c in range(num_classes):
        chosen[order[ranked == c][:per_class]] = True
    return chosen


class FeatMatchNet(nn.Module):
    """backbone -> f; AugF(f, prototypes) -> g; one linear classifier on f and on g."""

    def __init__(self, backbone: nn.Module, num_classes: int, heads: int, dropout: float = 0.0):
        super().__init__()
        dim = backbone.num_features
        self.backbone = backbone
        self.augf = PrototypeAttention(dim, heads=heads, dropout=dropout, zero_init=True)
        self.classifier = nn.Linear(dim, num_classes)
        self.register_buffer("prototypes", torch.zeros(0, dim))
        self.register_buffer("prototype_labels", torch.zeros(0, dtype=torch.int64))

    def forward(self, x: torch.Tensor):
        """(features f, logits of f, logits of AugF(f)); before any prototype exists, logits of f twice."""
        f = self.backbone(x)
        logits_f = self.classifier(f)
        if self.prototypes.shape[0] == 0:
            return f, logits_f, logits_f
        return f, logits_f, self.classifier(self.augf(f, self.prototypes))


class _Rows(nn.Module):
    """[f, logits of f, logits of AugF(f), 1] per image, for `extract_features`: it L2-normalises each row,
    and the last column (1 / the row's norm) undoes that, to float rounding."""

    def __init__(self, model: FeatMatchNet):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f, logits_f, logits_g = self.model(x)
        ones = torch.ones(f.shape[0], 1, device=f.device)
        return torch.cat([f.float(), logits_f.float(), logits_g.float(), ones], 1)


def collect(model: FeatMatchNet, loader: ShardLoader, device, autocast: dict) -> dict[str, torch.Tensor]:
    """One evaluation epoch (`pipeline.eval.extract_features`, so in eval mode, padding rows dropped, in
    sample order): raw features and both logits of every sample, with its label and global index."""
    dtype = autocast["dtype"] if autocast["enabled"] else None
    rows, labels, indices = extract_features(_Rows(model), loader, device, dtype=dtype)
    rows = rows[:, :-1] / rows[:, -1:]
    dim, num_classes = model.classifier.in_features, model.classifier.out_features
    features, logits_f, logits_g = rows.split([dim, num_classes, num_classes], dim=1)
    return {"features": features, "logits_f": logits_f, "logits_g": logits_g, "labels": labels, "indices": indices}


def warm_start(model: FeatMatchNet, features: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int) -> None:
    """Classifier := a linear probe on relu(features) of the labeled images (what AugF gives at start), its
    feature standardisation folded into the weights."""
    inputs = torch.relu(features)
    probe = train_linear_probe(inputs, labels, inputs, labels, num_classes=num_classes, seed=seed)
    norm, linear = probe.head[0], probe.head[1]
    scale = (norm.running_var + norm.eps).rsqrt()
    with torch.no_grad():
        model.classifier.weight.copy_(linear.weight * scale)
        model.classifier.bias.copy_(linear.bias - (linear.weight * scale) @ norm.running_mean)


def memory_labels(true_labels: torch.Tensor, pseudo: torch.Tensor, confidence: torch.Tensor, threshold: float) -> torch.Tensor:
    """Labeled rows keep their label; unlabeled rows take their pseudo-label when confident, else -1."""
    return torch.where(true_labels >= 0, true_labels, torch.where(confidence >= threshold, pseudo, -1))


def join(labeled: Batch, rest: Batch) -> Batch:
    """One batch: the labeled loader's rows, then the shard loader's, view by view."""
    views = [torch.cat([a, b.to(a.device)]) for a, b in zip(labeled.views, rest.views)]
    return Batch(views, torch.cat([labeled.labels, rest.labels]), torch.cat([labeled.indices, rest.indices]),
                 torch.cat([labeled.valid, rest.valid]))


def released_step(model: FeatMatchNet, views: list[torch.Tensor], labels: torch.Tensor, coeff: float, args: Namespace,
                  rng, autocast: dict, graph: bool = True):
    """The released training step on one batch (views [weak, strong...], labels -1 = unlabeled): the loss,
    the weak view's features and its logits through AugF (from the first, gradient-free forward). Without
    `graph` (the AugF-free start, train1) the loss has no graph term."""
    b, v = views[0].shape[0], len(views)
    x = torch.cat(views)
    with torch.no_grad(), torch.autocast(**autocast):
        f, _, logits_g = model(x)  # train mode: BatchNorm over every view, as the released first forward
    targets = soft_targets(logits_g[:b], labels, args.temperature).repeat(v, 1)
    lam, perm = draw_mixup(x.shape[0], rng)
    x_mix, t_mix = mixup(x, targets.to(x.dtype), lam, perm)
    with torch.autocast(**autocast):
        _, mixed_f, mixed_g = model(x_mix)
    loss = featmatch_released_loss(mixed_g, mixed_f, t_mix.float(), (labels >= 0).repeat(v), coeff=coeff,
                                   lambda_g=args.lambda_g, lambda_f=args.lambda_f if graph else 0.0)
    return loss, f[:b], logits_g[:b]


def optimizer_groups(model: FeatMatchNet, lr: float, backbone_scale: float, weight_decay: float,
                     exclusions: bool = True) -> list[dict]:
    """Per part, the backbone's at lr x backbone_scale, AugF's and the classifier's at lr: timm's weight-decay
    groups (none on biases, norms and the backbone's `no_weight_decay()` tokens), or with `exclusions`
    off one group per part, all of it decayed (the released optimizer)."""
    groups = []
    for part, scale in ((model.backbone, backbone_scale), (model.augf, 1.0), (model.classifier, 1.0)):
        if exclusions:
            tokens = set(getattr(part, "no_weight_decay", set)())
            part_groups = param_groups_weight_decay(part, weight_decay, no_weight_decay_list=tokens)
        else:
            part_groups = [{"params": list(part.parameters()), "weight_decay": weight_decay}]
        groups += [{**group, "lr": lr * scale} for group in part_groups if group["params"]]
    return groups


# GT-RIPL/FeatMatch config/cifar10/*.json, train: pretrain_iters, cycle_iters (twice), end_iters
RELEASED_PHASES = (3000, 75000, 75000, 30000)


def released_phases(total_steps: int) -> tuple[int, int, int, int]:
    """The released phases (AugF-free start, lr up, lr down, end) as the same shares of `total_steps`."""
    whole = sum(RELEASED_PHASES)
    start, cycle = (round(total_steps * n / whole) for n in RELEASED_PHASES[:2])
    cycle = min(cycle, (total_steps - start) // 2)
    return start, cycle, cycle, total_steps - start - 2 * cycle


def released_lr(step: int, total_steps: int, max_lr: float) -> float:
    """SupConvScheduler's lr at `step` over the released phases scaled to `total_steps`: linear from max/100
    to max/10, to max, back to max/10, then towards max/10^4 (reached at `total_steps`)."""
    knots = [max_lr / 100, max_lr / 10, max_lr, max_lr / 10, max_lr / 1e4]
    begin = 0
    for phase, length in enumerate(released_phases(total_steps)):
        if step < begin + length:
            return knots[phase] + (step - begin) / length * (knots[phase + 1] - knots[phase])
        begin += length
    return knots[-1]


class ReleasedSchedule:
    """`released_lr` per step for every group, scaled by the group's own lr (the backbone's lr scale); the
    same `step_update(step)` as timm's schedulers, and the lr of step 0 set at once."""

    def __init__(self, optimizer: torch.optim.Optimizer, total_steps: int):
        self.optimizer, self.total_steps = optimizer, total_steps
        for group in optimizer.param_groups:
            group.setdefault("initial_lr", group["lr"])
        self.step_update(0)

    def step_update(self, step: int) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = released_lr(step, self.total_steps, group["initial_lr"])


def build_optimizer(model: FeatMatchNet, args: Namespace, total_steps: int, steps_per_epoch: int):
    """`args.schedule` "released": torch SGD (Nesterov, `args.momentum`, weight decay on every parameter) on
    ReleasedSchedule; "cosine": timm SGD (Nesterov, `args.momentum`, timm's weight-decay groups) and a
    per-step CosineLRScheduler: linear warm-up over `args.warmup_epochs`, then cosine to 0 over the
    remaining steps (as pipeline/train.py's)."""
    if args.schedule == "released":
        groups = optimizer_groups(model, args.lr, args.backbone_lr_scale, args.weight_decay, exclusions=False)
        optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, nesterov=True)
        return optimizer, ReleasedSchedule(optimizer, total_steps)
    optimizer = create_optimizer_v2(optimizer_groups(model, args.lr, args.backbone_lr_scale, args.weight_decay),
                                    opt="sgd", lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum)
    warmup = min(int(args.warmup_epochs * steps_per_epoch), max(total_steps - 1, 0))
    scheduler = CosineLRScheduler(
        optimizer, t_initial=total_steps - warmup, lr_min=0.0, warmup_t=warmup, warmup_lr_init=args.lr * 1e-3,
        warmup_prefix=True, t_in_epochs=False,
    )
    return optimizer, scheduler


def save_output(out: Path, model: FeatMatchNet, config: dict, num_classes: int, result: dict, class_names: list[str]) -> None:
    """A timm folder whose model is the fine-tuned backbone with the classifier as its own head."""
    out.mkdir(parents=True, exist_ok=True)
    backbone = model.backbone
    backbone.reset_classifier(num_classes)
    with torch.no_grad():
        backbone.get_classifier().weight.copy_(model.classifier.weight)
        backbone.get_classifier().bias.copy_(model.classifier.bias)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}
    backbone.reset_classifier(0)
    save_file(state, str(out / "model.safetensors"))
    config = json.loads(json.dumps(config))
    config["num_classes"] = num_classes
    config.setdefault("model_args", {})["num_classes"] = num_classes
    config.setdefault("pretrained_cfg", {})["num_classes"] = num_classes
    config["label_names"] = class_names
    (out / "config.json").write_text(json.dumps(config, indent=1) + "\n")
    augf = {f"augf.{k}": v for k, v in model.augf.state_dict().items()}
    augf |= {"prototypes": model.prototypes, "prototype_labels": model.prototype_labels}
    save_file({k: v.detach().cpu().contiguous() for k, v in augf.items()}, str(out / "augf.safetensors"))
    (out / "result.json").write_text(json.dumps(result, indent=1) + "\n")


# ------------------------------------------------------------------------------------------- the run


def finetune(args: Namespace) -> dict:
    """Fine-tune as `args` says (the options of launch/finetune.py, by their attribute names) and return the
    result that launch/finetune.py prints; raises ShardError, CheckpointError, OSError, ValueError or
    FloatingPointError (divergence) on bad input."""
    start_time = time.time()
    torch.manual_seed(args.seed)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    device_id = (device.index or 0) if device.type == "cuda" else None
    autocast = {"device_type": device.type, "dtype": torch.bfloat16, "enabled": device.type == "cuda"}

    class_names = shared_class_names(args.train, args.val)
    num_classes = len(class_names)
    config = backbone_config(args.backbone)
    backbone = load_backbone(args.backbone)
    model = FeatMatchNet(backbone, num_classes, args.heads, args.attention_dropout).to(device)
    released = args.form == "released"

    eval_cfg = eval_data_config(backbone, args.batch_size)
    first = eval_cfg.view_recipes()[0]
    views = view_recipes(first.size, first.mean, first.std, args.strong_views, args.strong_aug)
    train_cfg = DataConfig(views=views, batch_size=args.batch_size, eval_size=eval_cfg.eval_size,
                           eval_resize=eval_cfg.eval_resize, seed=args.seed)
    unlabeled_batch = args.batch_size - args.labeled_batch
    train_loader = ShardLoader(args.train, train_cfg, train=True, batch_size=unlabeled_batch, device_id=device_id)
    memory_loader = ShardLoader(args.train, eval_cfg, train=False, batch_size=args.batch_size, device_id=device_id)
    val_loader = ShardLoader(args.val, eval_cfg, train=False, batch_size=args.batch_size, device_id=device_id)
    n_train = train_loader.manifest.num_samples

    # Every sample's label by global index, from one pass that also fills the memory.
    first_pass = collect(model, memory_loader, device, autocast)
    if first_pass["indices"].shape[0] != n_train or not torch.equal(first_pass["indices"].cpu(), torch.arange(n_train)):
        raise ShardError(f"{args.train}: sample indices are not 0..{n_train - 1}")
    all_labels = first_pass["labels"].cpu()
    is_labeled = choose_labeled(all_labels, args.labels_per_class, num_classes, args.seed)
    per_class = torch.bincount(all_labels[is_labeled], minlength=num_classes)
    if (per_class < args.labels_per_class).any():
        short = [class_names[c] for c in (per_class < args.labels_per_class).nonzero().flatten().tolist()]
        print(f"warning: fewer than {args.labels_per_class} images in class(es) {short[:5]}: all of them are labeled", file=sys.stderr)
    known = torch.where(is_labeled, all_labels, -1).to(device)  # what training may see: -1 = unlabeled
    labeled_loader = None
    if args.labeled_batch:
        labeled_loader = LabeledLoader(args.train, is_labeled.nonzero().flatten().tolist(), train_cfg, args.labeled_batch,
                                       device_id=device_id, seed=args.seed)
    # released: every pseudo-label goes into the memory; prototypes pick confident ones with an adaptive threshold
    memory_threshold = 0.0 if released else args.prototype_threshold

    if args.warm_start:
        warm_start(model, first_pass["features"][is_labeled.to(device)], all_labels[is_labeled].to(device), num_classes, args.seed)
    memory = FeatureMemory(n_train, backbone.num_features, device=device)
    with torch.no_grad():  # AugF starts as relu(f): the pseudo-labels of the warm-started classifier
        confidence, pseudo = model.classifier(torch.relu(first_pass["features"])).softmax(1).max(1)
    if not args.warm_start:  # an untrained classifier's pseudo-labels mean nothing
        confidence = torch.zeros_like(confidence)
    memory.update(first_pass["indices"], first_pass["features"], memory_labels(known, pseudo, confidence, memory_threshold), confidence)

    refreshes: list[int] = []  # the steps at which prototypes were extracted

    def refresh_prototypes(step: int) -> None:
        if refreshes and refreshes[-1] == step:  # an epoch's end that is also a due step
            return
        seed = args.seed + 1000 * len(refreshes)
        refreshes.append(step)
        if released and labeled_loader is not None and step > 0:  # the labeled rows from an unaugmented pass
            out = collect(model, labeled_loader.evaluation(), device, autocast)
            memory.update(out["indices"], out["features"], known[out["indices"]], torch.ones(out["indices"].shape[0]))
        if released:
            protos, owners = memory.released_class_prototypes(num_classes, args.prototypes_per_class, known >= 0,
                                                              threshold=args.prototype_threshold, iters=args.kmeans_iters, seed=seed)
        else:
            protos, owners = memory.class_prototypes(num_classes, args.prototypes_per_class, iters=args.kmeans_iters, seed=seed)
        model.prototypes, model.prototype_labels = protos.to(device), owners.to(device)

    def evaluate() -> dict:
        out = collect(model, val_loader, device, autocast)
        labels = out["labels"]
        with_augf, plain = out["logits_g"].argmax(1), out["logits_f"].argmax(1)
        return {"val_top1": top1_accuracy(with_augf, labels), "val_top1_plain": top1_accuracy(plain, labels),
                "val_balanced": balanced_accuracy(with_augf, labels, num_classes)}

    total_steps = args.epochs * len(train_loader)
    # the released schedule's AugF-free start: no prototypes (so no AugF and no graph term) before this step
    augf_from = released_phases(total_steps)[0] if args.schedule == "released" else 0

    def refresh_due(step: int) -> bool:
        every = args.prototype_every
        return step == augf_from or (every > 0 and step > augf_from and step % every == 0)

    if augf_from == 0:
        refresh_prototypes(0)
    initial = evaluate()
    opt, schedule = build_optimizer(model, args, total_steps, len(train_loader))
    rampup_steps = round(args.rampup * total_steps)
    mix_rng = np.random.default_rng(args.seed)
    step = 0

    history = []
    model.train()
    for epoch in range(args.epochs):
        epoch_start = time.time()
        sums = torch.zeros(5, device=device)  # total, clf, con_g, con_f, confident rows
        unlabeled_rows = torch.zeros((), device=device)
        for batch in train_loader:
            if labeled_loader is not None:
                batch = join(next(labeled_loader), batch)
            views = [v.to(device, non_blocking=True) for v in batch.views]
            indices = batch.indices.to(device, non_blocking=True)
            labels = known[indices]
            b = views[0].shape[0]
            if step > 0 and refresh_due(step):
                refresh_prototypes(step)
            augf_on = step >= augf_from
            if released:
                loss, f_weak, weak_g = released_step(model, views, labels, rampup(step, rampup_steps), args, mix_rng, autocast,
                                                     graph=augf_on)
                pseudo, confidence, confident = pseudo_labels(weak_g, args.threshold)
                confident = confident & (labels < 0)
            else:
                with torch.autocast(**autocast):
                    f, logits_f, logits_g = model(torch.cat(views))
                loss = featmatch_loss(logits_g[:b], logits_g[b:], logits_f[b:], labels, threshold=args.threshold,
                                      lambda_g=args.lambda_g, lambda_f=args.lambda_f)
                f_weak, pseudo, confidence, confident = f[:b], loss.pseudo_labels, loss.confidence, loss.mask
            opt.zero_grad(set_to_none=True)
            loss.total.backward()
            if args.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
            opt.step()
            step += 1
            schedule.step_update(step)
            if args.memory_refresh == "train" and augf_on:  # released: unlabeled rows recorded from train2 on
                memory.update(indices, f_weak.float(), memory_labels(labels, pseudo, confidence, memory_threshold),
                              torch.where(labels >= 0, 1.0, confidence))
            sums += torch.stack([loss.total.detach(), loss.clf.detach(), loss.con_g.detach(), loss.con_f.detach(), confident.sum()])
            unlabeled_rows += (labels < 0).sum()

        if args.memory_refresh == "pass":
            out = collect(model, memory_loader, device, autocast)
            confidence, pseudo = out["logits_g"].softmax(1).max(1)
            memory.update(out["indices"], out["features"], memory_labels(known[out["indices"]], pseudo, confidence, memory_threshold), confidence)
        if args.prototype_every == 0 and step >= augf_from:
            refresh_prototypes(step)
        # Monitoring only (training never reads these labels): how right the memory's pseudo-labels are.
        pseudo_rows = (known < 0) & (memory.labels >= 0)
        all_on_device = all_labels.to(device)
        steps = max(1, len(train_loader))
        total, clf, con_g, con_f, confident = (sums / torch.tensor([steps] * 4 + [1], device=device)).tolist()
        record = {
            "epoch": epoch + 1,
            "loss": total, "clf": clf, "con_g": con_g, "con_f": con_f,
            "mask_rate": confident / max(1.0, unlabeled_rows.item()),
            "pseudo_coverage": pseudo_rows.sum().item() / max(1, int((known < 0).sum())),
            "pseudo_accuracy": (memory.labels[pseudo_rows] == all_on_device[pseudo_rows]).double().mean().item() if pseudo_rows.any() else None,
            "prototypes": int(model.prototypes.shape[0]),
            **evaluate(),
            "seconds": round(time.time() - epoch_start, 2),
        }
        history.append(record)
        print(json.dumps(record), file=sys.stderr, flush=True)
        if not math.isfinite(total):
            raise FloatingPointError(f"training diverged in epoch {epoch + 1} (loss {total}): lower --lr or set --grad-clip")

    last = history[-1]
    result = {
        "backbone": args.backbone,
        "train_images": n_train,
        "labeled_images": int(is_labeled.sum()),
        "labels_per_class": args.labels_per_class,
        "val_images": val_loader.manifest.num_samples,
        "initial_val_top1": initial["val_top1"],
        "initial_val_top1_plain": initial["val_top1_plain"],
        "val_top1": last["val_top1"],
        "val_top1_plain": last["val_top1_plain"],
        "val_balanced": last["val_balanced"],
        "prototype_steps": refreshes,
        "epochs": history,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "seconds": round(time.time() - start_time, 2),
    }
    if args.output is not None:
        save_output(args.output, model, config, num_classes, result, class_names)
    return result
