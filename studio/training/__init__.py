"""Training code shared by every trainer: the shapes world's LoRA trainer, B4M break and make.

`step`: one diffusion training step's noise, timestep, target and loss; `words`: a trigger learnt as a new
word (pivotal tuning); `plp`: B4M's partly-learnable-projection adapters; `datasets`: folders of images with
their captions; `b4m`: break, make and the joint fine-tune."""
from __future__ import annotations

import shlex


def command_line(words: str, options: dict) -> str:
    """The command recorded in a trained file (`ss_training_comment`): `words` then each option that is set —
    True as a flag, False or None left out, a float in its shortest form, a list as the option repeated."""
    parts = words.split()
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            parts.append(flag)
            continue
        for item in value if isinstance(value, (list, tuple)) else [value]:
            parts += [flag, f"{item:g}" if isinstance(item, float) else str(item)]
    return shlex.join(parts)
