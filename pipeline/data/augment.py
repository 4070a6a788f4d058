"""The DALI graphs: read shards, decode once, then one augmentation chain per view (train) or a resize and
centre crop (evaluation). One definition serves both devices: with a GPU the decode is "mixed" and the
image ops run on the GPU; without one (`device_id=None`) every op runs on the CPU.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali import math as dmath
from nvidia.dali.auto_aug import augmentations as auto_ops
from nvidia.dali.auto_aug import rand_augment
from nvidia.dali.auto_aug.core import augmentation, select, signed_bin

from data_shards.shards import MAX_DECIMAL_DIGITS
from pipeline.config import ColorJitter, ViewRecipe

DIGITS = MAX_DECIMAL_DIGITS  # width of the zero-padded decimal text fields (.cls, .id); the index check keeps them shorter
_INTERPOLATION = {"linear": types.INTERP_LINEAR, "cubic": types.INTERP_CUBIC}
_SOLARIZE = [k if k < 128 else 255 - k for k in range(256)]


@augmentation
def _mirror(data, _):
    return fn.flip(data, horizontal=1)


# GT-RIPL/FeatMatch util/random_augment.py's operations at its ranges, in DALI's auto_aug: shear 0.3,
# translate 150/331 of the size, rotate 30 degrees (all of random sign), the four enhance factors over
# 0.1-1.9, posterize to 8-4 bits, solarize at thresholds 256-0, and the operations without a magnitude.
FEATMATCH_SUITE = [
    auto_ops.shear_x, auto_ops.shear_y,
    auto_ops.translate_x.augmentation(mag_range=(0, 150 / 331)), auto_ops.translate_y.augmentation(mag_range=(0, 150 / 331)),
    auto_ops.rotate, _mirror, auto_ops.identity, auto_ops.auto_contrast, auto_ops.equalize, auto_ops.solarize,
    auto_ops.posterize.augmentation(mag_range=(8, 4)), auto_ops.contrast, auto_ops.color, auto_ops.brightness,
    auto_ops.sharpness, auto_ops.invert,
]


def featmatch_rand_augment(image, n: int, m: int, bins: int, size: int):
    """`n` operations drawn from FEATMATCH_SUITE with replacement, each at a magnitude bin drawn uniformly
    from 0..m (with a random sign where the operation takes one), padding black as PIL's transform."""
    for _ in range(n):
        magnitude = signed_bin(fn.random.uniform(values=list(range(m + 1)), dtype=types.INT32))
        op = fn.random.uniform(values=list(range(len(FEATMATCH_SUITE))), dtype=types.INT32)
        image = select(FEATMATCH_SUITE, op, data=image, magnitude_bin=magnitude, num_magnitude_bins=bins,
                       shape=[size, size], fill_value=0)
    return image


def _translate(image, pixels: int):
    """A shift by a whole number of pixels, uniform over -pixels..pixels per axis, padding black: a
    pad-then-random-crop, as torchvision's RandomCrop(size, padding=pixels)."""
    shifts = fn.random.uniform(values=[float(t) for t in range(-pixels, pixels + 1)], shape=[2])
    return fn.warp_affine(image, matrix=fn.transforms.translation(offset=shifts), fill_value=0, interp_type=types.INTERP_NN)


@dataclass(frozen=True)
class ReaderSpec:
    paths: list[str]
    index_paths: list[str]
    rank: int
    world_size: int
    shuffle: bool
    shuffle_buffer: int


def _read(spec: ReaderSpec):
    """Rank `rank` reads DALI shard (rank + epoch) % world_size; every shard is padded (repeating its last
    sample) to the same whole number of batches, so ranks stay in step and epochs never mix."""
    image, label, index = fn.readers.webdataset(
        name="reader",
        paths=spec.paths,
        index_paths=spec.index_paths,
        ext=["jpg;png", "cls", "id"],
        missing_component_behavior="empty",
        shard_id=spec.rank,
        num_shards=spec.world_size,
        random_shuffle=spec.shuffle,
        initial_fill=spec.shuffle_buffer,
        pad_last_batch=True,
        stick_to_shard=False,
    )
    return image, _fixed_width(label), _fixed_width(index)


def _fixed_width(text):
    """Zero-pad decimal text to DIGITS bytes so a batch is one dense tensor (parsed and checked in torch),
    with each text's own length beside it (a NUL inside the text is then told from the padding)."""
    return fn.cat(fn.cast(text.shape(), dtype=types.UINT8), fn.pad(text, axes=[0], shape=[DIGITS], fill_value=0), axis=0)


def _decode(encoded, gpu: bool, hw_decoder_load: float):
    if gpu:
        return fn.decoders.image(encoded, device="mixed", output_type=types.RGB, hw_decoder_load=hw_decoder_load)
    return fn.decoders.image(encoded, device="cpu", output_type=types.RGB)


