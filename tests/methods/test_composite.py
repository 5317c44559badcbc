import torch

from studio.compose import compose, prepared_session
from studio.spec import Composition, LoraEntry

PROMPT = "a large solid red circle on the left, white background"


def spec(method, loras=(), steps=3, **kw):
    return Composition(prompt=PROMPT, steps=steps, guidance=5.0, seed=0, method=method, loras=list(loras), **kw)


def test_composite_averages_per_lora_predictions(tiny_pipe, tiny_loras):
    from studio.engine import unet_pass
    from studio.lora.inject import only_adapters

    entries = [LoraEntry(file=str(tiny_loras["alpha"]), weight=0.9), LoraEntry(file=str(tiny_loras["beta"]))]
    with prepared_session(tiny_pipe, spec("composite", entries)) as (session, composer):
        tiny_pipe.scheduler.set_timesteps(3)
        t = tiny_pipe.scheduler.timesteps[0]
        latents = torch.randn(1, 4, 32, 32, generator=torch.Generator().manual_seed(1))
        fused = composer.predict(session, latents, 0, t)
        session.controller.adapter_batch_rows = {}  # the reference: one ordinary pass per LoRA
        uncond, cond = [], []
        for name in session.adapters:
            with only_adapters(tiny_pipe, [name]):
                conditioning = session.encode([PROMPT], [""], text_adapters=[name])
                out = unet_pass(tiny_pipe, torch.cat([latents, latents]), t, conditioning)
            uncond.append(out[:1])
            cond.append(out[1:])
        u, c = torch.stack(uncond).mean(0), torch.stack(cond).mean(0)
        assert torch.allclose(fused, u + 5.0 * (c - u), atol=1e-5)
        assert composer.passes(session) == 2.0
    sequential = compose(tiny_pipe, spec("composite", entries, params={"batched": False})).latents
    batched = compose(tiny_pipe, spec("composite", entries)).latents
    assert torch.allclose(sequential, batched, atol=1e-4)

