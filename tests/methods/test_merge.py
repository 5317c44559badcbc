import torch

from studio.compose import compose
from studio.spec import Composition, LoraEntry

PROMPT = "a large solid red circle on the left, white background"


def spec(method, loras=(), steps=3, **kw):
    return Composition(prompt=PROMPT, steps=steps, guidance=5.0, seed=0, method=method, loras=list(loras), **kw)


def test_merge_is_the_exact_sum_of_deltas_in_every_layer(tiny_pipe, tiny_loras):
    from studio.lora import load_lora
    from studio.lora.inject import attach_lora, detach_lora, lora_layers

    a, b = load_lora(tiny_loras["alpha"]), load_lora(tiny_loras["beta"])
    attach_lora(tiny_pipe, a, "a", 0.7)
    attach_lora(tiny_pipe, b, "b", -0.4)
    try:
        for name, layer in list(lora_layers(tiny_pipe).items())[:40]:
            component, _, target = name.partition(".")
            weight = layer.base.weight
            expected = weight.clone()
            for lora, w in ((a, 0.7), (b, -0.4)):
                module = lora.modules.get((component, target))
                if module is not None:
                    expected += w * module.delta_weight(weight)
            if isinstance(layer.base, torch.nn.Linear):
                x = torch.randn(3, weight.shape[1])
                want = torch.nn.functional.linear(x, expected, layer.base.bias)
            else:
                x = torch.randn(1, weight.shape[1], 6, 6)
                want = torch.nn.functional.conv2d(x, expected, layer.base.bias, layer.base.stride, layer.base.padding)
            assert torch.allclose(layer(x), want, atol=1e-5), name
    finally:
        detach_lora(tiny_pipe, "a")
        detach_lora(tiny_pipe, "b")


def test_merge_equals_diffusers_set_adapters(tiny_pipe, tiny_loras):
    from studio.lora import load_lora

    entries = [LoraEntry(file=str(tiny_loras["alpha"]), weight=0.7), LoraEntry(file=str(tiny_loras["beta"]), weight=0.5)]
    ours = compose(tiny_pipe, spec("merge", entries)).latents
    tiny_pipe.load_lora_weights(load_lora(tiny_loras["alpha"]).to_peft_state_dict(), adapter_name="a")
    tiny_pipe.load_lora_weights(load_lora(tiny_loras["beta"]).to_peft_state_dict(), adapter_name="b")
    try:
        tiny_pipe.set_adapters(["a", "b"], [0.7, 0.5])
        generator = torch.Generator().manual_seed(0)
        theirs = tiny_pipe(PROMPT, num_inference_steps=3, guidance_scale=5.0, generator=generator,
                           output_type="latent").images
    finally:
        tiny_pipe.unload_lora_weights()
    assert (ours - theirs).abs().max() < 1e-5

