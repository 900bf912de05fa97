"""Textual inversion (Gal et al. 2022): a new token per class, of which only the embedding row trains.

`DreamBooth(method="textual_inversion")` (`synaug.generators.stable_diffusion.dreambooth`) trains it; this file
holds the embedding that keeps the base vocabulary frozen. Each class's row is exported as
`textual_inversion/<class>/learned_embeds.safetensors`, loadable with `pipe.load_textual_inversion(folder)`.
"""

from __future__ import annotations

import torch
from torch import nn


class TokenEmbedding(nn.Module):
    """A token embedding with rows appended for new tokens: only `new` is a trainable parameter.

    Ids below `base.num_embeddings` read the frozen base table, the others `new`, so no optimizer state, weight
    decay or checkpoint ever touches the base vocabulary.
    """

    def __init__(self, base: nn.Embedding, new: torch.Tensor):
        super().__init__()
        self.base = base
        self.new = nn.Parameter(new)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.base.num_embeddings
        old = self.base(ids.clamp(max=n - 1))
        return torch.where((ids >= n)[..., None], self.new[(ids - n).clamp(min=0)].to(old.dtype), old)


def add_tokens(tokenizer, text_encoder: nn.Module, tokens: list[str], init_word: str) -> None:
    """Add `tokens` to the tokenizer and a `TokenEmbedding` row each to the text encoder, every row starting at
    the mean embedding of `init_word`'s tokens, as textual inversion starts from a related word."""
    taken = [t for t in tokens if t in tokenizer.get_vocab()]
    if taken:
        raise ValueError(f"textual inversion needs new tokens; {taken} are already in the vocabulary")
    base = text_encoder.get_input_embeddings()
    if base.num_embeddings != len(tokenizer):
        raise ValueError(f"the text encoder has {base.num_embeddings} embeddings for {len(tokenizer)} tokens")
    tokenizer.add_tokens(tokens)
    ids = tokenizer(init_word, add_special_tokens=False).input_ids
    init = base.weight[ids].mean(0).detach().float()
    text_encoder.set_input_embeddings(TokenEmbedding(base, init.repeat(len(tokens), 1)))
