"""Token grounding (TokenCompose's token loss) for training the bundled model."""
import json
import random

import torch

from studio import paths
from studio.toyworld import model as toymodel
from studio.toyworld.grounding import (
    grounded_layers,
    object_token_positions,
    token_grounding_loss,
)
from studio.toyworld.render import random_scene
from studio.toyworld.train import BaseTrainConfig, train_base

TINY = dict(vae_steps=2, vae_batch_size=2, batch_size=2, checkpoint_every=1, warmup=1)


def test_each_object_is_grounded_by_its_own_words():
    tokenizer = toymodel.build_tokenizer(paths.TOKENIZER)
    scene = random_scene(random.Random(4), n_objects=2)
    ids = tokenizer(scene.caption()).input_ids
    targets = object_token_positions(tokenizer, scene)
    for (obj, phrase), (box, positions) in zip(scene.phrases(), targets):
        assert box == obj.box
        words = tokenizer.decode([ids[p] for p in positions]).split()
        assert words == [w for w in phrase.split() if w not in ("a", "on", "in", "the")]


def test_grounding_loss_is_zero_inside_the_box_and_large_outside():
    box = (0.0, 0.0, 0.5, 0.5)  # the top-left quarter of a 4×4 map: queries 0, 1, 4, 5
    probs = torch.full((1, 2, 16, 3), 1e-9)
    probs[0, :, [0, 1, 4, 5], 1] = 1.0
    assert token_grounding_loss({"layer": probs}, [[(box, [1])]], (4, 4)) < 1e-6
    uniform = torch.full((1, 2, 16, 3), 1 / 3)
    assert torch.isclose(token_grounding_loss({"layer": uniform}, [[(box, [1])]], (4, 4)), torch.tensor(0.75 ** 2))
    assert token_grounding_loss({"layer": uniform}, [[]], (4, 4)) == 0  # a dropped caption grounds nothing


def test_training_with_grounding_lowers_the_grounding_loss():
    from attention.controller import CompositionController
    from attention.processors import install_processors
    from attention.store import AttentionStore

    torch.manual_seed(0)
    tokenizer = toymodel.build_tokenizer(paths.TOKENIZER)
    unet, text_encoder = toymodel.build_unet(), toymodel.build_text_encoder()
    store = AttentionStore(grounded_layers(unet), keep_grad=True)
    install_processors(unet, CompositionController(latent_size=(32, 32), store=store))
    scenes = [random_scene(random.Random(i), n_objects=1) for i in range(2)]
    ids = tokenizer([s.caption() for s in scenes], padding="max_length", max_length=77, return_tensors="pt").input_ids
    targets = [object_token_positions(tokenizer, s) for s in scenes]
    latents, t = torch.randn(2, 4, 32, 32), torch.tensor([500, 900])
    opt = torch.optim.Adam(list(unet.parameters()) + list(text_encoder.parameters()), lr=1e-3)
    losses = []
    for _ in range(8):
        store.clear()
        unet(latents, t, text_encoder(ids)[0])
        loss = token_grounding_loss({layer: m for (layer, _), m in store.maps.items()}, targets, (32, 32))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert len(store.maps) == len(grounded_layers(unet)) == 6  # down_blocks.1-2, two in each of up_blocks.1-2
    assert losses[-1] < 0.7 * losses[0], losses


def test_grounding_is_logged_and_may_be_added_to_a_run_from_its_checkpoint_on(tmp_path):
    train_base(tmp_path, paths.TOKENIZER, BaseTrainConfig(steps=2, **TINY), progress=False)
    early = BaseTrainConfig(steps=3, grounding_weight=0.1, grounding_start=1, **TINY)  # before the checkpoint: refused
    train_base(tmp_path, paths.TOKENIZER, early, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["grounding_weight"] == 0.0
    added = BaseTrainConfig(steps=4, grounding_weight=0.1, grounding_start=3, **TINY)
    train_base(tmp_path, paths.TOKENIZER, added, progress=False)
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["grounding_weight"], config["grounding_start"]) == (0.1, 3)
    lines = [line.split() for line in (tmp_path / "loss.log").read_text().splitlines()]
    assert [len(line) for line in lines] == [2, 2, 2, 3]  # step 3 logs its grounding loss too

    from typer.testing import CliRunner

    from studio.cli import app

    result = CliRunner().invoke(app, ["toyworld", "train", "--workdir", str(tmp_path), "--steps", "4",
                                      "--grounding-weight", "0.2", "--grounding-start", "1"])
    assert result.exit_code == 0, result.output
    assert "continues with its own grounding (weight 0.1 from step 3)" in result.output
