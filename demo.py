"""Offline demo: preference-tune a toy text-to-image model with InPO and watch the preferred property rise.

    python demo.py                                  # reward: background brightness
    python demo.py --reward edge_sharpness

The toy model is the alignment benchmark's (benchmarks/assets/world_base_model: 32 px coloured shapes, an SD-layout
pipeline trained from scratch). The demo samples preference pairs from it, labels each pair by the reward, trains a
LoRA with `accelerate launch train_inpo.py` and its default settings, loads the LoRA with `load_lora_weights` and
compares samples before and after on the same seeds (benchmarks/run_alignment.py does the work). Writes to
--output_dir a before/after grid, a reward curve and a table. Nothing is downloaded.

The tiny random-weight pipelines and Pick-a-Pic-layout datasets below are what the tests build.
"""

import argparse
import io
import json
import os
import shutil
import time

import numpy as np
import torch
from PIL import Image


# Characters the tiny BPE vocabulary can spell; any caption made of them tokenizes without <unk>.
_TINY_ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"

# 32 px images → 16x16 latents through the 2-level tiny VAE.
_TINY_UNET = {
    "sample_size": 16,
    "in_channels": 4,
    "out_channels": 4,
    "block_out_channels": (32, 64),
    "layers_per_block": 1,
    "norm_num_groups": 16,
}

HERE = os.path.dirname(os.path.abspath(__file__))
WORLD_BASE_MODEL = os.path.join(HERE, "benchmarks", "assets", "world_base_model")

DEMO_CAPTIONS = ["a red square", "a blue circle", "a green cat", "a yellow dog", "a white house", "a black tree"]


def write_tiny_clip_tokenizer(path, max_length=16):
    """A CLIPTokenizer over single characters (no merges): small enough for tests, real enough for the code path."""
    from transformers import CLIPTokenizer

    os.makedirs(path, exist_ok=True)
    tokens = ["<|startoftext|>", "<|endoftext|>"]
    tokens += list(_TINY_ALPHABET) + [c + "</w>" for c in _TINY_ALPHABET]
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


def _tiny_text_encoder(vocab_size, hidden_size, projection_dim=None, seed=0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        projection_dim=projection_dim or hidden_size,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    model_cls = CLIPTextModelWithProjection if projection_dim else CLIPTextModel
    return model_cls(config)


def _tiny_vae(seed=0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 16),
        latent_channels=4,
        norm_num_groups=8,
        sample_size=32,
    )


def _tiny_scheduler(prediction_type):
    from diffusers import DDIMScheduler

    # The SD 1.5 schedule and conventions (scaled_linear betas, steps_offset=1, no clipping).
    return DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
        prediction_type=prediction_type,
    )


def build_tiny_sd(path, prediction_type="epsilon", seed=0):
    """Save a tiny StableDiffusionPipeline (32 px images, 16x16 latents) to `path`; return `path`."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"))
    text_encoder = _tiny_text_encoder(len(tokenizer), hidden_size=32, seed=seed)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
    )
    pipe = StableDiffusionPipeline(
        unet=unet,
        vae=_tiny_vae(seed),
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        scheduler=_tiny_scheduler(prediction_type),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(path)
    return path


def build_tiny_sdxl(path, seed=0):
    """Save a tiny StableDiffusionXLPipeline (two text encoders, text_time conditioning) to `path`."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    tokenizer = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer"))
    tokenizer_2 = write_tiny_clip_tokenizer(os.path.join(path, "tokenizer_2"))
    text_encoder = _tiny_text_encoder(len(tokenizer), hidden_size=32, seed=seed)
    text_encoder_2 = _tiny_text_encoder(len(tokenizer_2), hidden_size=32, projection_dim=32, seed=seed + 1)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        **_TINY_UNET,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,  # concatenated hidden states of both encoders
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=32 + 6 * 8,  # pooled text + 6 time ids
    )
    pipe = StableDiffusionXLPipeline(
        unet=unet,
        vae=_tiny_vae(seed),
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer_2,
        scheduler=_tiny_scheduler("epsilon"),
    )
    pipe.save_pretrained(path)
    return path