def _sometimes(probability: float, op, image):
    """`op(image)` for a random `probability` share of the batch (DALI conditionals split the batch)."""
    if probability <= 0:
        return image
    if probability >= 1:
        return op(image)
    if fn.random.coin_flip(probability=probability, dtype=types.BOOL):
        image = op(image)
    return image


def _uniform(low: float, high: float):
    """A per-sample uniform draw; a constant when the range is empty (DALI wants low < high)."""
    return fn.random.uniform(range=[low, high]) if high > low else low


# torchvision's grayscale weights (rgb_to_grayscale), for RandomGrayscale and for contrast's and saturation's grey
GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
# The 24 orders of the jitter operations, numbered as torchvision's ColorJitter does: 0 brightness, 1 contrast,
# 2 saturation, 3 hue
JITTER_ORDERS = list(itertools.permutations(range(4)))
_TO_GRAY = list(GRAY_WEIGHTS) * 3  # a 3x3 matrix, row-major: every output channel the grey


def _color(image, recipe: ViewRecipe):
    """Colour jitter (with its probability), then grayscale, as torchvision's RandomApply(ColorJitter) and
    RandomGrayscale do."""
    jitter = recipe.color_jitter
    if jitter is not None and jitter.probability > 0:
        jitter_op = _torchvision_jitter if jitter.form == "torchvision" else _color_twist_jitter
        image = _sometimes(jitter.probability, lambda x: jitter_op(x, jitter), image)
    return _sometimes(recipe.grayscale, lambda x: fn.coord_transform(x, M=_TO_GRAY, dtype=types.UINT8), image)


def _factors(jitter: ColorJitter):
    """Per-sample draws as torchvision's ColorJitter makes them: brightness, contrast and saturation factors
    in [max(0, 1 - a), 1 + a], hue in [-h, h] (fraction of the colour circle)."""
    amounts = (jitter.brightness, jitter.contrast, jitter.saturation)
    return [_uniform(max(0.0, 1.0 - a), 1.0 + a) for a in amounts] + [_uniform(-jitter.hue, jitter.hue)]


def _torchvision_jitter(image, jitter: ColorJitter):
    return jitter_in_order(image, _factors(jitter), jitter_order())


def jitter_order():
    """A per-sample index into JITTER_ORDERS, uniform: torchvision's randperm(4)."""
    return fn.random.choice(len(JITTER_ORDERS))


def jitter_in_order(image, factors, order):
    """torchvision's four jitter operations on uint8 HWC `image` with per-sample `factors` (brightness,
    contrast, saturation, hue), in the per-sample order JITTER_ORDERS[order].

    The graph is static, but a DALI conditional splits the batch per sample: at each of the four positions
    every sample runs only the operation its permutation puts there, so the cost is the four operations once
    each, as in a fixed order (all 24 orders, or all four operations at every position, would cost 4-24x).
    Each operation rounds to uint8, as torchvision's on uint8 images (and PIL's) do."""
    brightness, contrast, saturation, hue = factors
    for position in range(4):
        op = fn.lookup_table(order, keys=list(range(len(JITTER_ORDERS))), values=[o[position] for o in JITTER_ORDERS], dtype=types.INT32)
        if op == 0:
            image = fn.brightness(image, brightness=brightness)
        elif op == 1:
            image = _contrast(image, contrast)
        elif op == 2:
            image = _saturation(image, saturation)
        else:
            image = _hue(image, hue)
    return image


def _contrast(image, factor):
    """Blend with the image's mean grey (torchvision's pivot; DALI's `contrast` pivots at a CPU argument, and
    the mean of an image on the GPU stays on the GPU, so the blend is written out)."""
    channel_mean = fn.reductions.mean(image, axes=[0, 1])
    grey = sum(channel_mean[c] * w for c, w in enumerate(GRAY_WEIGHTS))
    return fn.cast(image * factor + grey * (1.0 - factor), dtype=types.UINT8)


def _saturation(image, factor):
    """Blend with the grayscale image, in RGB as torchvision does (DALI's `saturation` scales YIQ's chroma
    with 3-digit matrices): M = s·I + (1 - s)·[gray weights in every row]."""
    matrix = factor * types.Constant(np.eye(3, dtype=np.float32)) + (1.0 - factor) * types.Constant(np.float32(_TO_GRAY).reshape(3, 3))
    return fn.coord_transform(image, M=matrix, dtype=types.UINT8)


