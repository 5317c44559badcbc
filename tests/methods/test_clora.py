import torch


def test_nt_xent_falls_when_same_concept_maps_align():
    from composers.clora import nt_xent_loss

    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, generator=gen), torch.rand(64, generator=gen)
    labels = torch.tensor([0, 0, 1, 1])
    noisy = torch.stack([a, torch.rand(64, generator=gen), b, torch.rand(64, generator=gen)])
    aligned = torch.stack([a, a + 0.01 * torch.rand(64, generator=gen), b, b + 0.01 * torch.rand(64, generator=gen)])
    assert nt_xent_loss(aligned, labels) < nt_xent_loss(noisy, labels)



def test_every_token_position_belongs_to_one_concept_only():
    from composers.clora import deal_tokens

    # "a red woman on the left and a blue woman on the right": both LoRAs are bound to "woman" (positions 3 and 9)
    both = [(3,), (9,)]
    assert deal_tokens([both, both]) == {0: [3], 1: [9]}
    # a concept's own trigger is its own; a shared subject word then goes to the other concept
    assert deal_tokens([[(2,), (9,)], [(9,)]]) == {0: [2], 1: [9]}
    # a learnt word of two vectors stays one occurrence
    assert deal_tokens([[(4, 5)], [(4, 5), (11,)]]) == {0: [4, 5], 1: [11]}
    # more claimants than occurrences: the later concept gets nothing rather than a contradictory positive
    assert deal_tokens([[(3,)], [(3,)]]) == {0: [3]}


def test_no_positive_pair_gives_a_nan_loss_that_clora_says_it_cannot_use():

    from composers.clora import nt_xent_loss

    one_each = torch.rand(2, 16)
    assert torch.isnan(nt_xent_loss(one_each, torch.tensor([0, 1])))  # what guidance would have stepped on


def test_a_concepts_mask_is_the_union_of_its_tokens_thresholded_maps():
    from composers.clora import token_mask_union

    strong, weak = torch.zeros(4, 4), torch.zeros(4, 4)
    strong[0, 0] = 10.0
    weak[3, 3] = 1.0
    mask = token_mask_union(torch.stack([strong, weak]), 0.3)
    assert mask[0, 0] == 1 and mask[3, 3] == 1 and mask.sum() == 2  # a sum thresholded at 0.3·10 loses the weak token
    summed = strong + weak
    assert (summed > 0.3 * summed.max()).sum() == 1


def _two_concepts(tiny_loras, **params):
    from studio.spec import Composition, LoraEntry

    entries = [LoraEntry(file=str(tiny_loras["alpha"]), trigger_words=["sks"],
                         prompt="a large solid red sks on the left and a large solid blue shape on the right"),
               LoraEntry(file=str(tiny_loras["beta"]), trigger_words=["ohwx"],
                         prompt="a large solid red shape on the left and a large solid blue ohwx on the right")]
    return Composition(prompt="a large solid red shape on the left and a large solid blue shape on the right",
                       steps=2, guidance=5.0, seed=0, method="clora", loras=entries,
                       params={"max_iter": 1, "inner_iters": 1, **params})


def test_clora_refuses_a_composition_with_no_pair_to_pull_together_and_guides_with_subjects(tiny_pipe, tiny_loras):
    import pytest

    from studio.compose import compose
    from studio.errors import PresetError
    from studio.lora.inject import lora_layers

    with pytest.raises(PresetError, match="no two tokens of one concept"):
        compose(tiny_pipe, _two_concepts(tiny_loras))
    assert not lora_layers(tiny_pipe)
    result = compose(tiny_pipe, _two_concepts(tiny_loras, subjects=["shape", "shape"]))
    losses = result.info["guidance_losses"]
    assert losses and all(torch.isfinite(torch.tensor(losses)))
