"""Batched generation with the MLA cache, plain or with MTP speculative decoding, streamed as it goes.

Legend: B prompts (rows), T tokens, E vocab.

Plain decoding: one main-model forward per new token. Speculative (``speculative=True``, DeepSeek-V3 section
5.4.3): the MTP module drafts token P+1 from the main model's hidden state at P-1 and token P; one main forward
over [token P, draft] yields the true distribution at P+1 (verifying the draft) and, if the draft holds, at P+2.
So a forward emits 2 tokens when the draft is accepted and 1 when not; a rejected draft's cache slot is marked
invalid (``MLACache.invalidate``), which lets rows of one batch advance at different speeds. The MTP module keeps
its own one-layer MLA cache; it runs on both new positions each round (the second only counts if accepted).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from raymoe.data.tokenizer import EOS_ID, PAD_ID
from raymoe.generate.decode import main_step, mtp_step, new_cache
from raymoe.generate.sampling import SamplingConfig, distribution, draw, speculative_choice
from raymoe.model.transformer import Transformer


@dataclass
class GenerationStats:
    prompt_tokens: int = 0
    new_tokens: int = 0
    seconds: float = 0.0
    main_forwards: int = 0
    drafted: int = 0
    accepted: int = 0

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.seconds if self.seconds else 0.0

    @property
    def acceptance(self) -> float:
        """Share of MTP drafts (the second token of a round) the main model accepted."""
        return self.accepted / self.drafted if self.drafted else 0.0


class Generator:
    def __init__(self, model: Transformer, *, sampling: SamplingConfig | None = None,
                 speculative: bool = False, stop_at_eos: bool = True) -> None:
        """``model`` has its routing biases set (``set_routing_biases``); it is put in eval mode."""
        if speculative and model.mtp_depth == 0:
            raise ValueError("--speculative mtp needs a model with an MTP module (mtp.depth >= 1), this one has none")
        self.model = model.eval()
        self.sampling = sampling = sampling or SamplingConfig()  # greedy
        self.speculative = speculative
        self.stop_at_eos = stop_at_eos
        self.generator = torch.Generator().manual_seed(sampling.seed)
        self.stats = GenerationStats()

    def generate(self, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        outputs: list[list[int]] = [[] for _ in prompts]
        for new in self.stream(prompts, max_new_tokens):
            for out, tokens in zip(outputs, new):
                out.extend(tokens)
        return outputs

    def stream(self, prompts: list[list[int]], max_new_tokens: int) -> Iterator[list[list[int]]]:
        """Yield, per round, the new tokens of every row (an empty list for a row with nothing new)."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("every prompt needs at least one token")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        start = time.perf_counter()
        self.stats.prompt_tokens += sum(len(p) for p in prompts)
        self._out = [[] for _ in prompts]
        self._done = [False] * len(prompts)
        self._max = max_new_tokens
        rounds = self._speculative(prompts) if self.speculative else self._plain(prompts)
        for new in rounds:
            new = self._emit(new)
            self.stats.seconds = time.perf_counter() - start
            yield new
            if all(self._done):
                return

    # -- the two loops ----------------------------------------------------------------------------------------------
    def _prefill(self, prompts, capacity_per_token: int):
        batch, longest = len(prompts), max(len(p) for p in prompts)
        tokens_BT = torch.full((batch, longest), PAD_ID, dtype=torch.long)
        valid_BT = torch.zeros(batch, longest, dtype=torch.bool)
        positions_BT = torch.zeros(batch, longest, dtype=torch.long)
        for b, prompt in enumerate(prompts):  # left padding: every row's last prompt token is in the last column
            tokens_BT[b, longest - len(prompt):] = torch.tensor(prompt)
            valid_BT[b, longest - len(prompt):] = True
            positions_BT[b, longest - len(prompt):] = torch.arange(len(prompt))
        capacity = longest + capacity_per_token * self._max + 2
        cache = new_cache(self.model, num_layers=len(self.model.layers), batch=batch, capacity=capacity)
        h_BTD, logits_BTE = main_step(self.model, tokens_BT, positions_BT, valid_BT, cache)
        self.stats.main_forwards += 1
        first_B = self._draw(logits_BTE[:, -1])
        next_position_B = torch.tensor([len(p) for p in prompts])
        return cache, (tokens_BT, positions_BT, valid_BT, h_BTD), first_B, next_position_B

    def _plain(self, prompts) -> Iterator[list[list[int]]]:
        cache, _, last_B, position_B = self._prefill(prompts, 1)
        yield [[t] for t in last_B.tolist()]
        ones_B1 = torch.ones(len(prompts), 1, dtype=torch.bool)
        while True:
            _, logits_BTE = main_step(self.model, last_B[:, None], position_B[:, None], ones_B1, cache)
            self.stats.main_forwards += 1
            last_B, position_B = self._draw(logits_BTE[:, 0]), position_B + 1
            yield [[t] for t in last_B.tolist()]

    def _speculative(self, prompts) -> Iterator[list[list[int]]]:
        model, sampling = self.model, self.sampling
        cache, (tokens_BT, positions_BT, valid_BT, h_BTD), last_B, position_B = self._prefill(prompts, 2)
        yield [[t] for t in last_B.tolist()]
        mtp_cache = new_cache(model, num_layers=1, batch=len(prompts), capacity=cache.capacity)
        next_BT = torch.cat([tokens_BT[:, 1:], last_B[:, None]], dim=1)  # the token after each prompt position
        q_BE = distribution(mtp_step(model, h_BTD, next_BT, positions_BT, valid_BT, mtp_cache)[:, -1], sampling)
        draft_B = draw(q_BE, self.generator)
        ones_B2 = torch.ones(len(prompts), 2, dtype=torch.bool)
        while True:
            pair_BT = torch.stack([position_B, position_B + 1], dim=1)
            h_BTD, logits_BTE = main_step(model, torch.stack([last_B, draft_B], dim=1), pair_BT, ones_B2, cache)
            self.stats.main_forwards += 1
            p1_BE, p2_BE = distribution(logits_BTE[:, 0], sampling), distribution(logits_BTE[:, 1], sampling)
            accepted_B, first_B = speculative_choice(p1_BE, q_BE, draft_B, self.generator)
            second_B = draw(p2_BE, self.generator)
            cache.invalidate(~accepted_B, cache.length - 1)  # the draft's slot, where it was wrong
            active = [not d for d in self._done]
            self.stats.drafted += sum(active)
            self.stats.accepted += sum(a and ok for a, ok in zip(active, accepted_B.tolist()))

            mtp_logits_BTE = mtp_step(model, h_BTD, torch.stack([first_B, second_B], dim=1), pair_BT, ones_B2,
                                      mtp_cache)
            mtp_cache.invalidate(~accepted_B, mtp_cache.length - 1)
            q_BE = distribution(torch.where(accepted_B[:, None], mtp_logits_BTE[:, 1], mtp_logits_BTE[:, 0]),
                                sampling)
            draft_B = draw(q_BE, self.generator)
            last_B = torch.where(accepted_B, second_B, first_B)
            position_B = position_B + 1 + accepted_B.long()
            yield [[a, b] if ok else [a] for a, b, ok in zip(first_B.tolist(), second_B.tolist(),
                                                               accepted_B.tolist())]

    # -- helpers ----------------------------------------------------------------------------------------------------
    def _draw(self, logits_BE: torch.Tensor) -> torch.Tensor:
        return draw(distribution(logits_BE, self.sampling), self.generator)

    def _emit(self, new: list[list[int]]) -> list[list[int]]:
        """Keep each unfinished row's tokens up to EOS (included) or the budget; finished rows get nothing."""
        kept = []
        for b, tokens in enumerate(new):
            row = []
            for token in tokens:
                if self._done[b]:
                    break
                row.append(token)
                self._out[b].append(token)
                if len(self._out[b]) >= self._max or (self.stop_at_eos and token == EOS_ID):
                    self._done[b] = True
            self.stats.new_tokens += len(row)
            kept.append(row)
        return kept
