"""The overview's methods at the scale issue 11 asks for: CMC, MetAug on CMC, DIM, AMDIM and CPC each train
two steps through the DeepSpeed loop on two ranks under ZeRO-2 in bf16, and checkpoint. (Their losses and
gradients across ranks are tested against one process in each method's file and in test_four_ranks.py;
this is the engine path: partitioned gradients and optimizer state, autocast, the checkpoint of every
encoder.) One spawn runs all five, so the ranks pay their imports once."""

import math

import pytest

from conftest import logged
from distributed_utils import spawn
from test_amdim import AMDIM_TINY
from test_cmc import RAW_VIEWS
from test_cpc import CPC_RESNET

SMALL_VIT = ["model.backbone=test_vit", "model.projector={hidden_dim: 32, out_dim: 16, layers: 1}"]
RUNS = {
    "cmc": ["method.name=cmc", RAW_VIEWS, *SMALL_VIT, "optim.name=sgd", "optim.lr=0.03"],
    "metaug_cmc": ["method.name=metaug_cmc", "method.memory_bank={negatives: 16, momentum: 0.5}",
                   "method.metaug.generator_hidden=8", RAW_VIEWS, *SMALL_VIT, "optim.name=sgd", "optim.lr=0.03"],
    "dim": ["method.name=dim", "method.estimator=jsd", "method.prior_weight=0.1", "method.critic_units=32",
            "data.views=[{size: 16}]", *SMALL_VIT, "model.backbone_args={patch_size: 4}", "optim.name=adamw"],
    "amdim": ["method.name=amdim", *AMDIM_TINY, "optim.name=adamw"],
    "cpc": ["method.name=cpc", *CPC_RESNET, "optim.name=adamw"],
}


def _train_all(rank, world, shards, out):
    from pipeline.config import load_config
    from pipeline.train import train

    for name, overrides in RUNS.items():
        train(load_config(None, [
            *overrides, f"train.data={shards}", f"train.output={out}/{name}", "data.eval_size=16",
            "data.eval_resize=16", "data.batch_size=8", "data.num_threads=1", "engine.zero_stage=2",
            "engine.precision=bf16", "train.max_steps=2", "train.log_every=1", "train.knn_every=0",
        ]))


@pytest.mark.slow
def test_each_trains_on_two_ranks_under_zero2_in_bf16(small_shards, tmp_path):
    from pipeline.checkpoint import complete_checkpoints, read_meta

    spawn(_train_all, 2, str(small_shards), str(tmp_path))
    for name in RUNS:
        run = tmp_path / name
        ckpt = complete_checkpoints(run / "checkpoints")[-1]
        meta = read_meta(ckpt)
        assert meta["step"] == 2 and meta["world_size"] == 2, (name, meta)
        engine = meta["config"]["engine"]
        assert engine["zero_stage"] == 2 and engine["precision"] == "bf16", (name, engine)
        losses = logged(run, "loss/total")
        assert len(losses) == 2 and all(math.isfinite(v) for v in losses), (name, losses)
