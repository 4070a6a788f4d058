"""FeatMatch's released views in DALI (GT-RIPL/FeatMatch train/ssltrainer.py init_transform,
util/random_augment.py) on the CPU: the weak view's whole-pixel shift padded black, the RandomAugment suite
against the official table, a magnitude drawn per operation, and the views the released form asks for."""

import numpy as np
import pytest
from nvidia.dali.auto_aug import augmentations as auto_ops

from pipeline.data import augment
from test_colour_jitter import run_dali

# util/random_augment.py: operation -> (magnitude range at M 9, random sign); enhance factors 0.1-1.9 are
# DALI's 1 ± (0-0.9), posterize's 4-8 bits kept are DALI's mask from 8 to 4 bits, solarize's threshold 0-256.
OFFICIAL = {
    "shear_x": ((0, 0.3), True), "shear_y": ((0, 0.3), True),
    "translate_x": ((0, 150 / 331), True), "translate_y": ((0, 150 / 331), True),
    "rotate": ((0, 30), True), "_mirror": (None, False), "identity": (None, False),
    "auto_contrast": (None, False), "equalize": (None, False), "solarize": ((256, 0), False),
    "posterize": ((8, 4), False), "contrast": ((0, 0.9), True), "color": ((0, 0.9), True),
    "brightness": ((0, 0.9), True), "sharpness": ((0, 0.9), True), "invert": (None, False),
}


def test_suite_is_the_official_operations_at_their_ranges():
    suite = {op.name: (op.mag_range and tuple(op.mag_range), op.randomly_negate) for op in augment.FEATMATCH_SUITE}
    assert suite.keys() == OFFICIAL.keys() and len(augment.FEATMATCH_SUITE) == 16
    for name, (mag_range, signed) in OFFICIAL.items():
        got_range, got_signed = suite[name]
        assert got_signed == signed, name
        assert (got_range is None) == (mag_range is None) and (mag_range is None or got_range == pytest.approx(mag_range)), name


def test_translation_is_a_whole_pixel_shift_padded_black():
    """RandomCrop(16, padding=2): each output is the image shifted by (dy, dx) in -2..2, zeros shifted in."""
    rng = np.random.default_rng(0)
    image = rng.integers(1, 256, (16, 16, 3), dtype=np.uint8)  # no zero pixel: padding is told apart
    (out,) = run_dali(lambda x: augment._translate(x, 2), [image] * 64)
    shifts = set()
    for o in out:
        found = []
        for dy in range(-2, 3):
            for dx in range(-2, 3):
                padded = np.zeros((20, 20, 3), np.uint8)
                padded[2:18, 2:18] = image
                if np.array_equal(padded[2 - dy:18 - dy, 2 - dx:18 - dx], o):
                    found.append((dy, dx))
        assert len(found) == 1, found
        shifts.add(found[0])
    assert len(shifts) >= 15  # of 25, over 64 draws


def test_each_operation_draws_its_own_magnitude(monkeypatch):
    """The official draws a magnitude per operation over the whole range; DALI's rand_augment holds one bin.
    With brightness alone on a flat grey image, the factor (output / input) shows the draw."""
    monkeypatch.setattr(augment, "FEATMATCH_SUITE", [auto_ops.brightness])
    grey = np.full((8, 8, 3), 100, np.uint8)
    (out,) = run_dali(lambda x: augment.featmatch_rand_augment(x, 1, 30, 31, 8), [grey] * 64)
    factors = np.array([o.mean() / 100 for o in out])
    assert factors.min() < 0.3 and factors.max() > 1.7 and len(np.unique(np.round(factors, 2))) >= 20, factors
    from nvidia.dali.auto_aug import rand_augment

    (fixed,) = run_dali(lambda x: rand_augment.apply_rand_augment([auto_ops.brightness], x, n=1, m=15, num_magnitude_bins=31), [grey] * 64)
    assert len(np.unique([o.mean() for o in fixed])) <= 2  # 1 ± 0.45: one magnitude, two signs


def test_two_operations_run_on_every_view_at_the_view_size():
    rng = np.random.default_rng(1)
    batch = [rng.integers(0, 256, (12, 12, 3), dtype=np.uint8) for _ in range(32)]
    (out,) = run_dali(lambda x: augment.featmatch_rand_augment(x, 2, 30, 31, 12), batch)
    assert all(o.shape == (12, 12, 3) and o.dtype == np.uint8 for o in out)
    assert sum(not np.array_equal(o, b) for o, b in zip(out, batch)) >= 24  # identity twice is 1 draw in 256


def test_released_form_asks_for_the_official_views():
    """ssltrainer.init_transform: Tsimp = flip + RandomCrop(shape, padding=shape // 16); K x RandomAugment(N 2,
    M 9), no crop, no flip; both on the whole image."""
    from pipeline.finetune import view_recipes

    weak, *strong = view_recipes(32, (0.5,) * 3, (0.25,) * 3, strong_views=8, strong="randaugment")
    assert len(strong) == 8
    assert (weak.scale, weak.flip, weak.translate, weak.rand_augment, weak.color_jitter) == ((1.0, 1.0), 0.5, 2, None, None)
    for view in strong:
        assert (view.scale, view.flip, view.translate, view.color_jitter, view.grayscale) == ((1.0, 1.0), 0.0, 0, None, 0.0)
        ra = view.rand_augment
        assert (ra.form, ra.n, ra.m, ra.bins) == ("featmatch", 2, 30, 31)
