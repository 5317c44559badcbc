import torch

from attention.masks import box_mask, isolation_mask


def _maps(centre):
    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    return torch.exp(-((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2) / 8.0)


def test_isolation_mask_blocks_other_boxes_only():
    a, b = torch.zeros(2, 4), torch.zeros(2, 4)
    a[:, :2] = 1
    b[:, 3:] = 1
    allowed = isolation_mask([a, b])  # tokens 0-1 / 4-5 in a, 3 / 7 in b, 2 / 6 background
    assert not allowed[0, 3] and not allowed[3, 0] and allowed[0, 1] and allowed[0, 2]
    assert allowed[2].all() and allowed[6].all()


def test_each_lora_composer_loss_prefers_a_box_centred_map():
    from composers.lora_composer import (
        concept_enhancement_loss,
        fill_loss,
        region_restriction_loss,
    )

    box = box_mask((0.0, 0.25, 0.5, 0.75), 16, 16)  # rows 4-11, cols 0-7
    centred, off = _maps((7.5, 3.5)), _maps((7.5, 12.5))
    assert concept_enhancement_loss(centred, box) < concept_enhancement_loss(off, box)
    assert fill_loss(centred, box) < fill_loss(off, box)
    inside = box.flatten() > 0.5
    keys_in = torch.softmax(torch.where(inside, 4.0, 0.0).expand(256, 256), -1)
    keys_out = torch.softmax(torch.where(inside, 0.0, 4.0).expand(256, 256), -1)
    assert region_restriction_loss(keys_in, box) < region_restriction_loss(keys_out, box)



def test_region_restriction_is_ten_times_the_mean_of_the_top_k_individual_leaks():
    from composers.lora_composer import region_restriction_loss

    box = torch.zeros(2, 5)
    box[:, :2] = 1  # 4 queries inside (tokens 0, 1, 5, 6), 6 keys outside; k = ⌊0.2 · 4⌋ → at least 1
    probs = torch.zeros(10, 10)
    probs[0, 2], probs[0, 3], probs[1, 9], probs[5, 4] = 0.5, 0.25, 0.4, 0.1
    probs[2, 0] = 0.9  # a query outside the box: never counted
    assert torch.isclose(region_restriction_loss(probs, box), torch.tensor(10 * 0.5))
    big = torch.zeros(4, 5)
    big[:, :3] = 1  # 12 queries inside, 8 keys outside: k = ⌊0.2 · 12⌋ = 2
    probs = torch.zeros(20, 20)
    probs[0, 3], probs[5, 4], probs[10, 8] = 0.3, 0.2, 0.1
    probs[1, 19] = 0.05
    # the mean of the two largest single probabilities, not of per-query sums
    assert torch.isclose(region_restriction_loss(probs, big), torch.tensor(10 * (0.3 + 0.2) / 2))


def test_the_official_guidance_schedule_stops_after_step_25_or_when_the_loss_rises_from_step_5():
    from composers.lora_composer import keeps_guiding

    def guided_steps(losses, last_step=25, early_stop=True):
        guided, previous = [], None
        for step, loss in enumerate(losses):
            guided.append(step)
            if not keeps_guiding(step, loss, previous, last_step, early_stop):
                break
            previous = loss
        return guided

    falling = [100.0 - i for i in range(50)]
    assert guided_steps(falling) == list(range(26))  # 26 guided steps: 0..25
    rises_early = [5.0, 6.0, 7.0, 4.0, 3.0, 2.0, 2.5, 1.0]
    assert guided_steps(rises_early) == [0, 1, 2, 3, 4, 5, 6]  # a rise before step 5 is allowed; at 6 it stops
    assert guided_steps(rises_early, early_stop=False) == list(range(8))


def test_fill_loss_reads_the_smoothed_map():
    from composers.lora_composer import fill_loss, gaussian_smooth

    box = box_mask((0.0, 0.25, 0.5, 0.75), 16, 16)
    spiky = torch.zeros(16, 16)
    spiky[4:12:2, 0:8:2] = 1.0
    smoothed = gaussian_smooth(spiky)
    assert not torch.isclose(fill_loss(smoothed, box), fill_loss(spiky, box))


def test_the_official_cross_attention_mode_never_applies_a_concepts_query_delta():
    from attention.controller import CompositionController

    ctrl = CompositionController((8, 8), regional_layers="cross_attention")
    ctrl.adapter_regions["a"] = torch.ones(8, 8)
    delta = torch.ones(1, 64, 4)
    for layer, expect_zero in (("unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_q", True),
                               ("unet.down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q", True),
                               ("unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_out.0", False)):
        gate = ctrl.lora_gate(layer, "a", delta)
        assert bool((gate == 0).all()) == expect_zero, layer
    assert ctrl.lora_gate("unet.down_blocks.2.attentions.0.transformer_blocks.0.attn2.to_k", "a", delta) is None


def test_lora_composer_uses_the_trigger_else_the_class_noun_else_refuses(tiny_pipe, tiny_loras):
    import pytest

    from studio.compose import compose
    from studio.errors import PresetError
    from studio.spec import Composition, LoraEntry, Region

    def composition(**params):
        entry = LoraEntry(file=str(tiny_loras["gamma"]), region=Region(box=(0, 0, 0.5, 1)),
                          prompt="a large solid red circle on the left, white background")
        return Composition(prompt="a large solid red circle on the left, white background", steps=2, seed=0,
                           method="lora_composer", loras=[entry], params={"guidance_steps": 1, **params})

    before = {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()}
    with pytest.raises(PresetError, match="needs each concept's trigger word, or its class noun"):
        compose(tiny_pipe, composition())
    assert {k: type(v) for k, v in tiny_pipe.unet.attn_processors.items()} == before  # nothing left half set up
    result = compose(tiny_pipe, composition(subjects=["circle"]))
    assert result.masks