def encode_png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def build_tiny_pickapic(path, num_pairs=8, image_size=(40, 48), seed=0, split="train", extra_rows=()):
    """Write `<path>/<split>-00000-of-00001.parquet` in Pick-a-Pic v2 layout; the last row is always a tie.

    Images are random colour fields (brighter one preferred), `image_size` is (height, width) and deliberately
    not square so crops and resizes are exercised. `extra_rows` are appended as given (for bad-input tests).
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(num_pairs):
        caption = DEMO_CAPTIONS[i % len(DEMO_CAPTIONS)]
        bright = rng.integers(128, 256, size=(*image_size, 3), dtype=np.uint8)
        dark = rng.integers(0, 128, size=(*image_size, 3), dtype=np.uint8)
        bright_first = bool(i % 2)
        rows.append(
            {
                "caption": caption,
                "jpg_0": encode_png(bright if bright_first else dark),
                "jpg_1": encode_png(dark if bright_first else bright),
                "label_0": 1.0 if bright_first else 0.0,
            }
        )
    tie = dict(rows[0], label_0=0.5)
    rows.append(tie)
    rows.extend(extra_rows)
    os.makedirs(path, exist_ok=True)
    table = pa.Table.from_pylist(
        rows,
        schema=pa.schema(
            [("caption", pa.string()), ("jpg_0", pa.binary()), ("jpg_1", pa.binary()), ("label_0", pa.float64())]
        ),
    )
    pq.write_table(table, os.path.join(path, f"{split}-00000-of-00001.parquet"))
    return path


def run_alignment_demo(output_dir, reward, max_train_steps, num_pairs):
    """Preference-tune the shipped toy model toward `reward` with train_inpo.py's defaults; fall back to showing
    Diffusion-DPO beside it when the default does not raise the reward. Returns run_alignment's results."""
    from benchmarks import alignment_world as world
    from benchmarks import run_alignment

    base_dir = os.path.join(output_dir, "base_model")
    if not os.path.isdir(base_dir):
        shutil.copytree(WORLD_BASE_MODEL, base_dir)  # same fingerprint as BaseModelConfig(): loaded, not rebuilt
    argv = [
        "--out_dir",
        output_dir,
        "--reward",
        reward,
        "--methods",
        "default",
        "--num_pairs",
        str(num_pairs),
        "--num_inference_steps",
        "10",
        "--max_train_steps",
        str(max_train_steps),
        "--eval_every",
        str(max(1, max_train_steps // 2)),
        "--eval_seeds",
        "2",
        "--train_batch_size",
        "8",
        "--learning_rate",
        "1e-3",
        "--beta_dpo",
        "5000",
    ]
    results = run_alignment.main(argv, model_config=world.BaseModelConfig())
    if results["default"]["rows"][-1]["mean_reward"] <= results["base"]["rows"][0]["mean_reward"]:
        print("The default InPO settings did NOT raise this reward; running Diffusion-DPO on the same pairs too.")
        argv.insert(argv.index("default") + 1, "diffusion_dpo")  # both in one table, plot and grid
        results = run_alignment.main(argv, model_config=world.BaseModelConfig())
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_out")
    parser.add_argument(
        "--reward",
        default="background_brightness",
        help="What the preference labels prefer: background_brightness (a brighter background; no caption "
        "names it) or edge_sharpness (crisper shape edges).",
    )
    parser.add_argument("--max_train_steps", type=int, default=40)
    parser.add_argument("--num_pairs", type=int, default=128)
    args = parser.parse_args(argv)
    start = time.time()
    results = run_alignment_demo(args.output_dir, args.reward, args.max_train_steps, args.num_pairs)
    base = results["base"]["rows"][0]
    print(f"\nReward `{args.reward}` of 24 samples (12 captions x 2 seeds, same seeds before and after):")
    for method in [m for m in results if m != "base"]:
        tuned = results[method]["rows"][-1]
        print(
            f"  {method}: reward {base['mean_reward']:.3f} -> {tuned['mean_reward']:.3f}, win rate vs base "
            f"{tuned['win_rate']:.2f} (ties 1/2), caption colour fidelity {base['fidelity']:.2f} -> {tuned['fidelity']:.2f}"
        )
    prefix = os.path.join(args.output_dir, f"alignment_{args.reward}_seed0")
    print(f"Before/after grid: {prefix}_grid.png, reward curve: {prefix}_reward.png ({time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
