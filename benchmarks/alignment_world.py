# Copyright 2026 The InPO for diffusers authors. All rights reserved.
#
# Licensed under the Apache License, Version 2.0 (the "License");
# you may not use this file except in compliance with the License.
# You may obtain a copy of the License at
#
#     http://www.apache.org/licenses/LICENSE-2.0
#
# Unless required by applicable law or agreed to in writing, software
# distributed under the License is distributed on an "AS IS" BASIS,
# WITHOUT WARRANTIES OR CONDITIONS OF ANY KIND, either express or implied.
# See the License for the specific language governing permissions and
# limitations under the License.
"""A synthetic text-to-image world in which preference is known exactly.

Images are RGB renders of a coloured shape ("a red circle") on a grey background whose brightness, like the
shape's position and size, is random and not named by the caption. A programmatic reward scores decoded images (by
default: how bright the background is), so a preference-tuned model can be measured exactly, and a colour classifier
checks that it still draws what the caption asks for. The default world is 32x32 px with one shape on a flat
background; `BaseModelConfig` also builds others (64 px, a striped background, several copies of the shape, a
smaller UNet), each a structurally different world for the benchmark suite (benchmarks/run_suite.py). A config's
`family` picks the pipeline layout: "sd" (SD 1.5: UNet, epsilon prediction, DDIM) or "sd3" (Stable Diffusion 3: MMDiT
transformer, rectified flow, flow-matching Euler sampling), so one world can be learned by both.

The pieces, in the order a benchmark uses them:
    render / render_dataset        the world's ground-truth images and captions
    REWARDS, reward_of             the preference, defined in one registry (name -> fn(images, captions)): a
                                   global tone (background_brightness), local attributes (object_size,
                                   horizontal_position, centredness) and a detail (edge_sharpness)
    predict_colour, fidelity       does an image still follow its caption
    background_roughness, quality  texture in the flat background, an artefact (image-quality check)
    write_tiny_clip_tokenizer      a character-level CLIPTokenizer (the base model's; the tests' tiny pipelines')
    build_base_model               a tiny StableDiffusionPipeline (or StableDiffusion3Pipeline) pretrained on the
                                   world, cached by fingerprint; load_pipeline reads either back
    sample_images                  deterministic samples (one seed per image) from any pipeline
    make_preference_pairs          Pick-a-Pic-v2-format parquet of base-model sample pairs labelled by the reward
    evaluate, win_rate             mean reward, win rate against the base model and fidelity of a pipeline

Image arrays are float (N, S, S, 3) in [0, 1] (S the world's image size) unless said otherwise (uint8 renders are
(S, S, 3)).
"""

import dataclasses
import hashlib
import json
import math
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F


sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.pickapic_format import encode_png, write_pickapic_parquet


# Bump when rendering, reward or training code changes, so cached models and pair datasets are rebuilt.
WORLD_VERSION = "1"

IMAGE_SIZE = 32  # the default world's; others set BaseModelConfig.image_size
COLOURS = {
    "red": (0.9, 0.1, 0.1),
    "yellow": (0.9, 0.85, 0.1),
    "green": (0.1, 0.75, 0.1),
    "blue": (0.1, 0.2, 0.9),
}
SHAPES = ("square", "circle", "triangle")
BACKGROUND_GREY = (0.15, 0.85)  # the background level is uniform in this range: the base model's reward spread
SHAPE_RADIUS = (5.0, 9.0)  # half side / radius in pixels of a 32 px image
COLOUR_JITTER = 0.08
# Chroma (max - min channel) separates the saturated shape from the grey background at any brightness.
FOREGROUND_CHROMA = 0.25
MIN_FOREGROUND_PIXELS = 4
BACKGROUNDS = ("flat", "striped")
# Stripes of a striped background: amplitude (luminance), period (pixels of a 32 px image), any angle and phase.
STRIPE_AMPLITUDE = (0.04, 0.1)
STRIPE_PERIOD = (4.0, 8.0)
# Sampling defaults for pairs and evaluation. The default base model's colour fidelity over 96 samples at 20 DDIM
# steps was 0.49 / 0.76 / 0.96 / 1.00 at guidance 1 / 3 / 5 / 7.5: 5 follows captions without saturating them.
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 5.0
META_FILE = "world_meta.json"  # fingerprint + build statistics; `datasets` ignores it beside the parquet file
FAMILIES = ("sd", "sd3")
# An SD3 world has no T5 encoder: the pipeline appends this many zero "T5" tokens to the CLIP tokens, in training and
# sampling alike. A few suffice (they carry nothing), and fewer keep the joint attention cheap.
SD3_MAX_SEQUENCE_LENGTH = 4


# --------------------------------------------------------------------------------------------------------------
# The world: captions and renderer
# --------------------------------------------------------------------------------------------------------------


def caption_of(colour, shape):
    return f"a {colour} {shape}"


def parse_caption(caption):
    """Split "a red circle" into ("red", "circle")."""
    _, colour, shape = caption.split()
    return colour, shape


ALL_CAPTIONS = [caption_of(colour, shape) for colour in COLOURS for shape in SHAPES]


def _shape_coverage(shape, cx, cy, radius, image_size=IMAGE_SIZE, supersample=4):
    """Anti-aliased coverage (S, S) in [0, 1] of a shape centred at (cx, cy) pixels, by supersampling."""
    n = image_size * supersample
    coords = (np.arange(n) + 0.5) / supersample
    y, x = np.meshgrid(coords, coords, indexing="ij")
    dx, dy = x - cx, y - cy
    if shape == "square":
        inside = (np.abs(dx) <= radius) & (np.abs(dy) <= radius)
    elif shape == "circle":
        inside = dx**2 + dy**2 <= radius**2
    elif shape == "triangle":  # apex up; half width grows from 0 at the apex to `radius` at the base
        depth = dy + radius
        inside = (depth >= 0) & (depth <= 2 * radius) & (np.abs(dx) <= depth / 2)
    else:
        raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")
    return inside.reshape(image_size, supersample, image_size, supersample).mean(axis=(1, 3))


