"""CPC v2: the patch grid against a loop that cuts the patches, the per-patch augmentation, the causal
context checked by gradients, the loss against a float64 definition written from the paper's pseudo-code
(dense and chunked), world size 2 against one process, and training through the loop on the embedded
digits with the export loading in timm."""

import math

import pytest
import torch

from conftest import logged
from distributed_utils import average_over_ranks, spawn
from models.causal_context import CausalContext
from models.patch_grid import PatchFeatures, augment_patches, cut_patches, grid_side
from pipeline.losses import chunked
from pipeline.losses.cpc import cpc_loss

# timm, the configuration and the methods are imported in the tests that use them: the spawned ranks
# import this module, and need only the loss.


def test_the_grid_is_the_patches_a_loop_cuts():
    images = torch.randn(2, 3, 12, 14)
    got = cut_patches(images, 6, 2)
    assert got.shape == (2, 4, 5, 3, 6, 6)
    for b in range(2):
        for i in range(4):
            for j in range(5):
                torch.testing.assert_close(got[b, i, j], images[b, :, 2 * i : 2 * i + 6, 2 * j : 2 * j + 6], rtol=0, atol=0)
    assert grid_side(32, 8, 4) == 7 and grid_side(256, 64, 32) == 7
    with pytest.raises(ValueError, match="do not tile 30 px"):
        cut_patches(torch.randn(1, 3, 30, 32), 8, 4)


def test_each_patch_keeps_one_channel_and_is_flipped_or_not():
    patches = torch.rand(4000, 3, 4, 4) + 0.1  # no zeros of their own
    out = augment_patches(patches, torch.Generator().manual_seed(0), colour_drop=1.0, flip=0.5)
    kept = (out != 0).flatten(2).all(2)  # [N, C]: a channel is kept whole or zeroed whole
    assert ((out != 0).flatten(2).any(2) == kept).all() and (kept.sum(1) == 1).all()
    mirrored = torch.stack([(o == p.flip(-1) * k[:, None, None]).all() for o, p, k in zip(out, patches, kept)])
    plain = torch.stack([(o == p * k[:, None, None]).all() for o, p, k in zip(out, patches, kept)])
    assert (mirrored | plain).all()
    assert abs(mirrored.float().mean() - 0.5) < 0.03 and (kept.float().mean(0) - 1 / 3).abs().max() < 0.03
    again = augment_patches(patches, torch.Generator().manual_seed(0), colour_drop=1.0, flip=0.5)
    torch.testing.assert_close(again, out, rtol=0, atol=0)  # the generator's draws alone decide
    untouched = augment_patches(patches, torch.Generator().manual_seed(0), colour_drop=0.0, flip=0.0)
    torch.testing.assert_close(untouched, patches, rtol=0, atol=0)


def test_the_context_at_a_row_depends_on_no_row_below():
    torch.manual_seed(0)
    net = CausalContext(4, hidden=8, blocks=3).double()
    latents = torch.randn(2, 4, 6, 5, dtype=torch.float64, requires_grad=True)
    context = net(latents)
    for row in range(6):
        (grad,) = torch.autograd.grad(context[:, :, row].sum(), latents, retain_graph=True)
        reach = grad.abs().sum((0, 1, 3))  # by input row
        assert (reach[row + 1 :] == 0).all() and (reach[max(0, row - 3) : row + 1] > 0).all(), (row, reach)


