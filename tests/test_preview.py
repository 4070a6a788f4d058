"""The view preview (launch/preview.py, pipeline/data/preview.py, `Method.preview`): a captioned column per
shown view (the default's views, CMC's L and ab, CPC's patch grid), small views enlarged by nearest
neighbour with their relative sizes kept, the patch tiling against a loop, the Lab inverse used to show ab
against scikit-image, and a wrong recipe key named."""

import importlib.util
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFont
from skimage.color import lab2rgb

from models.colour import lab_to_rgb, rgb_to_lab
from pipeline.config import load_config
from pipeline.data.preview import MIN_SIDE, PAD, layout, tile, view_grid

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "launch" / "configs"


def preview_main(argv):
    spec = importlib.util.spec_from_file_location("launch_preview", ROOT / "launch" / "preview.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def grey(pixels: np.ndarray) -> np.ndarray:
    return pixels.astype(np.float64).mean(-1)


def assert_captioned(pixels: np.ndarray, at) -> None:
    """Each column's caption band holds dark text pixels."""
    for col in range(len(at.widths)):
        band = grey(pixels[: at.caption_height, at.left(col) + PAD : at.left(col) + at.widths[col]])
        assert band.min() < 128, f"column {col} has no caption"


@pytest.mark.parametrize("recipe, overrides, captions", [
    ("default.yaml", [], ["view 1 (global 32px)", "view 2 (global 32px)"]),
    ("cmc_resnet50_imagenet.yaml", ["data.views.0.size=32"], ["view 1 (global 32px)", "L", "ab"]),
    ("metaug_cmc_resnet18_cifar.yaml", [], ["view 1 (global 32px)", "L", "ab"]),
    ("cpc_resnet18_cifar.yaml", [], ["view 1 (global 32px)", "patches 7x7"]),
])
def test_each_method_shows_its_views_in_captioned_enlarged_columns(small_shards, tmp_path, recipe, overrides, captions):
    out = tmp_path / "views.png"
    assert preview_main(["--config", str(CONFIGS / recipe), "--data", str(small_shards), "--out", str(out), "--images", "3", *overrides]) == 0
    # The layout depends only on the columns' captions and shapes: the hook on random views of the recipe's sizes.
    cfg = load_config(CONFIGS / recipe, overrides, world_size=1)
    views = [torch.rand(3, 3, r.size, r.size) for r in cfg.data.view_recipes()]
    columns = type(cfg.method).method_class.preview(cfg, views)
    assert [caption for caption, _ in columns] == captions
    at = layout(columns, ImageFont.load_default())
    assert at.scale == 3 and min(w - PAD for w in at.widths) >= MIN_SIDE  # 32-px views shown at 96 px
    with Image.open(out) as im:
        pixels = np.asarray(im.convert("RGB"))
    assert pixels.shape[:2] == (at.caption_height + 3 * at.row_height + PAD, sum(at.widths) + PAD)
    assert_captioned(pixels, at)


def test_views_are_enlarged_by_nearest_neighbour_keeping_their_relative_sizes():
    g = torch.Generator().manual_seed(0)
    columns = [("view 1 (global 24px)", torch.rand(2, 3, 24, 24, generator=g)), ("local", torch.rand(2, 1, 12, 12, generator=g))]
    grid = view_grid(columns, rows=2)
    at = layout(columns, ImageFont.load_default())
    assert at.scale == 8  # the 12-px column at 96 px, the 24-px one at 192
    pixels = np.asarray(grid)
    assert pixels.shape[:2] == (at.caption_height + 2 * at.row_height + PAD, sum(at.widths) + PAD)
    assert_captioned(pixels, at)
    for col, (_, images) in enumerate(columns):
        side = images.shape[-1] * at.scale
        for row in range(2):
            left = at.left(col) + PAD + (at.widths[col] - PAD - side) // 2
            top = at.caption_height + row * at.row_height + PAD + (at.row_height - PAD - side) // 2
            want = (images[row].clamp(0, 1) * 255).round().byte().expand(3, -1, -1).permute(1, 2, 0).numpy()
            want = want.repeat(at.scale, 0).repeat(at.scale, 1)
            np.testing.assert_array_equal(pixels[top : top + side, left : left + side], want)


def test_a_multicrop_recipe_shows_every_view(small_shards, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  views: {preset: multicrop, size: 24, local_size: 12, local_views: 2}\n")
    out = tmp_path / "views.png"
    assert preview_main(["--config", str(recipe), "--data", str(small_shards), "--out", str(out), "--images", "3"]) == 0
    captions = ["view 1 (global 24px)", "view 2 (global 24px)", "view 3 (local 12px)", "view 4 (local 12px)"]
    at = layout([(c, torch.zeros(1, 3, s, s)) for c, s in zip(captions, [24, 24, 12, 12])], ImageFont.load_default())
    with Image.open(out) as im:
        assert im.size == (sum(at.widths) + PAD, at.caption_height + 3 * at.row_height + PAD)


def test_a_wrong_key_is_named(small_shards, tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("data:\n  views: {preset: simclr, sise: 24}\n")
    with pytest.raises(SystemExit, match="data.views.ViewPreset.sise"):
        preview_main(["--config", str(recipe), "--data", str(small_shards)])


def test_the_patch_tiling_is_the_patches_a_loop_pastes():
    patches = torch.rand(2, 3, 4, 3, 5, 5, generator=torch.Generator().manual_seed(0))
    want = torch.ones(2, 3, 3 * 5 + 2, 4 * 5 + 3)
    for i in range(3):
        for j in range(4):
            want[:, :, i * 6 : i * 6 + 5, j * 6 : j * 6 + 5] = patches[:, i, j]
    torch.testing.assert_close(tile(patches), want, rtol=0, atol=0)


def test_lab_to_rgb_is_skimages_lab2rgb():
    g = torch.Generator().manual_seed(0)
    lab = torch.stack([100 * torch.rand(4, 8, 8, generator=g), 200 * torch.rand(4, 8, 8, generator=g) - 100,
                       220 * torch.rand(4, 8, 8, generator=g) - 110], dim=1).double()  # much of it out of gamut
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # skimage warns of the negative Z it clips
        want = torch.from_numpy(lab2rgb(lab.permute(0, 2, 3, 1).numpy())).permute(0, 3, 1, 2)
    torch.testing.assert_close(lab_to_rgb(lab), want, rtol=0, atol=1e-12)
    torch.testing.assert_close(lab_to_rgb(lab.float()).double(), want, rtol=0, atol=1e-5)
    rgb = torch.rand(2, 3, 8, 8, generator=g)
    torch.testing.assert_close(lab_to_rgb(rgb_to_lab(rgb)), rgb, rtol=0, atol=1e-5)  # the inverse of rgb_to_lab
