"""MetAug (Contrastive Learning via Meta Feature Augmentation, ICML 2022) with the OUCL loss.

Two views x1, x2 give L2-normalised projector features z = [z1, z2] ([B, D] each, fp32); one generator per
view gives augmented features g_v = normalize(G_v(z_v)). OUCL(sets) is the loss over feature sets of the
same local images (`contrast`: every row an anchor against the gathered keys of every set, the positives
the same image in the other sets, everything else a negative, the anchor itself masked). θ: encoder
(backbone + projector), φ: generators, R: the margin-injected regulariser below.

method.metaug.form=released (default): the training step of the released train_MetAug.py, in the
in-batch setting of this project (its CMC memory bank and Lab views are not here). One objective
    F(θ, φ) = (16/β) · [OUCL(z) + δ · (OUCL([g1, z2]) + OUCL([z1, g2]) + OUCL([g1, g2]))] + w · R
(generated features replace each view, then all views; R's positive term scaled by 1e-4) serves as
  (1) the encoder loss, returned by `forward` for the engine (generators applied with detached weights,
      so `engine.backward` reaches the encoder, also through g → z, and never the generators); then the
      engine's optimizer steps: θ → θ₁;
  (2) in `after_step`, the meta step on the same inputs at θ₁: θ' = θ₁ − ε·∇θ F(θ₁, φ) over the whole
      encoder (scope=encoder, ε = 1e-3), M(φ) = F(θ'(φ), φ), one SGD step of the generators (lr 0.03,
      momentum 0.9, weight decay 1e-4) on dM/dφ.
method.metaug.form=meta_first: the meta step runs first, inside `forward`, from the features at θ, with
L = OUCL(z) + δ · OUCL([z1, z2, g1, g2]) as encoder and inner loss and M = L(θ') + w · R (R unscaled, only
here), Adam generators, scope=projector and ε = 0.01 unless set; then the encoder loss L(θ, φ_new), whose
OUCL(z) is the tensor the meta step used.

The meta step in both forms: θ' over the weights in `scope` (projector, or backbone + projector) with the
graph kept (create_graph), the gradient averaged over ranks with a collective that is itself
differentiable; dM/dφ by torch.autograd.grad: the direct path through g, plus the second-order path
through θ'(φ) (∂²F/∂θ∂φ, present because the δ terms and R depend on φ), averaged over ranks and applied
by the method's own optimizer; encoder weights and their `.grad` are not touched, no generator `.grad`
is left behind, and BatchNorm statistics are updated by the step's own pass only.

R (METHODS.md), per original anchor a (rows of z1, z2) with s = (cos+1)/2 against the original keys:
m⁺ = min(min s⁺, max s⁻), m⁻ = max(min s⁺, max s⁻), and against the generated keys ŝ⁺ (every generated
feature of a's image) and ŝ⁻ (those of other images): R = p · mean([ŝ⁺ − m⁺]₊) + mean([m⁻ − ŝ⁻]₊),
p = 1e-4 released (util.py's margin_hyper), 1 in meta_first. m± stay differentiable, as released.

What is differentiated twice (the inner loss) runs on the chunked PyTorch loss (or the dense reference):
under create_graph the Triton path's backward is that PyTorch code anyway; the rest follows
method.loss_impl. With OUCL's Γ weights the loss module treats Γ⁺ and Γ⁻ as constants in every derivative
(circle-loss convention), so ∇θ F is that surrogate gradient, and its derivative in the meta step holds Γ
constant too, as the released code does; with Γ = 1 (the released switches) every derivative is exact.
With gradient accumulation the meta step runs on every micro-batch.

The generators' parameters have requires_grad=False: they are the method's own (left out of
`param_groups`), outside the engine's optimizer, gradient all-reduce and the universal checkpoint's
trained set; the meta step differentiates with respect to detached leaf copies that share their storage.
They are in the module's state (checkpointed with it), and so is their optimizer's state (SGD momentum or
Adam moments), as the module's extra state (`get_extra_state`), which DeepSpeed's module file holds.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

from typing import Literal

from pydantic import Field, model_validator

from models.generators import feature_generators
from pipeline.config import MethodConfig, Strict
from pipeline.distributed import all_reduce_mean_, all_reduce_mean_with_grad, gather_with_grad, is_distributed, rank
from pipeline.losses import oucl_loss
from pipeline.methods import register_method
from pipeline.methods.base import Method

Params = dict[str, torch.Tensor]

# The released train_MetAug.py: its generators' optimizers and util.py's margin_hyper.
RELEASED_GENERATOR_SGD = {"momentum": 0.9, "weight_decay": 1e-4}
RELEASED_POSITIVE_WEIGHT = 1e-4


def call_with(module: nn.Module, params: Params, *args, update_buffers: bool = False):
    """module(*args) with `params` in place of its parameters. Unless `update_buffers`, on copies of its
    buffers: BatchNorm's running statistics are updated once per step, not again by each recomputation."""
    buffers = {} if update_buffers else {name: b.clone() for name, b in module.named_buffers()}
    return functional_call(module, {**buffers, **params}, args)