def test_no_prediction_depends_on_a_patch_at_or_below_its_target_row():
    """Through the method's patch encoder (per-sample norm) and context: the prediction of row i + k from
    context row i gets no gradient from any patch of rows >= i + 1, nor from another image."""
    from conftest import tiny_config
    from pipeline.methods import build_method

    torch.manual_seed(0)
    method = build_method(tiny_config("cpc", *CPC_RESNET)).double().train()
    b, h, w = 2, 3, 3
    patches = torch.randn(b * h * w, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    _, context = method.latents_and_context(patches, (b, h, w))
    predictions = method.predict(context)
    for row in range(h):
        (grad,) = torch.autograd.grad(predictions[0, row].sum(), patches, retain_graph=True)
        reach = grad.abs().flatten(1).sum(1).view(b, h, w)
        assert (reach[0, row + 1 :] == 0).all() and (reach[1] == 0).all() and (reach[0, row] > 0).all(), (row, reach)


# --- the loss -----------------------------------------------------------------------------------------------


def reference(predictions, targets, offsets, scale=0.1):
    """The pseudo-code's loss in float64, query by query: for offset k, the prediction at (b, i, j) against
    every target of the batch, labelled with the target at (b, i + k, j); mean over queries, sum over k."""
    images, rows, cols, _ = targets.shape
    keys = targets.double().reshape(-1, targets.shape[-1])
    total = 0.0
    for prediction, k in zip(predictions.double(), offsets):
        losses = []
        for b in range(images):
            for i in range(rows - k):
                for j in range(cols):
                    logits = scale * keys @ prediction[b, i, j]
                    label = (b * rows + i + k) * cols + j
                    losses.append(-torch.log_softmax(logits, 0)[label])
        total = total + torch.stack(losses).mean()
    return total


def grid_features(images=3, rows=4, cols=3, dim=5, offsets=(1, 3), seed=0, std=3.0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    predictions = (std * torch.randn(len(offsets), images, rows, cols, dim, generator=gen, dtype=torch.float64)).to(dtype)
    targets = (std * torch.randn(images, rows, cols, dim, generator=gen, dtype=torch.float64)).to(dtype)
    return predictions.requires_grad_(), targets.requires_grad_()


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_the_loss_is_its_definition_in_value_and_gradient(impl, monkeypatch):
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 7 * 10)  # a few keys per chunk: an image's targets span chunks
    offsets = (1, 3)
    predictions, targets = grid_features(offsets=offsets)
    got = cpc_loss(predictions, targets, offsets, impl=impl)
    want = reference(predictions, targets, offsets)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    for a, b in zip(torch.autograd.grad(got, (predictions, targets)), torch.autograd.grad(want, (predictions, targets))):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_each_offset_counts_once_with_its_own_predictions():
    """lightning-bolts' traps: offsets summed once each, offset k's loss reads only its own prediction set."""
    predictions, targets = grid_features(offsets=(1, 2))
    both = cpc_loss(predictions, targets, (1, 2), impl="chunked")
    alone = [cpc_loss(predictions[i : i + 1], targets, (k,), impl="chunked") for i, k in enumerate((1, 2))]
    torch.testing.assert_close(both, alone[0] + alone[1])
    (grad,) = torch.autograd.grad(alone[1], predictions)
    assert (grad[0] == 0).all() and (grad[1, :, : 4 - 2] != 0).any() and (grad[1, :, 4 - 2 :] == 0).all()


def test_the_fused_loss_stays_finite_and_exact_at_large_scores():
    predictions, targets = grid_features(std=12.0)  # scores in the hundreds
    got = cpc_loss(predictions.float(), targets.float(), (1, 3), impl="chunked")
    assert torch.isfinite(got)
    torch.testing.assert_close(got.double(), reference(predictions, targets, (1, 3)), rtol=1e-5, atol=1e-3)


def test_bad_input_is_refused():
    predictions, targets = grid_features()
    with pytest.raises(ValueError, match="offsets must give one row offset in 1..3"):
        cpc_loss(predictions, targets, (1, 4))
    with pytest.raises(ValueError, match="offsets must give one row offset"):
        cpc_loss(predictions, targets, (1,))
    with pytest.raises(ValueError, match=r"predictions must be \[K, B, H, W, D\]"):
        cpc_loss(predictions[:, :2], targets, (1, 3))


# --- world sizes 2 and 4 (4: tests/test_four_ranks.py) ---------------------------------------------------

IMAGES, ROWS, COLS, DIM_IN = 4, 4, 3, 5  # IMAGES: the global batch, split evenly over 2 or 4 ranks
OFFSETS = (1, 2)


def _loss_and_grads(rank, world):
    torch.manual_seed(0)
    target_head, predict_head = torch.nn.Linear(DIM_IN, 6).double(), torch.nn.Linear(DIM_IN, 6 * len(OFFSETS)).double()
    latents = torch.randn(IMAGES, ROWS, COLS, DIM_IN, dtype=torch.float64)
    images = IMAGES // world
    own = latents[rank * images : (rank + 1) * images]
    predictions = predict_head(own.cumsum(1)).unflatten(-1, (len(OFFSETS), 6)).movedim(-2, 0)  # a causal "context"
    loss = cpc_loss(predictions, target_head(own), OFFSETS, impl="chunked")
    loss.backward()
    grads = [p.grad for p in (*target_head.parameters(), *predict_head.parameters())]
    loss = loss.detach().clone()
    average_over_ranks([*grads, loss])
    return loss, grads


def _compare_on_ranks(rank, world, expected):
    loss, grads = _loss_and_grads(rank, world)
    torch.testing.assert_close(loss, expected[0], rtol=1e-10, atol=1e-12)
    for got, want in zip(grads, expected[1]):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"gradients on rank {rank}")


def test_two_ranks_equal_one_process_on_the_concatenated_batch():
    spawn(_compare_on_ranks, 2, _loss_and_grads(0, 1), timeout=60)


# --- the method ---------------------------------------------------------------------------------------------

CPC_RESNET = ["data.views=[{size: 16}]", "data.eval_size=16", "data.eval_resize=16", "model.backbone=test_resnet",
              "model.backbone_args={norm_layer: groupnorm1}", "method.offsets=[1, 2]", "method.context_hidden=16",
              "method.context_blocks=2", "method.target_dim=8"]