def _stripes(rng, image_size):
    """A zero-mean luminance pattern (S, S, 1) of parallel stripes at a random angle, period, phase and amplitude."""
    scale = image_size / IMAGE_SIZE
    angle, phase = rng.uniform(0, np.pi), rng.uniform(0, 2 * np.pi)
    period, amplitude = rng.uniform(*STRIPE_PERIOD) * scale, rng.uniform(*STRIPE_AMPLITUDE)
    y, x = np.meshgrid(np.arange(image_size) + 0.5, np.arange(image_size) + 0.5, indexing="ij")
    wave = np.sin(2 * np.pi * (x * np.cos(angle) + y * np.sin(angle)) / period + phase)
    return (amplitude * wave)[..., None]


def render(caption_parts, rng, image_size=IMAGE_SIZE, background="flat", num_objects=1, shape_radius=SHAPE_RADIUS):
    """Render ("red", "circle") with random background grey, colour jitter, and each copy's size and position.

    `num_objects` copies of the shape share the jittered colour; `shape_radius` is in pixels of a 32 px image and
    scales with `image_size`; a "striped" background adds grey stripes around the random grey level. Returns a
    uint8 array (S, S, 3). The same `rng` state gives the same image.
    """
    if background not in BACKGROUNDS:
        raise ValueError(f"unknown background {background!r}; expected one of {BACKGROUNDS}")
    colour, shape = caption_parts
    scale = image_size / IMAGE_SIZE
    grey = rng.uniform(*BACKGROUND_GREY)
    rgb = np.clip(np.asarray(COLOURS[colour]) + rng.uniform(-COLOUR_JITTER, COLOUR_JITTER, size=3), 0.0, 1.0)
    coverage = np.zeros((image_size, image_size))
    for _ in range(num_objects):
        radius = rng.uniform(*shape_radius) * scale
        # Keep a 2-pixel margin so the whole shape, and some background on every side, is in the frame.
        cx, cy = rng.uniform(radius + 2 * scale, image_size - radius - 2 * scale, size=2)
        coverage = np.maximum(coverage, _shape_coverage(shape, cx, cy, radius, image_size))
    coverage = coverage[..., None]
    backdrop = grey + (_stripes(rng, image_size) if background == "striped" else 0.0)
    image = (1 - coverage) * np.clip(backdrop, 0.0, 1.0) + coverage * rgb
    return np.round(image * 255).astype(np.uint8)


def render_dataset(num_images, seed, **world):
    """`num_images` renders cycling through ALL_CAPTIONS; `world`: `render`'s keywords (`BaseModelConfig.world()`).

    Returns (uint8 (N, S, S, 3), list of N captions).
    """
    rng = np.random.default_rng(seed)
    captions = [ALL_CAPTIONS[i % len(ALL_CAPTIONS)] for i in range(num_images)]
    images = np.stack([render(parse_caption(c), rng, **world) for c in captions])
    return images, captions


# --------------------------------------------------------------------------------------------------------------
# Rewards and fidelity (all on float images (N, S, S, 3) in [0, 1])
# --------------------------------------------------------------------------------------------------------------


def _luminance(images):
    return images @ np.array([0.299, 0.587, 0.114])


def _chroma(images):
    return images.max(axis=-1) - images.min(axis=-1)


def foreground_mask(images):
    """Boolean (N, S, S): saturated pixels, i.e. the shape (the background is grey at any brightness)."""
    return _chroma(images) > FOREGROUND_CHROMA


def background_brightness(images, captions):
    """Mean luminance (N,) of the background pixels; 0 when an image has no background left.

    Not asked for by any caption, and uniform over BACKGROUND_GREY in the training renders, so base-model
    samples spread over it and preference pairs carry signal.
    """
    background = ~foreground_mask(images)
    total = (_luminance(images) * background).sum(axis=(1, 2))
    return np.where(background.any(axis=(1, 2)), total / np.maximum(background.sum(axis=(1, 2)), 1), 0.0)


def _foreground_centroid(images):
    """(count, cx, cy) each (N,): the number of shape pixels and their mean position in pixels."""
    mask = foreground_mask(images)
    count = mask.sum(axis=(1, 2))
    coords = np.arange(images.shape[1]) + 0.5
    cy = (mask.sum(axis=2) * coords).sum(axis=1) / np.maximum(count, 1)
    cx = (mask.sum(axis=1) * coords).sum(axis=1) / np.maximum(count, 1)
    return count, cx, cy


def centredness(images, captions):
    """1 − (distance of the shape's centroid from the image centre) / (half diagonal), (N,); 0 with no shape."""
    count, cx, cy = _foreground_centroid(images)
    size = images.shape[1]
    distance = np.hypot(cx - size / 2, cy - size / 2)
    return np.where(count >= MIN_FOREGROUND_PIXELS, 1 - distance / (size / math.sqrt(2)), 0.0)


def horizontal_position(images, captions):
    """Mean horizontal position of the shapes' pixels, 0 at the left edge to 1 at the right, (N,); 0.5 with no shape.

    A layout attribute: where the objects are, not how they look.
    """
    count, cx, _ = _foreground_centroid(images)
    return np.where(count >= MIN_FOREGROUND_PIXELS, cx / images.shape[2], 0.5)


def object_size(images, captions):
    """Fraction of the image the shapes cover, (N,): a local attribute, independent of the background's tone."""
    return foreground_mask(images).mean(axis=(1, 2))


def _neighbours_all(mask):
    """(N, H, W) bool: True where the pixel and its 4 neighbours are all True (pixels off the image count False)."""
    padded = np.pad(mask, ((0, 0), (1, 1), (1, 1)), constant_values=False)
    return mask & padded[:, :-2, 1:-1] & padded[:, 2:, 1:-1] & padded[:, 1:-1, :-2] & padded[:, 1:-1, 2:]


# A pixel is "in transition" when its position between the background and the shape colour is in this range.
EDGE_TRANSITION = (0.2, 0.8)