def _hue(image, shift):
    """torchvision's adjust_hue: rotate the HSV hue by `shift` turns, keeping value and saturation.

    DALI's `hue` rotates YIQ's chroma plane instead, which keeps luma, not value: pure red turned by a third
    is (0, 187, 0) there and (0, 255, 0) here. The HSV round trip is written in closed form, with H in
    sixths of a turn: channel n (r 5, g 3, b 1) = max - chroma·clamp(min(k, 4 - k), 0, 1), k = (n + H) mod 6."""
    x = fn.cast(image, dtype=types.FLOAT)
    r, g, b = x[:, :, 0], x[:, :, 1], x[:, :, 2]
    top, bottom = dmath.max(dmath.max(r, g), b), dmath.min(dmath.min(r, g), b)
    chroma = top - bottom
    divisor = chroma + (chroma == 0)  # grey pixels: any hue, the output is `top` on every channel
    red_top = top == r
    green_top = (top == g) & (top != r)
    blue_top = (top != r) & (top != g)
    sixths = red_top * ((g - b) / divisor) + green_top * ((b - r) / divisor + 2) + blue_top * ((r - g) / divisor + 4)
    sixths = sixths + 6.0 * shift

    def channel(n):
        k = sixths + n
        k = k - 6.0 * dmath.floor(k / 6.0)
        return top - chroma * dmath.clamp(dmath.min(k, 4.0 - k), 0.0, 1.0)

    return fn.cast(fn.stack(channel(5.0), channel(3.0), channel(1.0), axis=2, axis_name="C"), dtype=types.UINT8)


def _color_twist_jitter(image, jitter: ColorJitter):
    """DALI's fused colour_twist: a fixed order, contrast about grey level 128, hue as a YIQ rotation."""
    brightness, contrast, saturation, hue = _factors(jitter)
    return fn.color_twist(image, brightness=brightness, contrast=contrast, saturation=saturation, hue=360.0 * hue)


def _normalize(image, mean, std, out_dtype, mirror=None, crop=None):
    kwargs = {"crop": crop} if crop else {}
    return fn.crop_mirror_normalize(
        image,
        mirror=mirror if mirror is not None else 0,
        mean=[255 * m for m in mean],
        std=[255 * s for s in std],
        dtype=out_dtype,
        output_layout="CHW",
        **kwargs,
    )


def view(image, shape, recipe: ViewRecipe, out_dtype, debug: bool):
    """One augmented view of decoded `image` (HWC uint8) whose shape is `shape`."""
    anchor, extent = fn.random_crop_generator(shape, random_area=list(recipe.scale), random_aspect_ratio=list(recipe.ratio))
    start = fn.cast(anchor, dtype=types.FLOAT)
    out = fn.resize(
        image,
        size=[recipe.size, recipe.size],
        roi_start=start,
        roi_end=start + fn.cast(extent, dtype=types.FLOAT),
        interp_type=_INTERPOLATION[recipe.interpolation],
        antialias=True,
    )
    if recipe.translate:
        out = _translate(out, recipe.translate)
    if (ra := recipe.rand_augment) is not None:  # runs on the CPU pipeline too (it needs the conditionals views_pipeline enables)
        if ra.form == "featmatch":
            out = featmatch_rand_augment(out, ra.n, ra.m, ra.bins, recipe.size)
        else:
            out = rand_augment.rand_augment(out, n=ra.n, m=ra.m, num_magnitude_bins=ra.bins, shape=[recipe.size, recipe.size])
    out = _color(out, recipe)
    if recipe.blur is not None:
        sigma = _uniform(*recipe.blur.sigma)
        out = _sometimes(recipe.blur.probability, lambda x: fn.gaussian_blur(x, sigma=sigma), out)
    out = _sometimes(recipe.solarize, lambda x: fn.lookup_table(x, keys=list(range(256)), values=_SOLARIZE, dtype=types.UINT8), out)
    mirror = fn.random.coin_flip(probability=recipe.flip) if recipe.flip > 0 else None
    out = _normalize(out, recipe.mean, recipe.std, out_dtype, mirror=mirror)
    return (out, anchor, extent) if debug else (out,)


@pipeline_def(enable_conditionals=True, enable_checkpointing=True)
def views_pipeline(spec: ReaderSpec, recipes: list[ViewRecipe], gpu: bool, out_dtype, hw_decoder_load: float, debug: bool):
    """Outputs: one tensor per view (CHW), then label text, index text (and crop boxes when `debug`)."""
    encoded, label, index = _read(spec)
    shape = fn.peek_image_shape(encoded)
    image = _decode(encoded, gpu, hw_decoder_load)
    outputs = [view(image, shape, recipe, out_dtype, debug) for recipe in recipes]
    views = [o[0] for o in outputs]
    if not debug:
        return (*views, label, index)
    return (*views, label, index, *(box for o in outputs for box in o[1:]), shape)


@pipeline_def(enable_checkpointing=True)
def eval_pipeline(spec: ReaderSpec, size: int, resize: int, gpu: bool, out_dtype, hw_decoder_load: float, mean, std):
    """Outputs: the resized, centre-cropped image (CHW), label text, index text."""
    encoded, label, index = _read(spec)
    return eval_view(_decode(encoded, gpu, hw_decoder_load), size, resize, mean, std, out_dtype), label, index


def eval_view(image, size: int, resize: int, mean, std, out_dtype):
    """The evaluation view of decoded `image`: shorter side resized to `resize`, centre crop `size`, normalised."""
    image = fn.resize(image, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
    return _normalize(image, mean, std, out_dtype, crop=(size, size))
