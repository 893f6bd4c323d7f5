"""Typed configuration: one frozen, keyword-only dataclass per component.

Each component validates only its own fields in ``__post_init__``; ``Config`` checks the rules that span
components (experts divisible by ``ep``, batch divisible by ``dp * microbatches``, DualPipe shape rules...).
Every error is a ``ValueError`` that names the offending values, raised before any work starts.
omegaconf turns YAML presets and ``key=value`` overrides into these classes (see ``loader.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raymoe.config.checks import (
    MAX_LAYERS,
    MAX_MICROBATCHES,
    MAX_MTP_DEPTH,
    MAX_TIMEOUT_S,
    _at_most,
    _check_numbers,
    _non_negative,
    _one_of,
    _positive,
    check_path_shape,
    check_ray_address,
)

SCHEDULES = ("gpipe", "1f1b", "zb1p", "dualpipe", "dualpipev")
DTYPES = ("fp32", "bf16")
SCORE_FUNCS = ("sigmoid", "softmax")
FP8_BACKENDS = ("auto", "emulate", "scaled_mm")
DEVICES = ("cpu", "cuda")

@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Shape of the transformer: MLA attention, dense FFN for the first layers, DeepSeekMoE after."""

    vocab_size: int = 512
    dim: int = 128
    num_layers: int = 4
    num_dense_layers: int = 1
    """The first ``num_dense_layers`` layers use a dense FFN instead of MoE (DeepSeek-V3: 3)."""
    dense_inter_dim: int = 512
    moe_inter_dim: int = 64
    """Width of one routed (and one shared) expert's hidden layer."""
    num_routed_experts: int = 8
    num_shared_experts: int = 1
    num_heads: int = 4
    q_lora_rank: int = 0
    """Rank of the query down-projection; 0 means queries are projected directly (DeepSeek-V2-Lite)."""
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    """Per-head width of the decoupled RoPE key/query part; the RoPE key is shared by all heads."""
    v_head_dim: int = 32
    max_seq_len: int = 256
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    init_std: float = 0.02

    def __post_init__(self) -> None:
        _check_numbers(self, "model")
        _positive(
            "model",
            vocab_size=self.vocab_size,
            dim=self.dim,
            num_layers=self.num_layers,
            dense_inter_dim=self.dense_inter_dim,
            moe_inter_dim=self.moe_inter_dim,
            num_routed_experts=self.num_routed_experts,
            num_heads=self.num_heads,
            kv_lora_rank=self.kv_lora_rank,
            qk_nope_head_dim=self.qk_nope_head_dim,
            qk_rope_head_dim=self.qk_rope_head_dim,
            v_head_dim=self.v_head_dim,
            max_seq_len=self.max_seq_len,
            rope_theta=self.rope_theta,
            norm_eps=self.norm_eps,
            init_std=self.init_std,
        )
        _non_negative(
            "model",
            num_dense_layers=self.num_dense_layers,
            num_shared_experts=self.num_shared_experts,
            q_lora_rank=self.q_lora_rank,
        )
        _at_most("model", num_layers=(self.num_layers, MAX_LAYERS))
        if self.num_dense_layers > self.num_layers:
            raise ValueError(
                f"model.num_dense_layers ({self.num_dense_layers}) exceeds model.num_layers ({self.num_layers})"
            )
        if self.qk_rope_head_dim % 2:
            raise ValueError(f"model.qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    def is_moe_layer(self, layer_id: int) -> bool:
        return layer_id >= self.num_dense_layers


@dataclass(frozen=True, kw_only=True)
class RoutingConfig:
    """Gate semantics and auxiliary-loss-free load balancing (DeepSeek-V3 section 2.1.2)."""

    top_k: int = 2
    num_groups: int = 1
    """Experts are split into ``num_groups`` groups (nodes); tokens may only go to ``groups_kept`` of them."""
    groups_kept: int = 1
    route_scale: float = 1.0
    score_func: str = "sigmoid"
    bias_update_speed: float = 1e-3
    """gamma of the sign rule: bias_i += gamma * sign(mean_load - load_i) after each step."""
    bias_update_stop_tokens: int = -1
    """After this many training tokens gamma becomes 0 (the paper: 14.3T of 14.8T); -1 never stops."""
    seq_aux_alpha: float = 1e-4
    """Weight of the complementary sequence-wise balance loss."""

    def __post_init__(self) -> None:
        _check_numbers(self, "routing")
        _positive("routing", top_k=self.top_k, num_groups=self.num_groups, groups_kept=self.groups_kept)
        _positive("routing", route_scale=self.route_scale)
        _non_negative("routing", bias_update_speed=self.bias_update_speed, seq_aux_alpha=self.seq_aux_alpha)
        _one_of("routing", "score_func", self.score_func, SCORE_FUNCS)
        if self.groups_kept > self.num_groups:
            raise ValueError(f"routing.groups_kept ({self.groups_kept}) exceeds routing.num_groups ({self.num_groups})")
        if self.bias_update_stop_tokens < -1:
            raise ValueError(f"routing.bias_update_stop_tokens must be -1 or >= 0, got {self.bias_update_stop_tokens}")

    def gamma_at(self, tokens_seen: int) -> float:
        """Bias update speed after ``tokens_seen`` training tokens (the paper's two-phase schedule)."""
        if self.bias_update_stop_tokens >= 0 and tokens_seen >= self.bias_update_stop_tokens:
            return 0.0
        return self.bias_update_speed


@dataclass(frozen=True, kw_only=True)
class MtpConfig:
    """Multi-token prediction (DeepSeek-V3 section 2.2): ``depth`` sequential modules, weight lambda."""

    depth: int = 1
    loss_weight: float = 0.3
    late_loss_weight: float = 0.1
    late_after_tokens: int = -1
    """Switch lambda from ``loss_weight`` to ``late_loss_weight`` after this many tokens; -1 never."""

    def __post_init__(self) -> None:
        _check_numbers(self, "mtp")
        _non_negative("mtp", depth=self.depth, loss_weight=self.loss_weight, late_loss_weight=self.late_loss_weight)
        _at_most("mtp", depth=(self.depth, MAX_MTP_DEPTH))
        if self.late_after_tokens < -1:
            raise ValueError(f"mtp.late_after_tokens must be -1 or >= 0, got {self.late_after_tokens}")

    def weight_at(self, tokens_seen: int) -> float:
        if self.late_after_tokens >= 0 and tokens_seen >= self.late_after_tokens:
            return self.late_loss_weight
        return self.loss_weight


@dataclass(frozen=True, kw_only=True)
class PrecisionConfig:
    dtype: str = "fp32"
    """Parameter/compute dtype. CPUs without bf16 units run bf16 GEMMs ~50-100x slower, so fp32 is the CPU default."""
    fp8: bool = False
    """Run the GEMMs DeepSeek-V3 runs in FP8 (1x128 activation tiles, 128x128 weight blocks, E4M3)."""
    fp8_backend: str = "auto"
    fp8_power_of_two_scales: bool = False
    fp8_dispatch: bool = False
    """Expert parallelism: send tokens to their experts as E4M3 + 1x128 scales (the combine stays high precision)."""
    fp8_promotion_interval: int = 0
    """Emulate tensor-core limited-precision accumulation promoted to FP32 every N_C elements; 0 = exact FP32."""
    bf16_optimizer_states: bool = False
    """Keep AdamW moments in BF16 with FP32 master weights (the paper's choice)."""

    def __post_init__(self) -> None:
        _check_numbers(self, "precision")
        _one_of("precision", "dtype", self.dtype, DTYPES)
        _one_of("precision", "fp8_backend", self.fp8_backend, FP8_BACKENDS)
        _non_negative("precision", fp8_promotion_interval=self.fp8_promotion_interval)
        if self.fp8_promotion_interval % 32:
            raise ValueError(
                f"precision.fp8_promotion_interval must be 0 or a multiple of 32 (the emulated WGMMA step), "
                f"got {self.fp8_promotion_interval}"
            )


@dataclass(frozen=True, kw_only=True)
class ParallelConfig:
    pp: int = 1
    ep: int = 1
    dp: int = 1
    """Data-parallel degree of the dense parameters; expert parameters are data-parallel over dp // ep."""
    zero_stage: int = 1
    device: str = "cpu"
    stage_layers: list[int] = field(default_factory=list)
    """Transformer layers per pipeline stage (uneven splits allowed); empty = as even as possible."""
    cpus_per_worker: float = 1.0
    """Ray CPUs each worker actor reserves; below 1 packs more workers than cores onto a machine (a laptop running
    a pp x dp layout wider than its cores: correct, not fast)."""

    def __post_init__(self) -> None:
        _check_numbers(self, "parallel")
        _positive("parallel", pp=self.pp, ep=self.ep, dp=self.dp)
        if not (isinstance(self.cpus_per_worker, (int, float)) and 0 < self.cpus_per_worker <= 1024):
            raise ValueError(f"parallel.cpus_per_worker must be in (0, 1024], got {self.cpus_per_worker}")
        _one_of("parallel", "device", self.device, DEVICES)
        if self.zero_stage not in (0, 1, 2):
            raise ValueError(f"parallel.zero_stage must be 0, 1 or 2, got {self.zero_stage}")
        from raymoe.schedule.layout_rules import check_ep_divides_dp

        check_ep_divides_dp(self.ep, self.dp, prefix="parallel.")

    @property
    def world_size(self) -> int:
        return self.pp * self.dp


@dataclass(frozen=True, kw_only=True)
class ScheduleConfig:
    name: str = "1f1b"
    num_microbatches: int = 1
    overlap_a2a: bool = False
    """Expert parallelism: in DualPipe's F&B pairs, run the forward and the backward chunk at the same time, so
    each one's all-to-alls are in flight while the other computes (``raymoe.parallel.executor``). Bitwise the
    same result as without."""

    def __post_init__(self) -> None:
        _check_numbers(self, "schedule")
        _one_of("schedule", "name", self.name, SCHEDULES)
        _positive("schedule", num_microbatches=self.num_microbatches)
        _at_most("schedule", num_microbatches=(self.num_microbatches, MAX_MICROBATCHES))


@dataclass(frozen=True, kw_only=True)
class OptimConfig:
    lr: float = 1e-3
    min_lr_ratio: float = 0.1
    warmup_steps: int = 10
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value; 0 disables clipping."""

    def __post_init__(self) -> None:
        _check_numbers(self, "optim")
        _positive("optim", lr=self.lr, eps=self.eps)
        _non_negative("optim", warmup_steps=self.warmup_steps, weight_decay=self.weight_decay, grad_clip=self.grad_clip)
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        for name, beta in (("beta1", self.beta1), ("beta2", self.beta2)):
            if not 0 <= beta < 1:
                raise ValueError(f"optim.{name} must be in [0, 1), got {beta}")


@dataclass(frozen=True, kw_only=True)
class DataConfig:
    path: str = ""
    """Directory of Parquet shards written by ``raymoe prepare-data``; empty = the embedded corpus."""
    seq_len: int = 128
    batch_size: int = 8
    """Global batch in sequences per optimizer step (split over dp ranks and micro-batches)."""
    seed: int = 0

    def __post_init__(self) -> None:
        _check_numbers(self, "data")
        _positive("data", seq_len=self.seq_len, batch_size=self.batch_size)
        _non_negative("data", seed=self.seed)  # numpy's default_rng([seed, epoch]) refuses negative seeds
        check_path_shape("data.path", self.path)


@dataclass(frozen=True, kw_only=True)
class RunConfig:
    steps: int = 100
    out_dir: str = "runs/latest"
    seed: int = 0
    log_every: int = 1
    name: str = "raymoe"
    ray_address: str = ""
    """Empty starts a local Ray instance; ``auto`` (or RAY_ADDRESS) joins a running cluster."""
    checkpoint_every: int = 0
    """Save a checkpoint every this many steps and at the end of the run; 0 saves only when stopped."""
    checkpoint_on_stop: bool = True
    """SIGTERM (``ray job stop``) or Ctrl-C: finish the running step, save a checkpoint, then exit."""
    keep_checkpoints: int = 3
    """Complete checkpoints kept; older ones are deleted only after a newer one is committed."""
    max_failures: int = 0
    """Worker failures (a dead actor, a failed step or save) survived by restarting the workers from the last
    checkpoint of this run (or from the start, before the first one); 0 stops at the first failure."""
    step_timeout_s: float = 0.0
    """A step that takes longer fails (TimeoutError; recovered from if ``max_failures`` allows); 0: no limit."""
    init_from: str = ""
    """A model export (``raymoe checkpoint export``): start from its weights and routing biases, in any layout,
    with a fresh optimizer and data from the start (``--resume`` continues a run exactly, in its own layout)."""
    checkpoint_dir: str = ""
    """Where checkpoints go; empty means ``<out_dir>/checkpoints``. Every worker writes its own shard there, so
    on a multi-node cluster it must be storage all nodes share. A relative path is relative to the current
    directory of the process that runs the driver, like ``out_dir`` and ``data.path`` (not to ``out_dir``: then
    ``--out`` would silently move checkpoints that a shared-storage setting put elsewhere)."""
    eval_every: int = 0
    """Evaluate loss / perplexity / bits per byte on ``eval_data`` every this many steps and after the last one,
    into that step's metrics record (``eval_*``); 0 never (``raymoe eval`` evaluates afterwards)."""
    eval_data: str = ""
    """The dataset directory evaluated (e.g. a ``prepare-data --holdout`` split); empty = ``data.path``."""
    eval_tokens: int = 16384
    """Labels evaluated each time (consecutive windows from the dataset's start); 0 = the whole dataset."""

    def __post_init__(self) -> None:
        _check_numbers(self, "run")
        _positive("run", steps=self.steps, log_every=self.log_every, keep_checkpoints=self.keep_checkpoints)
        _non_negative("run", checkpoint_every=self.checkpoint_every, max_failures=self.max_failures,
                      step_timeout_s=self.step_timeout_s, seed=self.seed,
                      eval_every=self.eval_every, eval_tokens=self.eval_tokens)
        if self.step_timeout_s > MAX_TIMEOUT_S:
            raise ValueError(f"run.step_timeout_s must be <= {MAX_TIMEOUT_S:g} (0 means no limit), got "
                             f"{self.step_timeout_s}")
        for key in ("out_dir", "checkpoint_dir", "init_from"):
            check_path_shape(f"run.{key}", getattr(self, key))
        if not self.out_dir:
            raise ValueError("run.out_dir must name a directory, got ''")
        check_ray_address(self.ray_address)


@dataclass(frozen=True, kw_only=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)
    mtp: MtpConfig = field(default_factory=MtpConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def __post_init__(self) -> None:
        self._check_routing()
        self._check_parallel()
        if self.data.seq_len > self.model.max_seq_len:
            raise ValueError(f"data.seq_len ({self.data.seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len})")

    def _check_routing(self) -> None:
        m, r = self.model, self.routing
        if r.top_k > m.num_routed_experts:
            raise ValueError(f"routing.top_k ({r.top_k}) exceeds model.num_routed_experts ({m.num_routed_experts})")
        if m.num_routed_experts % r.num_groups:
            raise ValueError(
                f"model.num_routed_experts ({m.num_routed_experts}) must be divisible by "
                f"routing.num_groups ({r.num_groups})"
            )
        experts_per_group = m.num_routed_experts // r.num_groups
        if r.num_groups > 1 and r.top_k % r.groups_kept:
            raise ValueError(f"routing.top_k ({r.top_k}) must be divisible by routing.groups_kept ({r.groups_kept})")
        if r.num_groups > 1 and r.top_k // r.groups_kept > experts_per_group:
            raise ValueError(
                f"routing.top_k/groups_kept ({r.top_k}/{r.groups_kept}) exceeds the "
                f"{experts_per_group} experts per group"
            )
        if r.groups_kept * experts_per_group < r.top_k:
            raise ValueError(
                f"routing.groups_kept ({r.groups_kept}) x {experts_per_group} experts per group < top_k ({r.top_k})"
            )

    def _check_parallel(self) -> None:
        p, s, m = self.parallel, self.schedule, self.model
        if m.num_routed_experts % p.ep:
            raise ValueError(
                f"model.num_routed_experts ({m.num_routed_experts}) must be divisible by parallel.ep ({p.ep})"
            )
        per_step = p.dp * s.num_microbatches
        if self.data.batch_size % per_step:
            raise ValueError(
                f"data.batch_size ({self.data.batch_size}) must be divisible by "
                f"parallel.dp x schedule.num_microbatches ({p.dp} x {s.num_microbatches} = {per_step})"
            )
        from raymoe.schedule import validate_inputs  # pure Python; the schedule owns its shape rules

        try:
            validate_inputs(s.name, p.pp, s.num_microbatches)
        except ValueError as exc:
            raise ValueError(f"schedule.name={s.name}, parallel.pp={p.pp}: {exc}") from exc
        from raymoe.schedule.layout_rules import check_zero_stage, layer_counts, num_chunks

        layer_counts(m.num_layers, num_chunks(s.name, p.pp), p.stage_layers, key="parallel.stage_layers",
                     layers_key="model.num_layers")
        check_zero_stage(zero_stage=p.zero_stage, schedule=s.name, pp=p.pp, ep=p.ep, mtp_depth=self.mtp.depth)

    @property
    def micro_batch_size(self) -> int:
        return self.data.batch_size // (self.parallel.dp * self.schedule.num_microbatches)

