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