def edge_sharpness(images, captions):
    """1 / (1 + edge width in pixels), (N,): 1 for a hard-edged shape, towards 0 as its outline blurs; 0 with no shape.

    A reward that lives in detail, not in a large flat area. Each pixel is placed between the image's mean
    background colour (0) and mean shape colour (1) by projection onto their difference; pixels between
    EDGE_TRANSITION are the blur. Edge width = transition pixels / outline pixels (shape pixels with a background
    4-neighbour), so it does not depend on the shape's size. The renders' anti-aliasing scores ~0.6-0.8.
    """
    mask = foreground_mask(images)
    count = mask.sum(axis=(1, 2))
    background = ~mask
    colour_fg = (images * mask[..., None]).sum(axis=(1, 2)) / np.maximum(count, 1)[:, None]
    colour_bg = (images * background[..., None]).sum(axis=(1, 2)) / np.maximum(background.sum(axis=(1, 2)), 1)[:, None]
    direction = colour_fg - colour_bg  # (N, 3)
    position = np.einsum("nhwc,nc->nhw", images - colour_bg[:, None, None], direction)
    position /= np.maximum((direction**2).sum(axis=1), 1e-12)[:, None, None]
    low, high = EDGE_TRANSITION
    transition = ((position > low) & (position < high)).sum(axis=(1, 2))
    outline = (mask & ~_neighbours_all(mask)).sum(axis=(1, 2))
    width = transition / np.maximum(outline, 1)
    return np.where(count >= MIN_FOREGROUND_PIXELS, 1 / (1 + width), 0.0)


# The one place rewards are defined: name -> fn(images (N, S, S, 3) in [0, 1], captions) -> (N,) rewards.
REWARDS = {
    "background_brightness": background_brightness,
    "centredness": centredness,
    "edge_sharpness": edge_sharpness,
    "horizontal_position": horizontal_position,
    "object_size": object_size,
}
DEFAULT_REWARD = "background_brightness"


def reward_of(name, images, captions):
    if name not in REWARDS:
        raise ValueError(f"unknown reward {name!r}; registered: {sorted(REWARDS)}")
    return np.asarray(REWARDS[name](images, captions), dtype=np.float64)


def _hue(rgb):
    """Hue angle in degrees (..., ) of RGB (..., 3): red 0, yellow 60, green 120, blue 240."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    return np.degrees(np.arctan2(math.sqrt(3) * (g - b), 2 * r - g - b)) % 360


def predict_colour(images):
    """The caption colour (from COLOURS) nearest in hue to each image's mean foreground colour; None if no shape.

    Returns a list of N names or None.
    """
    names = list(COLOURS)
    palette_hues = _hue(np.array([COLOURS[n] for n in names]))
    mask = foreground_mask(images)
    count = mask.sum(axis=(1, 2))
    mean_rgb = (images * mask[..., None]).sum(axis=(1, 2)) / np.maximum(count, 1)[:, None]
    gap = np.abs(_hue(mean_rgb)[:, None] - palette_hues[None, :])
    nearest = np.minimum(gap, 360 - gap).argmin(axis=1)
    return [names[k] if c >= MIN_FOREGROUND_PIXELS else None for k, c in zip(nearest, count)]


def fidelity(images, captions):
    """Fraction of images whose dominant shape colour matches their caption's colour."""
    predicted = predict_colour(images)
    return float(np.mean([p == parse_caption(c)[0] for p, c in zip(predicted, captions)]))


def background_roughness(images):
    """Image-quality check: mean |pixel − mean of its 3x3 neighbourhood| over flat background, (N,) luminance units.

    A flat background's texture is an artefact (the blotches that a reward can be won with): 0 for a clean image,
    larger is worse; a striped world's renders have their own level, against which a tuned model's is compared. Only
    pixels off the image border whose whole 3x3 neighbourhood is background count (the shape's own edges are not
    texture); 0 if there are none.
    """
    luminance = _luminance(images)
    background = ~foreground_mask(images)
    size = luminance.shape[1]
    windows = [
        (slice(None), slice(1 + dy, size - 1 + dy), slice(1 + dx, size - 1 + dx))
        for dy in (-1, 0, 1)
        for dx in (-1, 0, 1)
    ]
    local_mean = sum(luminance[w] for w in windows) / 9
    deviation = np.abs(luminance[:, 1:-1, 1:-1] - local_mean)
    clear = np.logical_and.reduce([background[w] for w in windows])
    total = (deviation * clear).sum(axis=(1, 2))
    return np.where(clear.any(axis=(1, 2)), total / np.maximum(clear.sum(axis=(1, 2)), 1), 0.0)


def quality(images):
    """Mean background roughness of a set of images (lower is cleaner); compare a tuned model's with the base's."""
    return float(background_roughness(images).mean())


