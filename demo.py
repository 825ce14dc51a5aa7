"""Offline demo: build a tiny SD pipeline and a tiny Pick-a-Pic dataset, train InPO on them, compare before/after.

Nothing is downloaded. The tiny models are saved with `save_pretrained` and the dataset as parquet, so the training
script loads them through exactly the code path it uses for `stable-diffusion-v1-5` and `pickapic_v2`.

    python demo.py --output_dir demo_out

The builders below are also what the tests use.
"""

import argparse
import io
import json
import os
import subprocess
import sys

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


def _generate(pipe, prompt, seed):
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=10, generator=generator, output_type="np", height=32, width=32).images[0]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="demo_out")
    parser.add_argument("--max_train_steps", type=int, default=20)
    args = parser.parse_args()

    model_dir = build_tiny_sd(os.path.join(args.output_dir, "tiny-sd"))
    data_dir = build_tiny_pickapic(os.path.join(args.output_dir, "tiny-pickapic"), num_pairs=16)
    lora_dir = os.path.join(args.output_dir, "inpo-lora")
    here = os.path.dirname(os.path.abspath(__file__))
    command = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--num_processes",
        "1",
        os.path.join(here, "train_inpo.py"),
        "--pretrained_model_name_or_path",
        model_dir,
        "--dataset_name",
        data_dir,
        "--output_dir",
        lora_dir,
        "--resolution",
        "32",
        "--train_batch_size",
        "2",
        "--max_train_steps",
        str(args.max_train_steps),
        "--learning_rate",
        "1e-3",
        "--beta_dpo",
        "500",
        "--rank",
        "4",
        "--seed",
        "0",
        "--report_to",
        "none",
    ]
    print("Running:", " ".join(command), flush=True)
    subprocess.run(command, check=True)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None)
    prompt = DEMO_CAPTIONS[0]
    before = _generate(pipe, prompt, seed=0)
    pipe.load_lora_weights(lora_dir)
    after = _generate(pipe, prompt, seed=0)
    grid = (np.concatenate([before, after], axis=1) * 255).round().astype(np.uint8)
    grid_path = os.path.join(args.output_dir, "before_after.png")
    Image.fromarray(grid).resize((256, 128), Image.NEAREST).save(grid_path)
    print(f"Mean |after - before| pixel change: {np.abs(after - before).mean():.4f}")
    print(f"LoRA: {lora_dir}; before | after image for {prompt!r}: {grid_path}")


if __name__ == "__main__":
    main()
