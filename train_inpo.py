#!/usr/bin/env python
"""InPO (Inversion Preference Optimization, CVPR 2025) for Stable Diffusion 1.x / 2.x.

    accelerate launch train_inpo.py \\
      --pretrained_model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
      --dataset_name yuvalkirstain/pickapic_v2 --output_dir inpo-sd15-lora

Stages: arguments → models → data → the training step (`InpoStep`) → the loop → saving. The math lives in
inpo_utils.py; this file holds only what is particular to SD 1.x/2.x (one CLIP text encoder, no added conditions).
"""

import argparse

import torch
from accelerate.logging import get_logger
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from diffusers.utils.torch_utils import is_compiled_module
from transformers import CLIPTextModel, CLIPTokenizer

import inpo_utils

logger = get_logger(__name__)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    inpo_utils.add_training_args(parser, default_beta=2000.0, default_resolution=512, default_output_dir="inpo-lora")
    args = parser.parse_args(argv)
    inpo_utils.validate_training_args(args)
    return args


def load_models(args, accelerator):
    """Tokenizer, text encoder and VAE (frozen, in the mixed-precision dtype) and the UNet (fp32, to be set up)."""
    common = dict(revision=args.revision, cache_dir=args.cache_dir)
    weights = dict(common, variant=args.variant, use_safetensors=True)
    tokenizer = CLIPTokenizer.from_pretrained(args.pretrained_model_name_or_path, subfolder="tokenizer", **common)
    text_encoder = CLIPTextModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="text_encoder",
                                                 **weights)  # fmt: skip
    vae = AutoencoderKL.from_pretrained(args.pretrained_model_name_or_path, subfolder="vae", **weights)
    unet = UNet2DConditionModel.from_pretrained(args.pretrained_model_name_or_path, subfolder="unet", **weights)
    weight_dtype = inpo_utils.weight_dtype_of(accelerator)
    for frozen in (text_encoder, vae):
        frozen.requires_grad_(False).to(accelerator.device, dtype=weight_dtype).eval()
    return tokenizer, text_encoder, vae, unet


class InpoStep:
    """One micro-batch of B pairs → (loss, metrics). The SD-specific part is encoding images and captions."""

    def __init__(self, args, accelerator, unet, reference, tokenizer, text_encoder, vae, inverse_scheduler, randomness):
        self.args = args
        self.accelerator = accelerator
        self.unet = unet
        self.reference = reference
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.vae = vae
        self.inverse_scheduler = inverse_scheduler
        self.generator = randomness.generator

    @torch.no_grad()
    def encode_images(self, pixel_values):
        """(2B, 3, R, R) in [−1, 1] → (2B, 4, R/8, R/8) scaled latents, in chunks to bound VAE memory."""
        chunks = pixel_values.to(self.vae.device, self.vae.dtype).split(self.args.vae_encode_batch_size)
        latents = [self.vae.encode(chunk).latent_dist.sample(generator=self.generator) for chunk in chunks]
        return torch.cat(latents) * self.vae.config.scaling_factor

    @torch.no_grad()
    def encode_captions(self, captions):
        """B captions → (B, 77, D) CLIP hidden states; a --proportion_empty_prompts share of captions become ''."""
        drop = torch.rand(len(captions), generator=self.generator, device=self.generator.device)
        captions = ["" if dropped else caption for caption, dropped in zip(captions, drop < self.args.proportion_empty_prompts)]
        ids = self.tokenizer(captions, max_length=self.tokenizer.model_max_length, padding="max_length",
                             truncation=True, return_tensors="pt").input_ids  # fmt: skip
        return self.text_encoder(ids.to(self.text_encoder.device))[0]

    def __call__(self, batch):
        x0 = self.encode_images(batch["pixel_values"])
        encoder_hidden_states = self.encode_captions(batch["captions"]).repeat(2, 1, 1)
        policy = self.accelerator.unwrap_model(self.unet)
        inversion_unet = policy if self.args.inversion_model == "policy" else self.reference
        with self.accelerator.autocast():
            return inpo_utils.inpo_step_loss(
                self.unet, self.reference, inversion_unet, x0, encoder_hidden_states, self.inverse_scheduler,
                self.args.beta_dpo, latent_source=self.args.latent_source, eta=self.args.inversion_eta,
                endpoint=self.args.inversion_endpoint, generator=self.generator,
            )  # fmt: skip


def make_pipeline(args, accelerator, **components):
    pipeline = StableDiffusionPipeline.from_pretrained(
        args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant, cache_dir=args.cache_dir,
        safety_checker=None, requires_safety_checker=False, torch_dtype=inpo_utils.weight_dtype_of(accelerator),
        use_safetensors=True, **components,
    )  # fmt: skip
    return pipeline.to(accelerator.device)


