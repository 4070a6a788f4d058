import pytest
import torch
import torch.nn.functional as F

from pipeline.data.mixing import METHODS, global_partner, mix, partner

B, C, H, W = 6, 3, 13, 17  # odd, unequal sides: rounding and clipping show up

DEVICES = [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]),
]


def gen(device, seed):
    return torch.Generator(device=device).manual_seed(seed)


def noise(batch=B, device="cpu", dtype=torch.float32, seed=0):
    return torch.randn(batch, C, H, W, generator=torch.Generator().manual_seed(seed)).to(device, dtype)


def constants(batch=B, device="cpu"):
    """Image i filled with i + 1: any pixel tells which image it came from."""
    return (torch.arange(batch, dtype=torch.float32, device=device) + 1).view(-1, 1, 1, 1).expand(batch, C, H, W).clone()


def pasted(method, batch, device, seed):
    """[batch, H, W] bool: where `method` pastes the partner for this seed (draws do not depend on content)."""
    x = constants(batch, device)
    mixed, lam = mix(x, method, generator=gen(device, seed))
    mask = (mixed - x).abs() > 0.25
    assert (mask == mask[:, :1]).all()  # same box in every channel
    return mask[:, 0], lam


def bounds(mask):
    """(top, left, height, width) of a rectangular mask, checking that it is one."""
    rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
    if len(rows) == 0:
        return 0, 0, 0, 0
    t, l, h, w = rows[0].item(), cols[0].item(), len(rows), len(cols)
    assert rows[-1] - t + 1 == h and cols[-1] - l + 1 == w and mask[t : t + h, l : l + w].all() and mask.sum() == h * w
    return t, l, h, w


def test_partners():
    assert partner(5).tolist() == [4, 3, 2, 1, 0]
    assert partner(4)[partner(4)].tolist() == [0, 1, 2, 3]
    assert global_partner(4, rank=0).tolist() == [3, 2, 1, 0]
    assert global_partner(4, rank=2).tolist() == [11, 10, 9, 8]  # rank*B + B-1-i


@pytest.mark.parametrize("device", DEVICES)
def test_mixup_is_the_convex_combination_with_the_partner(device):
    x = noise(device=device)
    mixed, lam = mix(x, "mixup", generator=gen(device, 0))
    assert lam.shape == (B,) and lam.dtype == torch.float32 and ((lam >= 0) & (lam <= 1)).all()
    assert lam.unique().numel() == B  # one lambda per image
    for i in range(B):
        torch.testing.assert_close(mixed[i], lam[i] * x[i] + (1 - lam[i]) * x[B - 1 - i])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["cutmix", "resizemix"])
def test_box_area_is_one_minus_lambda_and_lambda_is_the_pixel_fraction(method, device):
    for seed in range(20):
        mask, lam = pasted(method, B, device, seed)
        lam0 = mix(constants(B, device), "mixup", generator=gen(device, seed))[1]  # the drawn lambda
        count = mask.sum((1, 2))
        assert torch.equal(lam, (H * W - count).float() / (H * W))  # exactly the unpasted fraction
        for i in range(B):
            _, _, h, w = bounds(mask[i])
            side = (1 - lam0[i]).sqrt()
            full = (round(side.item() * H), round(side.item() * W))  # box of area 1 - lam0 in whole pixels
            if method == "resizemix":
                assert (h, w) == full  # placed inside the image, never clipped
            else:
                assert h <= full[0] and w <= full[1]  # clipped at the border
                assert h >= (full[0] + 1) // 2 and w >= (full[1] + 1) // 2  # the centre lies in the image


@pytest.mark.parametrize("device", DEVICES)
def test_cutmix_pastes_the_partners_own_pixels(device):
    x = noise(device=device)
    for seed in range(10):
        mask, _ = pasted("cutmix", B, device, seed)
        mixed, _ = mix(x, "cutmix", generator=gen(device, seed))
        expected = torch.where(mask[:, None], x.flip(0), x)
        assert torch.equal(mixed, expected)


@pytest.mark.parametrize("device", DEVICES)
def test_resizemix_pastes_the_whole_partner_resized(device):
    x = noise(device=device)
    sizes = set()
    for seed in range(10):
        mask, _ = pasted("resizemix", B, device, seed)
        mixed, _ = mix(x, "resizemix", generator=gen(device, seed))
        for i in range(B):
            t, l, h, w = bounds(mask[i])
            sizes.add((h, w))
            expected = x[i].clone()
            if h and w:
                expected[:, t : t + h, l : l + w] = F.interpolate(x[B - 1 - i][None], size=(h, w), mode="bilinear", align_corners=False)[0]
            torch.testing.assert_close(mixed[i], expected, atol=1e-5, rtol=1e-5)
    assert len(sizes) > 10  # many box sizes were exercised


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS + ("random",))
def test_odd_batch_middle_image_is_its_own_partner_and_stays_clean(method, device):
    x = noise(5, device=device)
    for seed in range(5):
        mixed, lam = mix(x, method, generator=gen(device, seed))
        assert torch.equal(mixed[2], x[2]) and lam[2] == 1
        assert (lam[[0, 1, 3, 4]] < 1).all()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", METHODS + ("random",))
