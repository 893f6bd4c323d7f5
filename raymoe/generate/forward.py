"""The main model's logits without a cache: exactly the training forward, for evaluation and parity checks.

Legend: B batch, T tokens, D model dim, V vocab.
"""

from __future__ import annotations

import torch

from raymoe.model.transformer import Transformer


def hidden_states(model: Transformer, tokens_BT: torch.Tensor) -> torch.Tensor:
    """The last block's output h_BTD (what the final norm and the MTP module read)."""
    h_BTD = model.embed(tokens_BT)
    rope = model.rope.tables(tokens_BT.shape[1], h_BTD.device)
    for layer in model.layers:
        h_BTD, _ = layer(h_BTD, rope)
    return h_BTD


def logits(model: Transformer, tokens_BT: torch.Tensor) -> torch.Tensor:
    """Next-token logits (B, T, V) in fp32 for every position of ``tokens_BT``."""
    return model.head(model.norm(hidden_states(model, tokens_BT))).float()
