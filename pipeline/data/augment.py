"""The DALI graphs: read shards, decode once, then one augmentation chain per view (train) or a resize and
centre crop (evaluation). One definition serves both devices: with a GPU the decode is "mixed" and the
image ops run on the GPU; without one (`device_id=None`) every op runs on the CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types

from data_shards.shards import MAX_DECIMAL_DIGITS
from pipeline.config import ViewRecipe

DIGITS = MAX_DECIMAL_DIGITS  # width of the zero-padded decimal text fields (.cls, .id); the index check keeps them shorter
_SOLARIZE = [k if k < 128 else 255 - k for k in range(256)]


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


def _coin(probability: float):
    """1.0 with `probability`, else 0.0, per sample."""
    return fn.cast(fn.random.coin_flip(probability=probability), dtype=types.FLOAT)


def _color(image, recipe: ViewRecipe):
    """Colour jitter (with its probability) and grayscale in one colour_twist; grayscale = saturation 0."""
    jitter, gray = recipe.color_jitter, recipe.grayscale
    if (jitter is None or jitter.probability == 0) and gray == 0:
        return image
    args = {}
    if jitter is not None and jitter.probability > 0:
        on = _coin(jitter.probability)

        def factor(amount):
            return 1.0 + on * (_uniform(max(0.0, 1.0 - amount), 1.0 + amount) - 1.0)

        args = dict(
            brightness=factor(jitter.brightness),
            contrast=factor(jitter.contrast),
            saturation=factor(jitter.saturation),
            hue=on * _uniform(-360.0 * jitter.hue, 360.0 * jitter.hue),
        )
    if gray > 0:
        keep = 1.0 - _coin(gray)
        args["saturation"] = args["saturation"] * keep if "saturation" in args else keep
    return fn.color_twist(image, **args)


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
        interp_type=types.INTERP_LINEAR,
        antialias=True,
    )
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
    image = _decode(encoded, gpu, hw_decoder_load)
    image = fn.resize(image, resize_shorter=resize, interp_type=types.INTERP_LINEAR, antialias=True)
    return _normalize(image, mean, std, out_dtype, crop=(size, size)), label, index
