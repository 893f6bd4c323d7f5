"""The MLA inference cache: per layer, only the compressed KV latent and the shared RoPE key.

Legend: L cached layers, B batch rows, S slots, T new slots, C kv_lora_rank, R qk_rope_head_dim.

What MLA caches (DeepSeek-V2 section 2.1, V3 section 2.1.1): keys and values are both up-projected from one
latent ``c_kv`` (C numbers per token), and position enters through one RoPE key shared by all heads (R numbers),
so a token costs ``C + R`` numbers per layer, against ``H * (qk_head_dim + v_head_dim)`` for a multi-head cache
of the same model. We cache the latent after its RMSNorm (what the up-projection reads) and the key after RoPE.

Slots, not positions. Every forward appends T slots to every row, and a slot can be marked invalid afterwards:
left padding of shorter prompts, and a speculative draft the main model rejected. Attention masks invalid slots,
so rows of a batch can advance by different numbers of tokens without moving any memory; a row's RoPE position
is tracked by the caller. A query always sees its own slot (a padding slot would otherwise see nothing at all).
"""

from __future__ import annotations

import torch


class MLACache:
    def __init__(self, *, num_layers: int, batch: int, capacity: int, kv_lora_rank: int, rope_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.latent_LBSC = torch.zeros(num_layers, batch, capacity, kv_lora_rank, dtype=dtype, device=device)
        self.rope_key_LBSR = torch.zeros(num_layers, batch, capacity, rope_dim, dtype=dtype, device=device)
        self.valid_BS = torch.zeros(batch, capacity, dtype=torch.bool, device=device)
        self.length = 0
        """Slots used so far (the same for every row)."""
        self.start = 0
        """First slot of the forward in progress (``open`` .. ``close``)."""

    @property
    def capacity(self) -> int:
        return self.valid_BS.shape[1]

    def open(self, valid_BT: torch.Tensor) -> torch.Tensor:
        """Reserve T slots for a forward; returns its attention mask (B, T, length + T)."""
        num_new = valid_BT.shape[1]
        if self.length + num_new > self.capacity:
            raise ValueError(f"MLA cache full: {self.length} + {num_new} slots > capacity {self.capacity}")
        self.start = self.length
        end = self.length + num_new
        self.valid_BS[:, self.start : end] = valid_BT
        slots_S = torch.arange(end, device=valid_BT.device)
        queries_T = torch.arange(self.start, end, device=valid_BT.device)
        causal_TS = slots_S[None, :] <= queries_T[:, None]
        own_TS = slots_S[None, :] == queries_T[:, None]
        return (self.valid_BS[:, None, :end] & causal_TS[None]) | own_TS[None]

    def write(self, layer: int, latent_BTC: torch.Tensor, rope_key_BTR: torch.Tensor
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's entries of ``layer``; returns everything cached there, (B, S, C) and (B, S, R)."""
        end = self.start + latent_BTC.shape[1]
        self.latent_LBSC[layer, :, self.start : end] = latent_BTC
        self.rope_key_LBSR[layer, :, self.start : end] = rope_key_BTR
        return self.latent_LBSC[layer, :, :end], self.rope_key_LBSR[layer, :, :end]

    def close(self, num_new: int) -> None:
        self.length = self.start + num_new

    def invalidate(self, rows_B: torch.Tensor, slot: int) -> None:
        """Mark ``slot`` of the rows ``rows_B`` (bool) as never written: a rejected draft."""
        self.valid_BS[:, slot] &= ~rows_B


def mla_cache_bytes_per_token(cfg, *, num_layers: int, element_bytes: int) -> int:
    """Bytes one token occupies in the MLA cache: the latent and the shared RoPE key, per layer."""
    return num_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * element_bytes


def mha_cache_bytes_per_token(cfg, *, num_layers: int, element_bytes: int) -> int:
    """The same for a standard multi-head cache of this model: every head's full key and value."""
    return num_layers * cfg.num_heads * (cfg.qk_head_dim + cfg.v_head_dim) * element_bytes