# --------------------------------------------------------------------------------------------------------------
# The tiny base model
# --------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class BaseModelConfig:
    """Everything that determines the base model, its world included; its hash is the cache fingerprint."""

    seed: int = 0
    # The world it is trained on (`render`'s keywords, see `world()`).
    image_size: int = IMAGE_SIZE
    background: str = "flat"
    num_objects: int = 1
    shape_radius: tuple = SHAPE_RADIUS
    # Capacity: the UNet's channels per level; latents are 16x16 at any image size (2 VAE levels at 32 px, 3 at 64).
    unet_channels: tuple = (32, 64)
    num_train_images: int = 4096
    vae_steps: int = 400
    vae_lr: float = 2e-3
    vae_kl_weight: float = 1e-4
    unet_steps: int = 1000
    unet_lr: float = 1e-3
    batch_size: int = 32
    caption_dropout: float = 0.1  # empty-caption training so classifier-free guidance works
    # The pipeline layout (FAMILIES): "sd" trains `unet_channels`' UNet; "sd3" trains an SD3Transformer2DModel of the
    # sizes below instead (unet_steps and unet_lr are then the transformer's: they are the denoiser's in either).
    family: str = "sd"
    transformer_layers: int = 8
    transformer_heads: int = 4
    transformer_head_dim: int = 16

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"unknown family {self.family!r}; expected one of {FAMILIES}")

    def fingerprint(self):
        fields = dataclasses.asdict(self)
        if self.family == "sd":
            # An SD model does not depend on the SD3 fields, and leaving them out keeps the fingerprints that cached
            # and shipped SD models are stored under.
            for name in SD3_FIELDS:
                del fields[name]
        payload = json.dumps({"world_version": WORLD_VERSION, **fields}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def world(self):
        """`render` / `render_dataset` keywords of this model's world."""
        return {
            "image_size": self.image_size,
            "background": self.background,
            "num_objects": self.num_objects,
            "shape_radius": tuple(self.shape_radius),
        }


SD3_FIELDS = ("family", "transformer_layers", "transformer_heads", "transformer_head_dim")


@dataclasses.dataclass(frozen=True)
class World:
    """A world of the benchmark suite: the base model (and so the renders it learns) and the preference's reward."""

    config: BaseModelConfig
    reward: str
    description: str


# The suite (benchmarks/run_suite.py): structurally different worlds, each cheap to build on 2 CPU cores. They
# differ in resolution and VAE depth, background, number of objects, UNet capacity and training, and in what the
# reward measures: a global tone, a local attribute, a detail.
WORLDS = {
    "shapes_brightness": World(
        BaseModelConfig(),
        "background_brightness",
        "32 px, one shape on a flat grey; prefer the brighter background (a global tone). The shipped base model.",
    ),
    "striped_size": World(
        BaseModelConfig(
            background="striped",
            shape_radius=(3.0, 10.0),
            unet_channels=(16, 32),
            num_train_images=2048,
            vae_steps=300,
            unet_steps=600,
        ),
        "object_size",
        "32 px, one shape on a striped grey, a 4x smaller and shorter-trained UNet; prefer the larger shape (a "
        "local attribute).",
    ),
    "two_shapes_64_sharpness": World(
        BaseModelConfig(
            image_size=64, num_objects=2, shape_radius=(3.0, 6.0), num_train_images=2048, vae_steps=800, unet_steps=800
        ),
        "edge_sharpness",
        "64 px (a 3-level VAE), two copies of the shape on a flat grey; prefer the sharper outlines (a detail).",
    ),
    "shapes_brightness_flow": World(
        BaseModelConfig(family="sd3"),
        "background_brightness",
        "The shapes_brightness world (32 px, one shape on a flat grey; prefer the brighter background) learned by a "
        "tiny SD3-layout model: an MMDiT transformer trained by rectified flow, sampled by flow-matching Euler.",
    ),
}
DEFAULT_WORLD = "shapes_brightness"


TOKENIZER_MAX_LENGTH = 20  # "a yellow triangle" is 15 character tokens + start + end
# Characters the tiny BPE vocabulary can spell; any caption made of them tokenizes without <unk>.
TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"


def write_tiny_clip_tokenizer(path, max_length=16):
    """A CLIPTokenizer over single characters (no merges): small enough for tests, real enough for the code path."""
    from transformers import CLIPTokenizer

    os.makedirs(path, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(TINY_ALPHABET) + [c + "</w>" for c in TINY_ALPHABET]
    with open(os.path.join(path, "vocab.json"), "w") as f:
        json.dump({tok: i for i, tok in enumerate(tokens)}, f)
    with open(os.path.join(path, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n")
    tokenizer = CLIPTokenizer(
        os.path.join(path, "vocab.json"),
        os.path.join(path, "merges.txt"),
        model_max_length=max_length,
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(path)
    return tokenizer


CLIP_HIDDEN_SIZE = 32
CLIP_PROJECTION_DIM = 32


def _text_encoder(vocab_size, with_projection=False):
    """A tiny random CLIP text encoder; `with_projection`: SD3's kind, whose projected output is the pooled caption."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=CLIP_HIDDEN_SIZE,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=TOKENIZER_MAX_LENGTH,
        projection_dim=CLIP_PROJECTION_DIM,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config)


LATENT_SIZE = 16


def _vae(image_size):
    from diffusers import AutoencoderKL

    # One level per halving: 32 px images <-> 4 x 16 x 16 latents (the SD layout at 1/16 of the side) in two, 64 px in
    # three (SD's own 8x downsampling is three halvings).
    levels = 1 + int(math.log2(image_size // LATENT_SIZE))
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        block_out_channels=(16, 32, 32)[:levels],
        latent_channels=4,
        norm_num_groups=8,
        sample_size=image_size,
    )


def _unet(channels):
    from diffusers import UNet2DConditionModel

    # Cross-attention only at the 8x8 level: the caption fixes global properties (colour, shape), and attention
    # over 64 rather than 256 positions keeps a training step at ~0.2 s on 2 CPU cores.
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE,
        in_channels=4,
        out_channels=4,
        block_out_channels=tuple(channels),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=min(16, channels[0]),
    )


def _scheduler():
    from diffusers import DDIMScheduler

    # The SD 1.5 noise schedule and conventions, so the trainer sees the same timesteps as on the real model.
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type="epsilon",
    )


def _transformer(config):
    """A tiny SD3Transformer2DModel on the 16x16 latents: 2x2 patches, so 64 image tokens."""
    from diffusers import SD3Transformer2DModel

    patch_size = 2
    return SD3Transformer2DModel(
        sample_size=LATENT_SIZE,
        patch_size=patch_size,
        in_channels=4,
        out_channels=4,
        num_layers=config.transformer_layers,
        attention_head_dim=config.transformer_head_dim,
        num_attention_heads=config.transformer_heads,
        # The two CLIP encoders' hidden states side by side fill the joint attention width exactly, so the pipeline
        # pads nothing; the pooled caption is their two projections side by side.
        joint_attention_dim=2 * CLIP_HIDDEN_SIZE,
        caption_projection_dim=config.transformer_heads * config.transformer_head_dim,
        pooled_projection_dim=2 * CLIP_PROJECTION_DIM,
        pos_embed_max_size=LATENT_SIZE // patch_size,
    )


def _flow_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler

    # SD3's own schedule shift, so σ is drawn and stepped through as on the real model.
    return FlowMatchEulerDiscreteScheduler(shift=3.0)


def _to_model_range(images_uint8):
    """uint8 (N, S, S, 3) -> float tensor (N, 3, S, S) in [-1, 1], the SD VAE's input range."""
    return torch.from_numpy(images_uint8).permute(0, 3, 1, 2).float() / 127.5 - 1


def _cosine_lr(optimizer, total_steps, warmup=20):
    def factor(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(total_steps - warmup, 1)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def _train_vae(vae, pixels, config, generator, log):
    """Fit the VAE as an autoencoder on pixels (N, 3, S, S) in [-1, 1]: MSE + a small KL to keep latents tame."""
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr)
    schedule = _cosine_lr(optimizer, config.vae_steps)
    vae.train()
    for step in range(config.vae_steps):
        batch = pixels[torch.randint(len(pixels), (config.batch_size,), generator=generator)]
        posterior = vae.encode(batch).latent_dist
        reconstruction = vae.decode(posterior.sample(generator)).sample
        kl = posterior.kl().mean() / posterior.mean[0].numel()
        loss = F.mse_loss(reconstruction, batch) + config.vae_kl_weight * kl
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == config.vae_steps - 1:
            log(f"  vae step {step}: loss {loss.item():.4f}")
    vae.eval()


@torch.no_grad()
def _encode(vae, pixels, batch_size=256):
    """Posterior means and stds (N, 4, 16, 16) of pixels (N, 3, S, S)."""
    dists = [vae.encode(pixels[i : i + batch_size]).latent_dist for i in range(0, len(pixels), batch_size)]
    return torch.cat([d.mean for d in dists]), torch.cat([d.std for d in dists])


@torch.no_grad()
def _caption_embeddings(tokenizer, text_encoder, captions):
    """Text-encoder hidden states (len(captions), L, 32), tokenized exactly as StableDiffusionPipeline does."""
    ids = tokenizer(
        captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
    ).input_ids
    return text_encoder(ids)[0]


def _train_unet(unet, scheduler, latents, caption_index, embeddings, config, generator, log):
    """Epsilon-prediction diffusion training on latents.

    latents: (mean, std) of the scaled posteriors, each (N, 4, 16, 16); a fresh posterior sample per use.
    caption_index: (N,) rows of `embeddings` (C + 1, L, D), whose last row is the empty caption.
    """
    mean, std = latents
    empty = len(embeddings) - 1
    alphas_cumprod = scheduler.alphas_cumprod
    optimizer = torch.optim.AdamW(unet.parameters(), lr=config.unet_lr)
    schedule = _cosine_lr(optimizer, config.unet_steps)
    unet.train()
    for step in range(config.unet_steps):
        idx = torch.randint(len(mean), (config.batch_size,), generator=generator)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        cond = caption_index[idx].clone()
        cond[torch.rand(len(idx), generator=generator) < config.caption_dropout] = empty
        t = torch.randint(len(alphas_cumprod), (len(idx),), generator=generator)
        noise = torch.randn(x0.shape, generator=generator)
        a = alphas_cumprod[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * x0 + (1 - a).sqrt() * noise
        loss = F.mse_loss(unet(noisy, t, embeddings[cond]).sample, noise)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == config.unet_steps - 1:
            log(f"  unet step {step}: loss {loss.item():.4f}")
    unet.eval()


def _train_transformer(transformer, scheduler, latents, caption_index, conditioning, config, generator, log):
    """Rectified-flow training on latents, as diffusers' SD3 training scripts do it.

    latents: (mean, std) of the shifted and scaled posteriors, each (N, 4, 16, 16); a fresh posterior sample per use.
    caption_index: (N,) rows of `conditioning` = (prompt_embeds (C + 1, L, D), pooled_prompt_embeds (C + 1, P)),
    whose last rows are the empty caption. σ is logit-normal (their default, whose loss weighting is 1) on the
    shifted schedule of `scheduler`: x_σ = (1 − σ)·x0 + σ·ε, and the model predicts the velocity ε − x0.
    """
    from diffusers.training_utils import compute_density_for_timestep_sampling

    mean, std = latents
    prompt_embeds, pooled_prompt_embeds = conditioning
    empty = len(prompt_embeds) - 1
    num_train_timesteps = scheduler.config.num_train_timesteps
    optimizer = torch.optim.AdamW(transformer.parameters(), lr=config.unet_lr)
    schedule = _cosine_lr(optimizer, config.unet_steps)
    transformer.train()
    for step in range(config.unet_steps):
        idx = torch.randint(len(mean), (config.batch_size,), generator=generator)
        x0 = mean[idx] + std[idx] * torch.randn(mean[idx].shape, generator=generator)
        cond = caption_index[idx].clone()
        cond[torch.rand(len(idx), generator=generator) < config.caption_dropout] = empty
        u = compute_density_for_timestep_sampling(
            "logit_normal", len(idx), logit_mean=0.0, logit_std=1.0, generator=generator
        )
        index = (u * num_train_timesteps).long()
        sigma = scheduler.sigmas[index].view(-1, 1, 1, 1)
        noise = torch.randn(x0.shape, generator=generator)
        noisy = (1 - sigma) * x0 + sigma * noise
        prediction = transformer(
            hidden_states=noisy,
            timestep=scheduler.timesteps[index],
            encoder_hidden_states=prompt_embeds[cond],
            pooled_projections=pooled_prompt_embeds[cond],
        ).sample
        loss = F.mse_loss(prediction, noise - x0)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 200 == 0 or step == config.unet_steps - 1:
            log(f"  transformer step {step}: loss {loss.item():.4f}")
    transformer.eval()


def _read_meta(path):
    meta_path = os.path.join(path, META_FILE)
    if not os.path.exists(meta_path):
        return None
    with open(meta_path) as f:
        return json.load(f)


def _write_meta(path, meta):
    with open(os.path.join(path, META_FILE), "w") as f:
        json.dump(meta, f, indent=2)


def build_base_model(
    path,
    config=BaseModelConfig(),
    num_check_seeds=8,
    num_inference_steps=NUM_INFERENCE_STEPS,
    guidance_scale=GUIDANCE_SCALE,
    log=print,
):
    """Pretrain the tiny pipeline of `config.family` on the world and `save_pretrained` it to `path`; return its
    metadata.

    "sd" trains a StableDiffusionPipeline's UNet by epsilon prediction; "sd3" a StableDiffusion3Pipeline's
    transformer by rectified flow (its VAE trained as the SD one is). Skipped if `path` already holds a model with the same fingerprint. The metadata (also in
    `path/world_meta.json`) records build times, VAE reconstruction quality, and the fidelity and reward spread
    of `num_check_seeds` samples per caption drawn with the given sampling settings.
    """
    meta = _read_meta(path)
    if meta is not None and meta.get("fingerprint") == config.fingerprint():
        log(f"Base model {path} is up to date (fingerprint {meta['fingerprint']}).")
        return meta

    start = time.time()
    torch.manual_seed(config.seed)
    generator = torch.Generator().manual_seed(config.seed)
    images, captions = render_dataset(config.num_train_images, seed=config.seed, **config.world())
    pixels = _to_model_range(images)
    build = _build_sd3 if config.family == "sd3" else _build_sd
    pipe, stats = build(path, config, pixels, captions, generator, start, log)
    pipe.save_pretrained(path)
    check = evaluate(pipe, *eval_prompts(num_check_seeds), DEFAULT_REWARD, num_inference_steps, guidance_scale)
    meta = {
        "fingerprint": config.fingerprint(),
        "family": config.family,
        "config": json.loads(json.dumps(dataclasses.asdict(config))),  # as read back: tuples become lists
        **stats,
        "samples": {
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            **_summary(check, num_check_seeds),
        },
    }
    _write_meta(path, meta)
    log(f"Base model saved to {path}: {json.dumps(meta, indent=2)}")
    return meta


def _fit_vae(vae, pixels, config, generator, start, log):
    """Train the VAE; return the posterior means and stds of `pixels` and the seconds since `start`."""
    log(f"Training the VAE ({config.vae_steps} steps)...")
    _train_vae(vae, pixels, config, generator, log)
    vae_seconds = time.time() - start
    mean, std = _encode(vae, pixels)
    return mean, std, vae_seconds


def _build_sd(path, config, pixels, captions, generator, start, log):
    """The SD 1.5-layout pipeline pretrained on `pixels`, and its build statistics."""
    from diffusers import StableDiffusionPipeline

    tokenizer = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"), max_length=TOKENIZER_MAX_LENGTH)
    text_encoder, scheduler = _text_encoder(len(tokenizer)), _scheduler()
    vae, unet = _vae(config.image_size), _unet(config.unet_channels)
    text_encoder.eval()  # stays random and frozen: still one distinct embedding sequence per caption

    mean, std, vae_seconds = _fit_vae(vae, pixels, config, generator, start, log)
    # SD convention: latents are multiplied by scaling_factor so the diffusion model sees unit variance.
    scaling_factor = float(1 / mean.std())
    vae.register_to_config(scaling_factor=scaling_factor)
    reconstruction = _reconstruction_report(vae, config)

    log(f"Training the UNet ({config.unet_steps} steps)...")
    embeddings = _caption_embeddings(tokenizer, text_encoder, ALL_CAPTIONS + [""])
    caption_index = torch.tensor([ALL_CAPTIONS.index(c) for c in captions])
    latents = (mean * scaling_factor, std * scaling_factor)
    _train_unet(unet, scheduler, latents, caption_index, embeddings, config, generator, log)
    train_seconds = time.time() - start

    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    stats = {
        "vae_seconds": round(vae_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "scaling_factor": scaling_factor,
        "reconstruction": reconstruction,
    }
    return pipe, stats


def _build_sd3(path, config, pixels, captions, generator, start, log):
    """The SD3-layout pipeline (two CLIP encoders, no T5) pretrained on `pixels`, and its build statistics."""
    from diffusers import StableDiffusion3Pipeline

    tokenizers = [
        write_tiny_clip_tokenizer(os.path.join(path, name), max_length=TOKENIZER_MAX_LENGTH)
        for name in ("tokenizer", "tokenizer_2")
    ]
    # Both stay random and frozen, and differ from each other (drawn one after the other), as SD3's two CLIPs do.
    text_encoders = [_text_encoder(len(tokenizer), with_projection=True).eval() for tokenizer in tokenizers]
    vae, transformer = _vae(config.image_size), _transformer(config)

    mean, std, vae_seconds = _fit_vae(vae, pixels, config, generator, start, log)
    # SD3 convention: latents = (posterior - shift_factor) * scaling_factor, zero-mean and unit-variance for the
    # transformer; the pipeline decodes latents / scaling_factor + shift_factor.
    shift_factor = float(mean.mean())
    scaling_factor = float(1 / (mean - shift_factor).std())
    vae.register_to_config(scaling_factor=scaling_factor, shift_factor=shift_factor)
    reconstruction = _reconstruction_report(vae, config)

    pipe = StableDiffusion3Pipeline(
        transformer=transformer,
        scheduler=_flow_scheduler(),
        vae=vae,
        text_encoder=text_encoders[0],
        tokenizer=tokenizers[0],
        text_encoder_2=text_encoders[1],
        tokenizer_2=tokenizers[1],
        text_encoder_3=None,
        tokenizer_3=None,
    )
    pipe.world_max_sequence_length = SD3_MAX_SEQUENCE_LENGTH
    log(f"Training the transformer ({config.unet_steps} steps)...")
    # The pipeline's own encoding, so training sees exactly the conditioning (and empty caption) that sampling does.
    with torch.no_grad():
        prompt_embeds, _, pooled_prompt_embeds, _ = pipe.encode_prompt(
            prompt=ALL_CAPTIONS + [""],
            prompt_2=None,
            prompt_3=None,
            do_classifier_free_guidance=False,
            max_sequence_length=SD3_MAX_SEQUENCE_LENGTH,
        )
    caption_index = torch.tensor([ALL_CAPTIONS.index(c) for c in captions])
    latents = ((mean - shift_factor) * scaling_factor, std * scaling_factor)
    # A scheduler of its own: sampling's set_timesteps replaces the schedule that training draws σ from.
    conditioning = (prompt_embeds, pooled_prompt_embeds)
    _train_transformer(transformer, _flow_scheduler(), latents, caption_index, conditioning, config, generator, log)
    train_seconds = time.time() - start

    stats = {
        "vae_seconds": round(vae_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "scaling_factor": scaling_factor,
        "shift_factor": shift_factor,
        "max_sequence_length": SD3_MAX_SEQUENCE_LENGTH,
        "reconstruction": reconstruction,
    }
    return pipe, stats


@torch.no_grad()
def _reconstruction_report(vae, config, num_images=192):
    """How well the VAE round-trips fresh renders: pixel error, fidelity, and whether the reward survives."""
    images, captions = render_dataset(num_images, seed=config.seed + 1, **config.world())  # renders it has not seen
    pixels = _to_model_range(images)
    decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    recon = (decoded / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy().astype(np.float64)
    original = images / 255.0
    reward_true, reward_recon = (reward_of(DEFAULT_REWARD, x, captions) for x in (original, recon))
    return {
        "mean_abs_pixel_error": round(float(np.abs(recon - original).mean()), 4),
        "fidelity_of_renders": fidelity(original, captions),
        "fidelity_of_reconstructions": fidelity(recon, captions),
        "reward_correlation": round(float(np.corrcoef(reward_true, reward_recon)[0, 1]), 4),
    }


def _summary(result, num_seeds):
    rewards = result["rewards"]
    return {
        "num_images": len(rewards),
        "seeds_per_caption": num_seeds,
        "fidelity": result["fidelity"],
        "reward_mean": round(float(rewards.mean()), 4),
        "reward_std": round(float(rewards.std()), 4),
        "reward_min": round(float(rewards.min()), 4),
        "reward_max": round(float(rewards.max()), 4),
    }


def image_size_of(path):
    """The image size of the base model saved at `path` (from its build metadata)."""
    return _read_meta(path)["config"]["image_size"]


def family_of(path):
    """The pipeline family ("sd" or "sd3") of the base model saved at `path`."""
    return _read_meta(path).get("family", "sd")  # SD models' metadata may predate the field


def max_sequence_length_of(path):
    """The T5 token count the SD3 base model saved at `path` was trained with; None for an SD model."""
    return _read_meta(path).get("max_sequence_length")


def load_pipeline(path):
    """The base model saved at `path`, as the pipeline class its model_index.json names."""
    from diffusers import StableDiffusion3Pipeline, StableDiffusionPipeline

    with open(os.path.join(path, "model_index.json")) as f:
        class_name = json.load(f)["_class_name"]
    if class_name == StableDiffusion3Pipeline.__name__:
        # No T5: saving leaves it out of model_index.json, so loading must be told it is absent.
        pipe = StableDiffusion3Pipeline.from_pretrained(path, text_encoder_3=None, tokenizer_3=None)
        pipe.world_max_sequence_length = max_sequence_length_of(path)
    else:
        pipe = StableDiffusionPipeline.from_pretrained(path, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _layout_kwargs(pipe):
    """Call keywords that a pipeline's layout needs: an SD3 pipeline's T5 token count, the one it was trained with
    (set by `load_pipeline` and `build_base_model`, else read from the metadata beside the pipeline)."""
    from diffusers import StableDiffusion3Pipeline

    if not isinstance(pipe, StableDiffusion3Pipeline):
        return {}
    length = getattr(pipe, "world_max_sequence_length", None)
    if length is None and pipe.name_or_path and _read_meta(pipe.name_or_path) is not None:
        length = max_sequence_length_of(pipe.name_or_path)
    if length is None:
        # The pipeline's default (256 zero tokens) would swamp the caption's attention: never guess it.
        raise ValueError("an SD3 pipeline needs its world's max_sequence_length: load it with load_pipeline")
    return {"max_sequence_length": length}


# --------------------------------------------------------------------------------------------------------------
# Sampling, preference pairs, evaluation
# --------------------------------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(pipe, captions, seeds, num_inference_steps, guidance_scale, batch_size=64):
    """One image per (caption, seed) pair, float (N, S, S, 3) in [0, 1], quantised to uint8 levels, at the
    pipeline's own size (the UNet's or transformer's sample size times the VAE's scale factor).

    Each image's initial noise comes from its own seeded generator, so an image does not depend on the batch it
    was drawn in, and two pipelines sampled with the same seeds start from the same noise. Quantising makes the
    reward of a sample equal the reward of its PNG.
    """
    pipe.set_progress_bar_config(disable=True)
    layout = _layout_kwargs(pipe)
    out = []
    for i in range(0, len(captions), batch_size):
        chunk = list(captions[i : i + batch_size])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch_size]]
        images = pipe(
            chunk,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            generator=generators,
            output_type="np",
            **layout,
        ).images
        out.append(np.round(images * 255).astype(np.uint8))
    return np.concatenate(out) / 255.0


def _label(reward_0, reward_1):
    """Pick-a-Pic label_0: 1 if image 0 is preferred, 0 if image 1 is, 0.5 on an exact tie."""
    return 1.0 if reward_0 > reward_1 else 0.0 if reward_0 < reward_1 else 0.5


def write_pairs_parquet(folder, captions, images_0, images_1, labels):
    """Write `folder/train-00000-of-00001.parquet` in Pick-a-Pic v2 layout; images uint8 (N, S, S, 3)."""
    rows = [
        {"caption": caption, "jpg_0": encode_png(x0), "jpg_1": encode_png(x1), "label_0": float(label)}
        for caption, x0, x1, label in zip(captions, images_0, images_1, labels, strict=True)
    ]
    write_pickapic_parquet(folder, rows)


# Pair seeds start here so they never coincide with evaluation seeds (small integers).
PAIR_SEED_OFFSET = 1_000_000


def sample_pair_images(
    pipe,
    num_pairs,
    num_inference_steps=NUM_INFERENCE_STEPS,
    guidance_scale=GUIDANCE_SCALE,
    cache_path=None,
    fingerprint="",
):
    """Two samples per prompt (different seeds), prompts cycling through ALL_CAPTIONS.

    Returns (captions (N,), images_0, images_1 each (N, S, S, 3) in [0, 1]). With `cache_path` (an .npz), the
    samples are stored there and read back while the settings and `fingerprint` (the base model's) match, so pair
    sets labelled by other rewards, or with flipped labels, share the same images.
    """
    settings = json.dumps(
        {
            "num_pairs": num_pairs,
            "num_inference_steps": num_inference_steps,
            "guidance_scale": guidance_scale,
            "base": fingerprint,
        },
        sort_keys=True,
    )
    captions = [ALL_CAPTIONS[i % len(ALL_CAPTIONS)] for i in range(num_pairs)]
    if cache_path is not None and os.path.exists(cache_path):
        stored = np.load(cache_path)
        if str(stored["settings"]) == settings:
            return captions, stored["images_0"] / 255.0, stored["images_1"] / 255.0
    seeds = PAIR_SEED_OFFSET + np.arange(2 * num_pairs)
    images = sample_images(pipe, captions + captions, seeds, num_inference_steps, guidance_scale)
    images_0, images_1 = images[:num_pairs], images[num_pairs:]
    if cache_path is not None:

        def to_uint8(x):
            return np.round(x * 255).astype(np.uint8)

        np.savez(cache_path, settings=settings, images_0=to_uint8(images_0), images_1=to_uint8(images_1))
    return captions, images_0, images_1


def make_preference_pairs(
    pipe,
    folder,
    num_pairs,
    reward_name=DEFAULT_REWARD,
    num_inference_steps=NUM_INFERENCE_STEPS,
    guidance_scale=GUIDANCE_SCALE,
    fingerprint="",
    flip_labels=False,
    image_cache=None,
    log=print,
):
    """Sample two images per prompt from `pipe` (different seeds), label them by the reward, write parquet.

    Prompts cycle through ALL_CAPTIONS. Skipped if `folder` already holds pairs with the same fingerprint (pass
    the base model's fingerprint so new base models invalidate old pairs). `flip_labels` prefers the lower reward
    (the control: training on it must not raise the reward). `image_cache`: see `sample_pair_images`. Returns the
    pair metadata.
    """
    settings = {
        "num_pairs": num_pairs,
        "reward": reward_name,
        "num_inference_steps": num_inference_steps,
        "guidance_scale": guidance_scale,
        "base": fingerprint,
        "world_version": WORLD_VERSION,
        "flip_labels": flip_labels,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    meta = _read_meta(folder)
    if meta is not None and meta.get("fingerprint") == key:
        log(f"Preference pairs {folder} are up to date (fingerprint {key}).")
        return meta

    start = time.time()
    captions, images_0, images_1 = sample_pair_images(
        pipe, num_pairs, num_inference_steps, guidance_scale, image_cache, fingerprint
    )
    rewards_0 = reward_of(reward_name, images_0, captions)
    rewards_1 = reward_of(reward_name, images_1, captions)
    if flip_labels:
        rewards_0, rewards_1 = rewards_1, rewards_0
    labels = [_label(r0, r1) for r0, r1 in zip(rewards_0, rewards_1)]

    def to_uint8(x):
        return np.round(x * 255).astype(np.uint8)

    write_pairs_parquet(folder, captions, to_uint8(images_0), to_uint8(images_1), labels)
    gap = np.abs(rewards_0 - rewards_1)
    meta = {
        "fingerprint": key,
        "settings": settings,
        "seconds": round(time.time() - start, 1),
        "label_counts": {str(v): labels.count(v) for v in (1.0, 0.0, 0.5)},
        "reward_std": round(float(np.concatenate([rewards_0, rewards_1]).std()), 4),
        "mean_reward_gap": round(float(gap.mean()), 4),
        "median_reward_gap": round(float(np.median(gap)), 4),
        "fidelity": fidelity(np.concatenate([images_0, images_1]), captions + captions),
    }
    _write_meta(folder, meta)
    log(f"Wrote {num_pairs} preference pairs to {folder}: {json.dumps(meta)}")
    return meta


def eval_prompts(num_seeds):
    """The fixed evaluation set: every caption with seeds 0..num_seeds-1. Returns (captions, seeds), each N."""
    captions = [c for c in ALL_CAPTIONS for _ in range(num_seeds)]
    seeds = [s for _ in ALL_CAPTIONS for s in range(num_seeds)]
    return captions, seeds


def evaluate(
    pipe,
    captions,
    seeds,
    reward_name=DEFAULT_REWARD,
    num_inference_steps=NUM_INFERENCE_STEPS,
    guidance_scale=GUIDANCE_SCALE,
):
    """Sample `pipe` once per (captions[i], seeds[i]) and score the samples.

    Returns {"images": (N, S, S, 3), "captions", "rewards": (N,), "mean_reward", "fidelity", "quality"}.
    """
    images = sample_images(pipe, captions, seeds, num_inference_steps, guidance_scale)
    rewards = reward_of(reward_name, images, captions)
    return {
        "images": images,
        "captions": list(captions),
        "rewards": rewards,
        "mean_reward": float(rewards.mean()),
        "fidelity": fidelity(images, captions),
        "quality": quality(images),
    }


def evaluate_lora(pipe, lora_dir, captions, seeds, **kwargs):
    """`evaluate` with the LoRA in `lora_dir` loaded into `pipe`, which is restored afterwards."""
    pipe.load_lora_weights(lora_dir)
    try:
        return evaluate(pipe, captions, seeds, **kwargs)
    finally:
        pipe.unload_lora_weights()


def win_rate(rewards, base_rewards):
    """Fraction of paired samples (same caption and seed) where `rewards` beat `base_rewards`; ties count ½."""
    rewards, base_rewards = np.asarray(rewards), np.asarray(base_rewards)
    return float(np.mean((rewards > base_rewards) + 0.5 * (rewards == base_rewards)))