def unit(x: torch.Tensor) -> torch.Tensor:
    """L2-normalised rows in fp32 at least (autocast's bf16/fp16 outputs are promoted; fp64 stays)."""
    return F.normalize(x.to(torch.promote_types(x.dtype, torch.float32)), dim=1)


def margin_penalty(hardest_pos, hardest_neg, s_gen, gen_pos, gen_neg, positive_weight: float) -> torch.Tensor:
    """R from each anchor's hardest original positive and negative [A, 1] and its generated scores s_gen
    [A, M], of which `gen_pos` are positives and `gen_neg` negatives (bool masks broadcastable to s_gen):
    positive_weight · mean([ŝ⁺ − m⁺]₊) + mean([m⁻ − ŝ⁻]₊), m⁺ = min(hardest pair), m⁻ = max(hardest pair)."""
    m_pos, m_neg = torch.minimum(hardest_pos, hardest_neg), torch.maximum(hardest_pos, hardest_neg)
    gen_pos, gen_neg = gen_pos.expand_as(s_gen), gen_neg.expand_as(s_gen)
    easy_pos = torch.where(gen_pos, (s_gen - m_pos).clamp_min(0), 0.0).sum() / gen_pos.sum()
    easy_neg = torch.where(gen_neg, (m_neg - s_gen).clamp_min(0), 0.0).sum() / gen_neg.sum()
    return positive_weight * easy_pos + easy_neg


class OUCLSettings(Strict):
    """OUCL (MetAug's loss). weighted=False and margins=False reproduce the released code."""

    beta: float = Field(16.0, gt=0.0)
    gamma: float = Field(0.25, ge=0.0, lt=0.5)
    weighted: bool = True  # the Gamma weights
    margins: bool = True


# What `form: meta_first` changes where the recipe does not set it (the fields' defaults are the released form's).
META_FIRST_DEFAULTS = {"scope": "projector", "inner_lr": 0.01, "generator_lr": 1e-3}


class MetAugSettings(Strict):
    """form=released: the training step of the released train_MetAug.py (see `MetAug`); form=meta_first: the
    meta step before the encoder step, one OUCL over originals and generated, R in the meta objective only,
    Adam generators (this project's first form), with its own defaults for scope, inner_lr, generator_lr."""

    form: Literal["released", "meta_first"] = "released"
    delta: float = Field(1e-5, ge=0.0)  # weight of the OUCL terms with generated features
    reg_weight: float = Field(1e-5, ge=0.0)  # weight of the margin-injected regulariser
    inner_lr: float = Field(1e-3, gt=0.0)  # epsilon of the fast weights (released: bb_learning_rate)
    scope: Literal["projector", "encoder"] = "encoder"  # the weights the fast-weight step runs through
    generator_hidden: int = Field(2048, ge=1)
    generator_lr: float = Field(0.03, gt=0.0)  # released: SGD, momentum 0.9, weight decay 1e-4; meta_first: Adam

    @model_validator(mode="before")
    @classmethod
    def form_defaults(cls, data):
        if isinstance(data, dict) and data.get("form") == "meta_first":
            return {**META_FIRST_DEFAULTS, **data}
        return data