def test_the_method_refuses_what_it_cannot_run():
    from conftest import tiny_config
    from pipeline.config import ConfigError, load_config
    from pipeline.methods import build_method

    with pytest.raises(ValueError, match="BatchNorm"):
        build_method(tiny_config("cpc", *CPC_RESNET, "model.backbone_args={}"))
    with pytest.raises(ConfigError, match="do not tile 16 px"):
        load_config(None, ["method.name=cpc", *CPC_RESNET, "method.patch_stride=3"]).check(1)
    with pytest.raises(ConfigError, match="an offset is 2 at most"):
        load_config(None, ["method.name=cpc", *CPC_RESNET, "method.offsets=[1, 3]"]).check(1)
    with pytest.raises(ConfigError, match="increasing positive rows"):
        load_config(None, ["method.name=cpc", *CPC_RESNET, "method.offsets=[2, 1]"])


def test_the_untrained_loss_is_the_log_of_the_keys_and_features_pool_the_grid():
    from conftest import tiny_config
    from pipeline.methods import build_method

    torch.manual_seed(0)
    method = build_method(tiny_config("cpc", *CPC_RESNET))
    with torch.no_grad():
        method.predict.weight.zero_()  # every score zero: each offset's loss is log(B·H·W)
        method.predict.bias.zero_()
    x = torch.randn(4, 3, 16, 16)
    loss, parts = method([x])
    torch.testing.assert_close(loss, torch.tensor(2 * math.log(4 * 9)))
    method.eval()
    patches = cut_patches(x, 8, 4).flatten(0, 2)
    torch.testing.assert_close(method.features()(x), method.backbone(patches).view(4, 9, -1).mean(1))


def test_augmentation_draws_follow_the_step_so_a_resumed_run_repeats_them():
    from conftest import tiny_config
    from pipeline.methods import build_method

    method = build_method(tiny_config("cpc", *CPC_RESNET))
    draws = {}
    for step in (3, 4, 3):
        method.before_step(step)
        first, second = (torch.rand(4, generator=method.augmentation_generator(torch.device("cpu"))) for _ in range(2))
        assert not torch.equal(first, second)  # a micro-batch of its own
        draws.setdefault(step, []).append(first)
    assert torch.equal(*draws[3]) and not torch.equal(draws[3][0], draws[4][0])


def _train_cpc(rank, world, digits, out, steps):
    from pipeline.config import load_config
    from pipeline.train import train

    train(load_config(None, TRAIN + [f"train.data={digits}/train", f"train.val_data={digits}/val", f"train.output={out}",
                                     f"train.max_steps={steps}"]))


# Random crops of the digits: without them the grid's first steps learn where a patch sits in the centred digit
# (the context knows its row from the padding), which mean pooling cancels, and kNN dips before it rises.
TRAIN = ["method.name=cpc", *CPC_RESNET, "method.context_hidden=64", "method.target_dim=32", "method.colour_drop=0.0",
         "method.flip=0.0", "data.batch_size=16", "data.num_threads=1", "engine.precision=fp32", "train.log_every=10",
         "train.knn_every=0", "train.knn_k=20", "optim.name=adamw", "optim.lr=1e-3", "optim.scale_lr=false",
         "optim.warmup_epochs=0", "optim.weight_decay=0.0",
         "data.views=[{size: 16, scale: [0.3, 1.0], flip: 0.0, color_jitter: null, grayscale: 0.0}]"]
STEPS = 200


@pytest.mark.slow
def test_training_on_the_digits_lifts_knn_and_the_export_gives_the_same_features(digits, tmp_path):
    import timm
    from safetensors.torch import load_file

    from pipeline.checkpoint import complete_checkpoints, encoder_file, read_meta
    from pipeline.config import load_config
    from pipeline.methods import build_method

    run = tmp_path / "run"
    spawn(_train_cpc, 1, str(digits), str(run), STEPS)
    before, after = logged(run, "eval/knn_top1")  # the loop's kNN monitor before the first step and after the last
    assert after > before + 0.02, (before, after)  # measured: 0.805 -> 0.838

    ckpt = complete_checkpoints(run / "checkpoints")[-1]
    assert read_meta(ckpt)["step"] == STEPS
    exported = timm.create_model(f"local-dir:{run / 'backbone'}", pretrained=True).eval()
    norms = {type(m).__name__ for m in exported.modules() if "Norm" in type(m).__name__}
    assert norms == {"GroupNorm1"}  # the per-sample norm survives the export
    method = build_method(load_config(None, TRAIN)).eval()
    method.backbone.load_state_dict(load_file(str(ckpt / encoder_file("backbone"))))
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(PatchFeatures(exported, 8, 4)(x), method.features()(x))
    # Evaluation of the export (launch/evaluate.py, linear.py) rebuilds the grid features from features.json.
    from pipeline.frozen import load_backbone

    with torch.no_grad():
        torch.testing.assert_close(load_backbone(f"local-dir:{run / 'backbone'}").eval()(x), method.features()(x))
