"""MetAug in its released CMC setting (jiangmengli/metaug: train_MetAug.py, NCE/NCEAverage_MetAug.py,
NCE/NCECriterion_MetAug.py): `metaug`'s released step (pipeline/methods/metaug.py: the encoder step on
F = (16/β)·[OUCL(z) + δ·Σ OUCL(generated sets)] + w·R, then the meta step through fast weights and the
generators' SGD) with CMC's views, encoders and memory bank in place of in-batch contrast:

- views: one crop of the raw sRGB image in CIE Lab, split into L (1 channel) and ab (2 channels), and, as
  released (`method.ori`, default true), the whole Lab image "ori" (3 channels) as a third view; one timm
  encoder (backbone + projector, L2-normalised) and one generator per view;
- a memory bank per view (pipeline/methods/memory_bank.py, NCEAverage's: K = 1024 rows drawn per call,
  momentum 0.5): features of view v are queries against the rows of every other view w, the positive row
  w's row of the query's own sample, the negatives K drawn rows (one draw per call, shared by every pair);
- OUCL per image over its cross-view scores mapped to s = (x + 1)/2: with V views the V(V−1) positive
  scores [B, 6] and the V(V−1)·K negatives [B, 6K] of one row go into one OUCL term (CircleLoss's
  pooling), the mean over this rank's rows;
- each OUCL term with generated features (each view replaced by its generated features, then all views)
  scores them as queries against a fresh draw of the bank and does not update it; the originals' term
  updates every view's rows of the batch after scoring, at each of the step's passes (θ, θ₁ after the
  encoder step and the fast weights θ'), as train_MetAug.py calls `contrast(..., updatemem=True)` there;
- R per image from the originals' scores (hardest positive, hardest negative over all pairs) against the
  generated queries' scores, one draw of its own (the released call passes it four score sets of original
  queries among the generated ones, and crashes on its argument count).
Evaluation uses the concatenated backbone features [L | ab | ori]; each encoder is exported as its own
timm folder (`backbone/l`, `backbone/ab`, `backbone/ori`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from models.generators import feature_generators
from pipeline.losses import oucl_score_sets
from pipeline.methods import register_method
from pipeline.methods.base import Views
from pipeline.methods.cmc import LabFeatures, add_view_encoders, lab_columns, lab_views, view_param_groups
from pipeline.methods.memory_bank import MemoryBank, MemoryBankConfig
from pipeline.methods.metaug import MetAug, MetAugConfig, Params, call_with, margin_penalty, unit

VIEW_CHANNELS = {"l": 1, "ab": 2, "ori": 3}


class MetAugCMCConfig(MetAugConfig):
    memory_bank: MemoryBankConfig = MemoryBankConfig(negatives=1024, momentum=0.5)  # released nce_k, nce_m
    ori: bool = True  # the third view, the whole Lab image, as released; false: CMC's L and ab only


@dataclass
class LabBatch:
    """A batch's views (L, ab[, ori]) and the samples' dataset indices, which the bank's rows follow."""

    views: list[torch.Tensor]
    indices: torch.Tensor

    @property
    def device(self) -> torch.device:
        return self.indices.device


