#!/usr/bin/env python
"""InPO (Inversion Preference Optimization, CVPR 2025) for Stable Diffusion XL.

    accelerate launch train_inpo_sdxl.py \\
      --pretrained_model_name_or_path stabilityai/stable-diffusion-xl-base-1.0 \\
      --pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix \\
      --dataset_name yuvalkirstain/pickapic_v2 --output_dir inpo-sdxl-lora

Stages: arguments → frozen models → the training step (`SDXLInpoStep`); `inpo_utils.run` loads the data, runs
the loop (or precomputes the inversion cache) and saves.
This file holds only what is particular to SDXL: two text encoders, pooled text embeddings and size/crop
micro-conditioning ("time ids").
"""

import argparse

import torch
from diffusers import AutoencoderKL, StableDiffusionXLPipeline
from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

import inpo_utils


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=inpo_utils.HelpFormatter)
    inpo_utils.add_training_args(
        parser, default_beta=5000.0, default_resolution=1024, default_output_dir="inpo-sdxl-lora"
    )
    group = parser.add_argument_group("SDXL")
    group.add_argument(
        "--pretrained_vae_model_name_or_path",
        default=None,
        help="A VAE that is stable in fp16 (madebyollin/sdxl-vae-fp16-fix). Without it the base VAE "
        "runs in fp32 under fp16 training.",
    )
    group.add_argument(
        "--fixed_time_ids",
        action="store_true",
        help="Condition every image on (res, res, 0, 0, res, res) as the InPO authors do, instead of "
        "its real original size and crop.",
    )
    args = parser.parse_args(argv)
    inpo_utils.validate_training_args(args)
    return args


def sdxl_time_ids(original_sizes, crop_top_lefts, resolution):
    """SDXL micro-conditioning per image: (orig_h, orig_w, crop_top, crop_left, target_h, target_w).

    Args: original_sizes, crop_top_lefts (N, 2) long, as `inpo_utils.resize_and_crop` reports them.
    Returns: (N, 6) float.
    """
    target = torch.tensor([resolution, resolution]).expand(len(original_sizes), 2)
    return torch.cat([original_sizes, crop_top_lefts, target], dim=1).float()


def load_frozen_models(args, accelerator):
    """Both tokenizers and text encoders and the VAE, frozen, keyed by their pipeline names."""
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    weights = inpo_utils.weight_loading_kwargs(args)
    path = args.pretrained_model_name_or_path
    frozen = {
        "tokenizer": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common),
        "tokenizer_2": CLIPTokenizer.from_pretrained(path, subfolder="tokenizer_2", **common),
        "text_encoder": CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights),
        "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", **weights),
    }
    if args.pretrained_vae_model_name_or_path:
        frozen["vae"] = AutoencoderKL.from_pretrained(
            args.pretrained_vae_model_name_or_path, **dict(weights, revision=None, variant=None)
        )
    else:
        frozen["vae"] = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)

    weight_dtype = inpo_utils.weight_dtype_of(accelerator)
    for encoder in (frozen["text_encoder"], frozen["text_encoder_2"]):
        encoder.requires_grad_(False).to(accelerator.device, dtype=weight_dtype).eval()
    # The original SDXL VAE overflows in fp16; only a VAE made for it (the fp16-fix) runs in half precision.
    vae_dtype = (
        torch.float32 if weight_dtype == torch.float16 and not args.pretrained_vae_model_name_or_path else weight_dtype
    )
    frozen["vae"].requires_grad_(False).to(accelerator.device, dtype=vae_dtype).eval()
    return frozen


class SDXLInpoStep(inpo_utils.InpoStep):
    """The SDXL part of a step: penultimate hidden states of both encoders, pooled embedding, time ids."""

    def __init__(self, tokenizers, text_encoders, **kwargs):
        super().__init__(**kwargs)
        self.tokenizers = tokenizers
        self.text_encoders = text_encoders

    @torch.no_grad()
    def encode_conditioning(self, batch):
        captions = self.drop_captions(batch["captions"])
        hidden_states = []
        for tokenizer, encoder in zip(self.tokenizers, self.text_encoders):
            ids = tokenizer(
                captions,
                max_length=tokenizer.model_max_length,
                padding="max_length",
                truncation=True,
                return_tensors="pt",
            ).input_ids
            output = encoder(ids.to(encoder.device), output_hidden_states=True)
            hidden_states.append(output.hidden_states[-2])
        pooled = output[0]  # text_embeds of the projection encoder, as SDXL pipelines use it
        if self.args.fixed_time_ids:
            resolution = self.args.resolution
            time_ids = torch.tensor([[resolution, resolution, 0, 0, resolution, resolution]] * 2 * len(captions))
        else:
            time_ids = sdxl_time_ids(batch["original_sizes"], batch["crop_top_lefts"], self.args.resolution)
        added_cond_kwargs = {
            "text_embeds": pooled.repeat(2, 1),
            "time_ids": time_ids.to(pooled.device, pooled.dtype),
        }
        return torch.cat(hidden_states, dim=-1).repeat(2, 1, 1), added_cond_kwargs


def make_pipeline(args, accelerator, **components):
    """The base SDXL pipeline with `components` (e.g. the trained UNet) swapped in, for validation and saving."""
    pipeline = StableDiffusionXLPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        torch_dtype=inpo_utils.weight_dtype_of(accelerator),
        **inpo_utils.weight_loading_kwargs(args),
        **components,
    )
    return pipeline.to(accelerator.device)


SDXL = inpo_utils.ModelFamily(
    is_sdxl=True,
    pipeline_cls=StableDiffusionXLPipeline,
    load_frozen_models=load_frozen_models,
    make_step=lambda frozen, **kwargs: SDXLInpoStep(
        [frozen["tokenizer"], frozen["tokenizer_2"]],
        [frozen["text_encoder"], frozen["text_encoder_2"]],
        vae=frozen["vae"],
        **kwargs,
    ),
    make_pipeline=make_pipeline,
)


def main(argv=None):
    inpo_utils.run(parse_args(argv), SDXL)


if __name__ == "__main__":
    main()
