import torch

from studio.compose import compose
from studio.spec import Composition, LoraEntry

PROMPT = "a large solid red circle on the left, white background"


def spec(method, loras=(), steps=3, **kw):
    return Composition(prompt=PROMPT, steps=steps, guidance=5.0, seed=0, method=method, loras=list(loras), **kw)


def test_decor_identity_full_removal_and_word_tokens_only(tiny_pipe):
    from studio.decor import decor_bases, decor_transform, project_out, word_token_rows
    from studio.engine import encode

    rows = word_token_rows(tiny_pipe.tokenizer, tiny_pipe.text_encoder, "striped cat")
    n_words = len(tiny_pipe.tokenizer("striped cat", add_special_tokens=False).input_ids)
    ids = tiny_pipe.tokenizer("striped cat", padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        full = tiny_pipe.text_encoder(ids)[0][0]
    assert rows.shape[0] == n_words and torch.equal(rows, full[1:1 + n_words])  # no BOS / EOS / PAD rows
    (features, basis), = decor_bases(tiny_pipe, ["striped cat"])
    assert basis.shape[1] == n_words
    cond = encode(tiny_pipe, [PROMPT], [""], 64, 64)
    assert torch.equal(decor_transform(tiny_pipe, ["striped cat"], 0.0)(cond, True).embeds, cond.embeds)
    removed = decor_transform(tiny_pipe, ["striped cat"], 1.0)(cond, True).embeds
    assert torch.equal(removed[0], cond.embeds[0])  # the unconditional row is untouched
    assert (removed[1] @ basis).abs().max() < 1e-4
    half = project_out(cond.embeds[1], basis, 0.5)
    assert torch.allclose(half @ basis, 0.5 * (cond.embeds[1] @ basis), atol=1e-4)


def test_decor_runs_on_top_of_a_method_and_per_lora(tiny_pipe, tiny_loras):
    plain = compose(tiny_pipe, spec("merge")).latents
    decor = compose(tiny_pipe, spec("merge", decor=["red"], decor_strength=1.0)).latents
    assert not torch.allclose(plain, decor)
    entry = LoraEntry(file=str(tiny_loras["gamma"]), role="style", decor=["circle"])
    per_lora = compose(tiny_pipe, spec("regional", [entry])).latents
    without = compose(tiny_pipe, spec("regional", [LoraEntry(file=str(tiny_loras["gamma"]), role="style")])).latents
    assert not torch.allclose(per_lora, without)