@register_method("metaug_cmc")
class MetAugCMC(MetAug):
    Config = MetAugCMCConfig
    views = Views(global_views=1, raw_rgb=True, indices=True)

    def __init__(self, cfg, generators=None):
        """generators: one module per view (default: the released MLPs)."""
        m = cfg.method
        names = tuple(VIEW_CHANNELS) if m.ori else ("l", "ab")
        dim = cfg.model.projector.out_dim
        if generators is None:
            generators = feature_generators(len(names), dim, m.metaug.generator_hidden)
        super().__init__(cfg, generators)
        add_view_encoders(self, cfg, {n: VIEW_CHANNELS[n] for n in names})
        self.view_names = names
        self.bank = MemoryBank(m.memory_bank, len(names), dim, cfg.train.seed)
        self.indices: torch.Tensor | None = None  # the batch whose features were computed last

    @classmethod
    def check(cls, cfg, world_size) -> None:
        super().check(cfg, world_size)
        if cfg.method.metaug.form != "released":
            raise ValueError(f"method.metaug.form={cfg.method.metaug.form}: method.name=metaug_cmc runs the released "
                             "form only (its OUCL terms are the released ones over the bank's score sets)")
        if cfg.method.loss_impl != "auto":
            raise ValueError(f"method.loss_impl={cfg.method.loss_impl}: method.name=metaug_cmc scores each row against "
                             "its own B x (1 + K) bank rows, densely; there is no fused path to choose")

    def encoders(self):
        return {n: getattr(self, f"{n}_backbone") for n in self.view_names}

    def features(self):
        return LabFeatures(*self.encoders().values())

    @classmethod
    def preview(cls, cfg, views):
        return super().preview(cfg, views) + lab_columns(views[0])  # "ori", the whole Lab image, is the view

    def param_groups(self, weight_decay):
        return view_param_groups(self, weight_decay)  # the generators (requires_grad=False) are left out

    def set_data_size(self, size):
        self.bank.allocate(size)

    def before_step(self, step):
        self.bank.begin_step(step)
        return {}

    def forward(self, views, indices=None):
        if indices is None:
            raise ValueError("method.name=metaug_cmc needs each sample's dataset index: forward(views, indices=...)")
        return super().forward((views, indices))

    # --- features: one encoder per view ---------------------------------------------------------------

    def encode(self, inputs):
        views, indices = inputs
        x = LabBatch(self.prepare_views(list(lab_views(views[0], whole="ori" in self.view_names))), indices)
        return x, *self.features_of(x, twice=False)

    def features_of(self, x: LabBatch, update_buffers: bool = True, twice: bool = True):
        self.indices = x.indices
        with self.attention_kernels(twice):
            h = [call_with(getattr(self, f"{n}_backbone"), {}, v, update_buffers=update_buffers)
                 for n, v in zip(self.view_names, x.views)]
        return h, [unit(call_with(getattr(self, f"{n}_projector"), {}, hv, update_buffers=update_buffers))
                   for n, hv in zip(self.view_names, h)]

    def scope_modules(self):
        kinds = ("backbone", "projector") if self.scope == "encoder" else ("projector",)
        return {f"{n}_{k}": getattr(self, f"{n}_{k}") for n in self.view_names for k in kinds}

    def embed_at(self, fast: dict[str, Params], x: LabBatch, h):
        z = []
        for n, xv, hv in zip(self.view_names, x.views, h):
            if f"{n}_backbone" in fast:
                hv = call_with(getattr(self, f"{n}_backbone"), fast[f"{n}_backbone"], xv)
            z.append(unit(call_with(getattr(self, f"{n}_projector"), fast[f"{n}_projector"], hv)))
        return z

    # --- the bank's score sets ------------------------------------------------------------------------

    def bank_scores(self, groups: list[list[torch.Tensor]], negatives: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """For each group of per-view feature sets: (s_pos [B, V(V−1)], s_neg [B, V(V−1)·K]), s = (x + 1)/2,
        the queries of set v against view w's rows for every ordered pair v != w, the positive row that of
        the query's own sample; each view's rows are gathered once for every group's queries."""
        count, scored = len(self.view_names), [([], []) for _ in groups]
        for w in range(count):
            queries = torch.stack([sets[v] for sets in groups for v in range(count) if v != w], 1)
            s = ((self.bank.scores(queries, w, self.indices, negatives) + 1) * 0.5).unflatten(1, (len(groups), count - 1))
            for g, (pos, neg) in enumerate(scored):
                pos.append(s[:, g, :, 0])
                neg.append(s[:, g, :, 1:].flatten(1))
        return [(torch.cat(pos, 1), torch.cat(neg, 1)) for pos, neg in scored]

    def contrast(self, sets: list[torch.Tensor], impl: str | None = None) -> torch.Tensor:
        """OUCL per image over its cross-view scores against a fresh draw of the bank (no update)."""
        negatives = self.bank.sample(sets[0].shape[0], sets[0].device)
        (scores,) = self.bank_scores([sets], negatives)
        return oucl_score_sets(*scores, **self.oucl)

    def contrast_originals(self, z: list[torch.Tensor], impl: str | None = None) -> torch.Tensor:
        """Then every view's rows of the (gathered) batch move towards these features."""
        loss = self.contrast(z)
        self.bank.update(self.indices, z)
        return loss

    def margin_regulariser(self, originals: list[torch.Tensor], generated: list[torch.Tensor]) -> torch.Tensor:
        """R per image: its originals' hardest positive and negative score over every pair, against the
        generated queries' scores (the same draw), the positive term scaled by `positive_weight`."""
        negatives = self.bank.sample(originals[0].shape[0], originals[0].device)
        (s_pos, s_neg), (g_pos, g_neg) = self.bank_scores([originals, generated], negatives)
        positive = torch.arange(g_pos.shape[1] + g_neg.shape[1], device=g_pos.device)[None] < g_pos.shape[1]
        return margin_penalty(s_pos.amin(1, keepdim=True), s_neg.amax(1, keepdim=True), torch.cat([g_pos, g_neg], 1),
                              positive, ~positive, self.positive_weight)
