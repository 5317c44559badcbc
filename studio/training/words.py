"""A trigger learnt as a word of its own (pivotal tuning; kohya and A1111 bundle it in the LoRA file), shared by
the LoRA trainer and B4M break."""
from __future__ import annotations

import torch

from studio.errors import StudioError


def check_new_word(tokenizer, trigger: str) -> None:
    """A learnt word must be new to the tokenizer and one word of letters and digits; refused before any work."""
    if trigger in tokenizer.get_vocab() or not trigger.isalnum():
        raise StudioError(f"A learnt embedding needs a made-up word of letters and digits as its trigger, and "
                          f"{trigger!r} is not one (it is a token of the tokenizer already, or not one word).")


class TriggerWord:
    """The trigger as a new token of the pipeline's tokenizer, its input embedding learnt with the LoRA. It starts
    at the mean of the embeddings of the pieces the tokenizer split the word into; only its row of the embedding
    table trains. `finish()` returns the learnt vector (1, width) and removes the token again. Callers refuse a
    trigger that is no new word (`check_new_word`) before they touch the pipeline."""

    def __init__(self, pipe, trigger: str):
        self.pipe, self.trigger = pipe, trigger
        tokenizer, encoder = pipe.tokenizer, pipe.text_encoder
        pieces = tokenizer(trigger, add_special_tokens=False).input_ids
        start = encoder.get_input_embeddings().weight.detach()[pieces].mean(0, keepdim=True)
        pipe.load_textual_inversion(start, token=trigger, tokenizer=tokenizer, text_encoder=encoder)
        self.table = encoder.get_input_embeddings().weight
        self.row = tokenizer.convert_tokens_to_ids(trigger)
        only_row = torch.zeros(self.table.shape[0], 1, dtype=self.table.dtype)
        only_row[self.row] = 1
        self.table.requires_grad_(True)
        self._hook = self.table.register_hook(lambda grad: grad * only_row)

    def finish(self) -> torch.Tensor:
        from studio.lora.embeddings import unload_words

        self._hook.remove()
        self.table.requires_grad_(False)
        vector = self.table.detach()[self.row:self.row + 1].clone()
        unload_words(self.pipe, "text_encoder", [self.trigger])
        self.pipe.text_encoder.get_input_embeddings().requires_grad_(False)  # a new table: frozen as the rest was
        return vector
