"""Helpers shared by test modules (fixtures live in conftest.py)."""
import torch

from studio.spec import Composition

CONCEPT_PROMPT = "a large solid red sks on the left, white background"
WORD_PROMPT = "a large red rngd circle in the centre, white background"


def plain_latents(pipe, prompt, seed=0, steps=3, guidance=5.0, height=64, width=64):
    """What plain diffusers gives for the prompt: the reference every method must reproduce without LoRAs."""
    generator = torch.Generator().manual_seed(seed)
    return pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, generator=generator, height=height,
                width=width, output_type="latent").images


def spec(method, loras=(), steps=3, **kw):
    return Composition(prompt=kw.pop("prompt", CONCEPT_PROMPT), steps=steps, guidance=5.0, seed=0, method=method,
                       loras=list(loras), **kw)


def encode(pipe, prompt=WORD_PROMPT):
    """The text encoder's output for a prompt, learnt words spelt out as the pipeline spells them."""
    ids = pipe.tokenizer(pipe.maybe_convert_prompt(prompt, pipe.tokenizer), padding="max_length", max_length=77,
                         return_tensors="pt").input_ids
    with torch.no_grad():
        return pipe.text_encoder(ids)[0]
