"""The settings of a distillation run: validated once, recorded in the artifact's manifest, and
fingerprinted (with the teacher, student and data) so a resume with other settings is refused."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from compressor.errors import CompressorError
from compressor.util import parse_count

# Settings that change how a run is watched or saved, not what it computes: a resume may change them.
NOT_FINGERPRINTED = ("eval_every", "eval_windows", "save_every", "log_every")


class DistillSettings(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    tokens: int | str = Field(20_000_000, description="training tokens, e.g. 20M (all processes; repeated epochs "
                                                       "count)")
    generate_data: int | str = Field(0, description="tokens of text sampled from the teacher added to the training "
                                                    "data, e.g. 2M (0: none)")
    seq_len: int = Field(512, ge=2, description="tokens per training sequence")
    batch_size: int = Field(8, ge=1, description="sequences per micro-batch and process")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimizer step")
    lr: float = Field(1e-4, gt=0, description="peak learning rate (AdamW)")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="final learning rate of the cosine decay, relative")
    warmup: float = Field(0.05, ge=0, lt=1, description="fraction of the steps with linear warm-up")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    clip: float = Field(1.0, ge=0, description="gradient norm clipping (0: none)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the KL")
    top_k: int = Field(0, ge=0, description="KL over the teacher's top-k tokens only (0: the full vocabulary)")
    kl_chunk: int = Field(4096, ge=1, description="tokens per chunk of the fused KL over the vocabulary")
    hidden_weight: float = Field(0.0, ge=0, description="weight of the final hidden-state loss through a learned "
                                                        "projection (0: logits only)")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="bf16 autocast (auto: on GPUs) or fp32")
    gradient_checkpointing: bool = Field(False, description="recompute block activations in the backward pass")
    compile: bool = Field(False, description="torch.compile each decoder block and the KL (GPUs)")
    compile_mode: Literal["default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"] = Field(
        "default", description="torch.compile mode of the decoder blocks with --compile (max-autotune*: tuned "
                               "GEMM kernels, longer compile; reduce-overhead/max-autotune: CUDA graphs)")
    fsdp: bool = Field(False, description="shard the student, its gradients and optimizer state over the processes "
                                          "(FSDP2; also on under accelerate launch --use_fsdp) instead of DDP")
    eval_every: int = Field(0, ge=0, description="steps between held-out evaluations (0: before and after only)")
    eval_windows: int = Field(32, ge=1, description="held-out windows of --seq-len tokens per evaluation")
    save_every: int = Field(200, ge=1, description="steps between checkpoints")
    log_every: int = Field(0, ge=0, description="steps between progress lines (0: about 20 per run)")
    seed: int = Field(0, description="seed of the data order")

    @field_validator("tokens", mode="before")
    @classmethod
    def _count(cls, value):
        return _count_at_least(value, "--tokens", 1)

    @field_validator("generate_data", mode="before")
    @classmethod
    def _generated(cls, value):
        return _count_at_least(value, "--generate-data", 0)

    def fingerprinted(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k not in NOT_FINGERPRINTED}


def parse_settings(values: dict | DistillSettings | None) -> DistillSettings:
    """Settings from keyword values; a bad one is a one-line error naming it."""
    if isinstance(values, DistillSettings):
        return values
    try:
        return DistillSettings(**(values or {}))
    except ValidationError as exc:
        err = exc.errors()[0]
        field = ".".join(str(p) for p in err["loc"]) or "settings"
        if isinstance(err.get("ctx", {}).get("error"), CompressorError):
            raise err["ctx"]["error"] from None
        raise CompressorError(f"invalid distill setting {field}: {err['msg']} (got {err.get('input')!r})",
                              "see `compress distill --help` for valid values") from None


def _count_at_least(value, flag: str, minimum: int) -> int:
    count = parse_count(value, flag)
    if count < minimum:
        raise ValueError(f"must be at least {minimum}")
    return count