def test_input_is_not_modified_and_seeded_calls_reproduce(method, device):
    x = noise(device=device)
    before = x.clone()
    first = mix(x, method, generator=gen(device, 7))
    assert torch.equal(x, before)
    again = mix(x, method, generator=gen(device, 7))
    other = mix(x, method, generator=gen(device, 8))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("method", METHODS)
def test_half_precision_inputs(method, dtype, device):
    x = noise(device=device, dtype=dtype)
    before = x.clone()
    mixed, lam = mix(x, method, generator=gen(device, 3))
    ref, ref_lam = mix(x.float(), method, generator=gen(device, 3))
    assert mixed.dtype == dtype and lam.dtype == torch.float32 and torch.equal(x, before)
    assert torch.equal(lam, ref_lam)
    torch.testing.assert_close(mixed, ref.to(dtype), atol=0, rtol=0)  # computed in fp32, rounded once


@pytest.mark.parametrize("device", DEVICES)
def test_random_picks_each_method_per_batch(device):
    x = noise(device=device)
    used = []
    for seed in range(45):
        mixed, lam = mix(x, "random", generator=gen(device, seed))
        same = [m for m in METHODS if all(map(torch.equal, (mixed, lam), mix(x, m, generator=gen(device, seed))))]
        assert len(same) == 1  # exactly what one fixed method gives for the same draws
        used += same
    assert all(used.count(m) >= 8 for m in METHODS), {m: used.count(m) for m in METHODS}


@pytest.mark.parametrize("device", DEVICES)
def test_a_given_lambda_replaces_the_draw(device):
    """SDMP mixes both views of image i with the same lam_i; each call returns the lam it realised."""
    x1, x2, g = noise(device=device, seed=1), noise(device=device, seed=2), gen(device, 4)
    _, lam1 = mix(x1, "mixup", generator=g)
    m2, lam2 = mix(x2, "mixup", generator=g, lam=lam1)
    assert torch.equal(lam2, lam1)
    torch.testing.assert_close(m2, lam1.view(-1, 1, 1, 1) * x2 + (1 - lam1.view(-1, 1, 1, 1)) * x2.flip(0))
    _, lam1 = mix(x1, "resizemix", generator=g)
    _, lam2 = mix(x2, "resizemix", generator=g, lam=lam1)
    assert (lam2 - lam1).abs().max() <= 2 / min(H, W)  # the box is re-derived: equal up to rounding its sides
    for method in METHODS + ("random",):
        assert torch.equal(mix(x2, method, generator=g, lam=torch.ones(B, device=device))[0], x2)
    whole, lam0 = mix(x2, "resizemix", generator=g, lam=torch.zeros(B, device=device))
    torch.testing.assert_close(whole, x2.flip(0))  # the whole partner, resized to the full image
    assert (lam0 == 0).all()
    with pytest.raises(ValueError, match="shape"):
        mix(x2, "mixup", lam=lam1[:-1])


@pytest.mark.parametrize("device", DEVICES)
def test_a_band_rescales_the_drawn_lambda_before_the_box(device):
    """SDMP's released band: lam' = 0.1 + 0.8 lam, and the box is cut for lam'."""
    for seed in range(5):
        lam0 = mix(constants(B, device), "mixup", generator=gen(device, seed))[1]
        banded = 0.1 + 0.8 * lam0
        torch.testing.assert_close(mix(noise(device=device), "mixup", generator=gen(device, seed), band=(0.1, 0.9))[1], banded)
        x = constants(B, device)
        mixed, _ = mix(x, "resizemix", generator=gen(device, seed), band=(0.1, 0.9))
        for i in range(B):
            _, _, h, w = bounds((mixed - x).abs()[i, 0] > 0.25)
            side = (1 - banded[i]).sqrt().item()
            assert (h, w) == (round(side * H), round(side * W))
    given = torch.full((B,), 0.5, device=device)
    assert torch.equal(mix(noise(device=device), "mixup", lam=given, band=(0.1, 0.9))[1], given)  # a given lam stays


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="method"):
        mix(noise(), "mosaic")
    with pytest.raises(ValueError, match="floating-point"):
        mix(torch.zeros(B, C, H, W, dtype=torch.uint8))
    with pytest.raises(ValueError, match="alpha"):
        mix(noise(), alpha=0)
    for band in [(0.9, 0.1), (-0.1, 0.5), (0.5, 1.5)]:
        with pytest.raises(ValueError, match="band"):
            mix(noise(), band=band)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("method", METHODS + ("random",))
def test_gpu_mixing_never_waits_for_the_host(method):
    x = noise(64, device="cuda", dtype=torch.bfloat16)
    g = gen("cuda", 0)
    mix(x, method, generator=g)  # warm-up (lazy initialisation may synchronise once)
    torch.cuda.set_sync_debug_mode("error")
    try:
        mixed, lam = mix(x, method, generator=g)
        mix(x, method)  # default generator of the device
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert mixed.is_cuda and lam.is_cuda
    with pytest.raises(ValueError, match="device"):
        mix(x, method, generator=torch.Generator())