class MetAugConfig(MethodConfig):
    loss_impl: Literal["auto", "reference", "chunked", "triton"] = "auto"
    oucl: OUCLSettings = OUCLSettings()
    metaug: MetAugSettings = MetAugSettings()


@register_method("metaug")
class MetAug(Method):
    Config = MetAugConfig
    zero3 = False  # the encoder scope needs whole weights for θ − ε·∇θ L; ZeRO 0-2 only

    def __init__(self, cfg, generators: nn.ModuleList | None = None):
        """generators: one module per view mapping [B, D] to [B, D] (default: the released MLPs)."""
        super().__init__(cfg)
        m, o = cfg.method.metaug, cfg.method.oucl
        dim = cfg.model.projector.out_dim
        self.generators = generators if generators is not None else feature_generators(2, dim, m.generator_hidden)
        self.generators.requires_grad_(False)
        self.released = m.form == "released"
        params = self.generators.parameters()
        self.generator_optimizer = (torch.optim.SGD(params, lr=m.generator_lr, **RELEASED_GENERATOR_SGD) if self.released
                                    else torch.optim.Adam(params, lr=m.generator_lr))
        self.delta, self.reg_weight, self.inner_lr, self.scope = m.delta, m.reg_weight, m.inner_lr, m.scope
        self.oucl = dict(beta=o.beta, gamma=o.gamma, weighting=o.weighted, margins=o.margins)
        # released: CircleLoss divides by its scale and multiplies by 16; util.py scales R's positive term
        self.oucl_scale = 16.0 / o.beta if self.released else 1.0
        self.positive_weight = RELEASED_POSITIVE_WEIGHT if self.released else 1.0
        self.pending: list[torch.Tensor] = []  # released: this step's inputs, for the meta step after it
        self.meta_parts: list[dict[str, torch.Tensor]] = []  # released: logged with the next forwards
        self.impl = cfg.method.loss_impl
        # The paths differentiated twice: the chunked PyTorch path or the dense reference. Triton's backward
        # under create_graph is the chunked one, so its kernels would serve only the forward there.
        self.impl_twice = "reference" if self.impl == "reference" else "chunked"

    def get_extra_state(self) -> dict:
        """The generators' optimizer state travels with the module's state dict, hence with every checkpoint."""
        return self.generator_optimizer.state_dict()

    def set_extra_state(self, state: dict) -> None:
        self.generator_optimizer.load_state_dict(state)

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The engine trains the encoder; the generators are the method's own (its optimizer, in the meta step)."""
        own = {id(p) for p in self.generators.parameters()}
        return [{**g, "params": [p for p in g["params"] if id(p) not in own]} for g in super().param_groups(weight_decay)]

    @classmethod
    def check(cls, cfg, world_size) -> None:
        super().check(cfg, world_size)
        if cfg.model.compile:
            raise ValueError(f"method.name={cfg.method.name} cannot run with model.compile=true: its meta step differentiates "
                             "twice (autograd.grad with create_graph), which compiled graphs do not support")
        if cfg.method.batch_norm == "sync":
            raise ValueError(f"method.name={cfg.method.name} cannot run with method.batch_norm=sync: SyncBatchNorm's backward "
                             "cannot be differentiated again (the meta step needs it); use local or shuffle")
        if cfg.engine.precision == "fp16":
            raise ValueError(f"method.name={cfg.method.name} cannot run with engine.precision=fp16: the meta step's gradients "
                             "are not loss-scaled and its delta-sized second-order terms underflow in fp16; use bf16")
        if cfg.method.metaug.scope == "encoder" and cfg.model.grad_checkpointing:
            raise ValueError("method.metaug.scope=encoder cannot run with model.grad_checkpointing=true: the "
                             "recomputed backbone is not differentiable twice; use scope=projector or turn "
                             "checkpointing off")

    # --- features ---------------------------------------------------------------------------------------

    def encode(self, views: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """(x, h, [z1, z2]): both views in one batch (BatchNorm statistics over both), backbone output h,
        L2-normalised projector features."""
        x = torch.cat(self.prepare_views(views))
        return x, *self.features_of(x, twice=not self.released)  # meta_first's meta step starts from them

    def features_of(self, x: torch.Tensor, update_buffers: bool = True, twice: bool = True):
        """(h, [z1, z2]) of the batched views x at the current weights. When they will be differentiated
        `twice` under scope=encoder, attention runs on the math kernel, the only one whose backward is
        differentiable again."""
        with self.attention_kernels(twice):
            h = call_with(self.backbone, {}, x, update_buffers=update_buffers)
        return h, self.project(call_with(self.projector, {}, h, update_buffers=update_buffers))

    def attention_kernels(self, twice: bool):
        """For a backbone pass differentiated `twice` under scope=encoder: the math attention kernel."""
        return sdpa_kernel(SDPBackend.MATH) if twice and self.scope == "encoder" else nullcontext()

    @staticmethod
    def project(p: torch.Tensor) -> list[torch.Tensor]:
        return list(unit(p).chunk(2))

    def generate(self, z: list[torch.Tensor], params: list[Params] | None = None) -> list[torch.Tensor]:
        """L2-normalised generated features, one generator per view; with `params` (one dict per generator)
        in place of the generators' weights, otherwise with their current weights detached."""
        update = params is None  # the step's own pass updates BatchNorm statistics; the meta step's do not
        if params is None:
            params = [{n: p.detach() for n, p in g.named_parameters()} for g in self.generators]
        return [unit(call_with(g, p, zv, update_buffers=update)) for g, p, zv in zip(self.generators, params, z)]

    # --- losses -----------------------------------------------------------------------------------------

    def contrast(self, sets: list[torch.Tensor], impl: str | None = None) -> torch.Tensor:
        """OUCL over S feature sets [B, D] of the same local images: S·B anchors against the S·N gathered
        keys (set-major); an anchor's positives are its image in the other S−1 sets; its own key is masked.
        With S = 2 and the released switches this is NT-Xent at temperature 2/β."""
        count, rows = len(sets), sets[0].shape[0]
        keys = gather_with_grad(torch.stack(sets, 1))  # [N, S, D]: one collective for every set
        n = keys.shape[0]
        keys = keys.transpose(0, 1).reshape(count * n, -1)
        own = rank() * rows + torch.arange(rows, device=keys.device)
        slots = torch.arange(count, device=keys.device)
        selves = (slots[:, None] * n + own).reshape(-1)  # [S·B]
        j = torch.arange(count - 1, device=keys.device)
        others = j[None, :] + (j[None, :] >= slots[:, None]).long()  # [S, S-1]: row a lists the sets b != a
        positives = (others[:, None, :] * n + own[None, :, None]).reshape(count * rows, count - 1)
        return oucl_loss(torch.cat(sets), keys, positives, mask_self=selves, impl=impl or self.impl, **self.oucl)

    def contrast_originals(self, z: list[torch.Tensor], impl: str | None = None) -> torch.Tensor:
        """`contrast` of the original features, once per pass (θ, θ₁, θ'): where a subclass keeps a memory
        of the originals (metaug_cmc's bank), it is updated here."""
        return self.contrast(z, impl)

    def generated_sets(self, z: list[torch.Tensor], generated: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        """The feature sets of the OUCL terms with generated features. released: each view replaced by its
        generated features alone, then all views (2 views: 3 terms; the released code's 3 CMC views: 4);
        meta_first: originals and generated together in one term."""
        if not self.released:
            return [z + generated]
        return [z[:v] + [generated[v]] + z[v + 1 :] for v in range(len(z))] + [generated]

    def objective(self, z, generated, l_orig=None, impl=None, with_reg=False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(loss, parts): scale · (OUCL(z) + δ · Σ OUCL(generated sets)) + R's weight · R, with R in the
        released form always (encoder loss, inner loss and meta objective alike), in meta_first only
        `with_reg` (the meta objective). scale = 16/β released, 1 otherwise."""
        impl = impl or self.impl
        l_orig = self.contrast_originals(z, impl) if l_orig is None else l_orig
        l_aug = sum(self.contrast(sets, impl) for sets in self.generated_sets(z, generated))
        loss = self.oucl_scale * (l_orig + self.delta * l_aug)
        parts = {"oucl": l_orig, "oucl_generated": l_aug}
        if with_reg or self.released:
            parts["reg"] = self.margin_regulariser(z, generated)
            loss = loss + self.reg_weight * parts["reg"]
        return loss, parts

    def margin_regulariser(self, originals: list[torch.Tensor], generated: list[torch.Tensor]) -> torch.Tensor:
        """R of METHODS.md for the local original anchors against the gathered original and generated keys
        (dense [S·B, S·N] similarities), its positive term scaled by `positive_weight`."""
        count, rows = len(originals), originals[0].shape[0]
        keys = gather_with_grad(torch.stack(originals + generated, 1))  # [N, 2S, D]
        n = keys.shape[0]
        keys = keys.transpose(0, 1).reshape(2 * count * n, -1)
        anchors = torch.cat(originals)
        s = (anchors @ keys[: count * n].T + 1) * 0.5  # against original keys
        s_gen = (anchors @ keys[count * n :].T + 1) * 0.5  # against generated keys
        own = rank() * rows + torch.arange(rows, device=anchors.device)
        row_image = own.repeat(count)  # [S·B]
        col_image = torch.arange(n, device=anchors.device).repeat(count)  # [S·N]
        same = row_image[:, None] == col_image[None, :]
        selves = torch.arange(count * rows, device=anchors.device)
        selves = (selves // rows) * n + own.repeat(count)
        positive = same.clone()
        positive[torch.arange(count * rows, device=anchors.device), selves] = False
        hardest_pos = s.masked_fill(~positive, float("inf")).amin(1, keepdim=True)
        hardest_neg = s.masked_fill(same, float("-inf")).amax(1, keepdim=True)
        return margin_penalty(hardest_pos, hardest_neg, s_gen, same, ~same, self.positive_weight)

    # --- the meta step ------------------------------------------------------------------------------------

    def scope_modules(self) -> dict[str, nn.Module]:
        if self.scope == "encoder":
            return {"backbone": self.backbone, "projector": self.projector}
        return {"projector": self.projector}

    def fast_weights(self, inner_loss: torch.Tensor) -> dict[str, Params]:
        """θ' = θ − ε·∇θ L per scope module, as a differentiable function of everything L depends on. The
        gradient is that of the global mean loss (averaged over ranks), as the engine's step would use."""
        named = [(m, n, p) for m, mod in self.scope_modules().items()
                 for n, p in mod.named_parameters() if p.requires_grad]
        params = [p for _, _, p in named]
        with torch.autocast(inner_loss.device.type, enabled=False):
            grads = torch.autograd.grad(inner_loss, params, create_graph=True, allow_unused=True)
        grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
        if is_distributed():
            flat = all_reduce_mean_with_grad(torch.cat([g.reshape(-1) for g in grads]))
            grads = [part.view_as(p) for part, p in zip(flat.split([p.numel() for p in params]), params)]
        fast: dict[str, Params] = {m: {} for m in self.scope_modules()}
        for (m, n, p), g in zip(named, grads):
            fast[m][n] = p - self.inner_lr * g
        return fast

    def embed_at(self, fast: dict[str, Params], x, h) -> list[torch.Tensor]:
        """The features z' at the fast weights: the backbone reruns on x when it is in the scope, else its
        output h is reused."""
        if "backbone" in fast:
            h = call_with(self.backbone, fast["backbone"], x)
        return self.project(call_with(self.projector, fast["projector"], h))

    def meta_objective_at(self, fast: dict[str, Params], x, h, gen_params: list[Params]):
        """M = `objective` with R at the fast weights; (M, its parts, features z', generated g')."""
        z = self.embed_at(fast, x, h)
        g = self.generate(z, gen_params)
        objective, terms = self.objective(z, g, with_reg=True)
        parts = {"meta/objective": objective, "meta/oucl_fast": terms["oucl"],
                 "meta/oucl_generated_fast": terms["oucl_generated"], "meta/reg": terms["reg"]}
        return objective, parts, z, g

    def meta_objective(self, x, h, z, l_orig, gen_params: list[Params]):
        """M(φ) from the encoder's features at its current weights (θ in meta_first, θ₁ after the encoder's
        step in released; x, h, z as `encode` gives them, l_orig = `contrast(z)` computed with a
        twice-differentiable impl): the inner loss with generators `gen_params`, the fast weights, M."""
        inner, _ = self.objective(z, self.generate(z, gen_params), l_orig, impl=self.impl_twice)
        fast = self.fast_weights(inner)
        objective, parts, _, _ = self.meta_objective_at(fast, x, h, gen_params)
        return objective, parts

    def generator_leaves(self) -> list[Params]:
        """Leaf tensors sharing the generators' storage, for differentiating with respect to them."""
        return [{n: p.detach().requires_grad_() for n, p in g.named_parameters()} for g in self.generators]

    def meta_gradients(self, x, h, z, l_orig) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
        """dM/dφ for every generator parameter (in `self.generators.parameters()` order), averaged over
        ranks, and the meta step's parts; nothing is updated."""
        leaves = self.generator_leaves()
        objective, parts = self.meta_objective(x, h, z, l_orig, leaves)
        flat = [t for d in leaves for t in d.values()]
        with torch.autocast(objective.device.type, enabled=False):
            grads = torch.autograd.grad(objective, flat, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g.detach() for t, g in zip(flat, grads)]
        all_reduce_mean_(grads)  # the same update on every rank: the generators stay identical
        return grads, parts

    def meta_step(self, x, h, z, l_orig) -> dict[str, torch.Tensor]:
        """One step of the generators' optimizer on dM/dφ. Returns the detached parts to log."""
        grads, parts = self.meta_gradients(x, h, z, l_orig)
        params = list(self.generators.parameters())
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.grad = g.to(p.dtype)
            self.generator_optimizer.step()
            for p in params:
                p.grad = None  # nothing for the engine to see
        norms = torch.stack([torch.linalg.vector_norm(g) for g in grads])
        parts["meta/generator_grad_norm"] = torch.linalg.vector_norm(norms)
        return {k: v.detach() for k, v in parts.items()}

    # --- one step ---------------------------------------------------------------------------------------

    def forward(self, views):
        x, h, z = self.encode(views)
        if self.released:  # the encoder step first: the meta step follows the optimizer's (`after_step`)
            if torch.is_grad_enabled():
                self.pending.append(x)
            logged = self.meta_parts.pop(0) if self.meta_parts else {}
            l_orig = None
        else:
            l_orig = self.contrast_originals(z, self.impl_twice)  # shared by (a) and (b)
            logged = self.meta_step(x, h, z, l_orig)  # (a) generators only
        generated = self.generate(z)  # the current generators, weights detached: gradient reaches z only
        loss, parts = self.objective(z, generated, l_orig)
        with torch.no_grad():
            distance = torch.stack([1 - (g * zv).sum(1).mean() for g, zv in zip(generated, z)]).mean()
        logged.update({f"loss/{k}": v.detach() for k, v in parts.items()})
        logged["meta/generated_cos_distance"] = distance
        return loss, logged

    def after_step(self, progress: float) -> dict[str, float]:
        """released: the meta step on each of the step's (micro-)batches, at the encoder weights the optimizer
        has just updated, as train_MetAug.py recomputes its features after `optimizer.step()`. Its parts
        are logged with the next forwards (no host sync here)."""
        pending, self.pending = self.pending, []
        bf16 = self.cfg.engine.precision == "bf16"  # the engine's autocast, which does not reach this hook
        for x in pending:
            with torch.enable_grad(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
                h, z = self.features_of(x, update_buffers=False)
                self.meta_parts.append(self.meta_step(x, h, z, self.contrast_originals(z, self.impl_twice)))
        return {}
