import torch


def test_nt_xent_falls_when_same_concept_maps_align():
    from composers.clora import nt_xent_loss

    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(64, generator=gen), torch.rand(64, generator=gen)
    labels = torch.tensor([0, 0, 1, 1])
    noisy = torch.stack([a, torch.rand(64, generator=gen), b, torch.rand(64, generator=gen)])
    aligned = torch.stack([a, a + 0.01 * torch.rand(64, generator=gen), b, b + 0.01 * torch.rand(64, generator=gen)])
    assert nt_xent_loss(aligned, labels) < nt_xent_loss(noisy, labels)

