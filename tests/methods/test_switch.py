from studio.compose import compose
from studio.spec import Composition, LoraEntry

PROMPT = "a large solid red circle on the left, white background"


def spec(method, loras=(), steps=3, **kw):
    return Composition(prompt=PROMPT, steps=steps, guidance=5.0, seed=0, method=method, loras=list(loras), **kw)


def test_switch_activates_the_scheduled_lora_at_each_step(tiny_pipe, tiny_loras, monkeypatch):
    from studio.lora.inject import LoraLayer

    seen = []
    original = LoraLayer.forward

    def recording(self, x, *args, **kwargs):
        if self.name == "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q":
            seen.append(tuple(self.active_adapters()))
        return original(self, x, *args, **kwargs)

    monkeypatch.setattr(LoraLayer, "forward", recording)
    entries = [LoraEntry(file=str(tiny_loras[n])) for n in ("alpha", "beta", "gamma")]
    result = compose(tiny_pipe, spec("switch", entries, steps=6, params={"switch_step": 2}))
    names = list(result.info["loras"])
    # the official callback switches after steps 2 and 4: the first LoRA runs steps 0-2
    assert result.info["schedule"] == [names[0], names[0], names[0], names[1], names[1], names[2]]
    assert seen == [(n,) for n in result.info["schedule"]]



def test_the_official_text_encoding_encodes_the_prompt_once(tiny_pipe, tiny_loras):
    entries = [LoraEntry(file=str(tiny_loras[n])) for n in ("alpha", "beta")]
    for method, params in (("switch", {"switch_step": 1}), ("composite", {})):
        official = compose(tiny_pipe, spec(method, entries, params={"text_encoding": "official", **params}))
        per_lora = compose(tiny_pipe, spec(method, entries, params=params))
        assert not bool((official.latents == per_lora.latents).all())
