#!/usr/bin/env python
"""InPO (Inversion Preference Optimization, CVPR 2025) for Stable Diffusion 1.x / 2.x.

    accelerate launch train_inpo.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --dataset_name yuvalkirstain/pickapic_v2 --output_dir inpo-sd15-lora

Stages: arguments → frozen models → the training step (`SDInpoStep`); `inpo_utils.run` loads the data, runs the
loop (or precomputes the inversion cache) and saves.
This file holds only what is particular to SD 1.x/2.x: one CLIP text encoder, no added conditions.
"""

import argparse

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline
from transformers import CLIPTextModel, CLIPTokenizer

import inpo_utils


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=inpo_utils.HelpFormatter)
    inpo_utils.add_training_args(parser, default_beta=2000.0, default_resolution=512, default_output_dir="inpo-lora")
    args = parser.parse_args(argv)
    inpo_utils.validate_training_args(args)
    return args


def load_frozen_models(args, accelerator):
    """Tokenizer, text encoder and VAE, frozen in the mixed-precision dtype, keyed by their pipeline names."""
    common = {"revision": args.revision, "cache_dir": args.cache_dir}
    weights = inpo_utils.weight_loading_kwargs(args)
    path = args.pretrained_model_name_or_path
    tokenizer = CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **common)
    text_encoder = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", **weights)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **weights)
    weight_dtype = inpo_utils.weight_dtype_of(accelerator)
    for frozen in (text_encoder, vae):
        frozen.requires_grad_(False).to(accelerator.device, dtype=weight_dtype).eval()
    return {"tokenizer": tokenizer, "text_encoder": text_encoder, "vae": vae}


class SDInpoStep(inpo_utils.InpoStep):
    """The SD part of a step: one CLIP text encoder's last hidden states, no added conditions."""

    def __init__(self, tokenizer, text_encoder, **kwargs):
        super().__init__(**kwargs)
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder

    @torch.no_grad()
    def encode_conditioning(self, batch):
        captions = self.drop_captions(batch["captions"])
        ids = self.tokenizer(
            captions,
            max_length=self.tokenizer.model_max_length,
            padding="max_length",
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden_states = self.text_encoder(ids.to(self.text_encoder.device))[0]
        return hidden_states.repeat(2, 1, 1), None  # both images of a pair share the caption


def make_pipeline(args, accelerator, **components):
    """The base SD pipeline with `components` (e.g. the trained UNet) swapped in, for validation and saving."""
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path,
        safety_checker=None,
        requires_safety_checker=False,
        torch_dtype=inpo_utils.weight_dtype_of(accelerator),
        **inpo_utils.weight_loading_kwargs(args),
        **components,
    )
    return pipeline.to(accelerator.device)


SD = inpo_utils.ModelFamily(
    is_sdxl=False,
    pipeline_cls=StableDiffusionPipeline,
    load_frozen_models=load_frozen_models,
    make_step=lambda frozen, **kwargs: SDInpoStep(
        frozen["tokenizer"], frozen["text_encoder"], vae=frozen["vae"], **kwargs
    ),
    make_pipeline=make_pipeline,
)


def main(argv=None):
    inpo_utils.run(parse_args(argv), SD)


if __name__ == "__main__":
    main()