def main(argv=None):
    args = parse_args(argv)
    accelerator = inpo_utils.make_accelerator(args)
    logger.info(accelerator.state, main_process_only=False)

    # Cheap checks first: model family and prediction type from configs, then the data.
    scheduler_config = inpo_utils.check_model_family(args.pretrained_model_name_or_path, args.revision,
                                                     args.cache_dir, want_sdxl=False)  # fmt: skip
    with accelerator.main_process_first():
        dataset = inpo_utils.load_preference_dataset(args.dataset_name, args.dataset_split_name, args.cache_dir,
                                                     args.max_train_samples, args.seed, log=logger.info)  # fmt: skip
    seed = 0 if args.seed is None else args.seed

    # Models.
    tokenizer, text_encoder, vae, unet = load_models(args, accelerator)
    unet, reference, trainable = inpo_utils.setup_policy_and_reference(unet, args, accelerator)
    inverse_scheduler = inpo_utils.make_inverse_scheduler(scheduler_config, args.inversion_steps)
    inpo_utils.register_checkpoint_hooks(accelerator, args, StableDiffusionPipeline)
    randomness = inpo_utils.StepRandomness(seed + accelerator.process_index, accelerator.device)
    accelerator.register_for_checkpointing(randomness)

    # Data.
    pairs = inpo_utils.PreferencePairs(dataset, args.resolution, args.random_crop, not args.no_hflip, seed)
    dataloader = torch.utils.data.DataLoader(pairs, batch_size=args.train_batch_size, shuffle=True,
                                             collate_fn=inpo_utils.collate_pairs,
                                             num_workers=args.dataloader_num_workers, drop_last=False)  # fmt: skip

    # Optimisation.
    if args.scale_lr:
        args.learning_rate *= args.train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    optimizer = inpo_utils.make_optimizer(trainable, args)
    inpo_utils.resolve_max_train_steps(args, len(dataloader) / accelerator.num_processes)
    lr_scheduler = inpo_utils.make_lr_scheduler(optimizer, args, accelerator.num_processes)
    unet, optimizer, dataloader, lr_scheduler = accelerator.prepare(unet, optimizer, dataloader, lr_scheduler)
    if accelerator.is_main_process:
        accelerator.init_trackers(args.tracker_name, {k: v for k, v in vars(args).items() if k != "hub_token"
                                                      and not isinstance(v, list)})  # fmt: skip

    step = InpoStep(args, accelerator, unet, reference, tokenizer, text_encoder, vae, inverse_scheduler, randomness)

    def validate(global_step):
        if accelerator.is_main_process:
            policy = accelerator.unwrap_model(unet)
            pipeline = make_pipeline(args, accelerator, unet=policy, vae=vae, text_encoder=text_encoder,
                                     tokenizer=tokenizer)  # fmt: skip
            inpo_utils.log_validation_images(accelerator, pipeline, args.validation_prompts, args.seed,
                                             args.resolution, global_step)  # fmt: skip
            unet.train()

    inpo_utils.train_loop(accelerator, args, unet, optimizer, lr_scheduler, dataloader, pairs, step, validate,
                          trainable)  # fmt: skip

    # Save: diffusers-format LoRA (or the full pipeline), then validation with the saved weights and a model card.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        policy = accelerator.unwrap_model(unet)
        if is_compiled_module(policy):
            policy = policy._orig_mod
        images = None
        if args.train_mode == "lora":
            StableDiffusionPipeline.save_lora_weights(args.output_dir, unet_lora_layers=inpo_utils.lora_layers(policy))
            if args.run_validation:
                pipeline = make_pipeline(args, accelerator)
                pipeline.load_lora_weights(args.output_dir)
                images = inpo_utils.log_validation_images(accelerator, pipeline, args.validation_prompts, args.seed,
                                                          args.resolution, args.max_train_steps, tag="final")  # fmt: skip
        else:
            pipeline = make_pipeline(args, accelerator, unet=policy.to(inpo_utils.weight_dtype_of(accelerator)))
            pipeline.save_pretrained(args.output_dir)
            if args.run_validation:
                images = inpo_utils.log_validation_images(accelerator, pipeline, args.validation_prompts, args.seed,
                                                          args.resolution, args.max_train_steps, tag="final")  # fmt: skip
        inpo_utils.write_model_card(args, args.output_dir, images)
        if args.push_to_hub:
            inpo_utils.push_output_to_hub(args)
    accelerator.end_training()


if __name__ == "__main__":
    main()
