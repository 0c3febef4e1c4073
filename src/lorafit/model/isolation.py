"""The packing preflight: before the first step, prove on real rows, with the run's own model,
attention backend and precision, that packed examples do not see each other.

Two comparisons per checked row, each sharp where the other is blunt:

- **Perturbation.** The first example's tokens are replaced and the row is run again. Isolated,
  every later example's logits come out bit for bit the same (only values that attention
  masks out changed; shapes and kernels are the same), whatever the precision. Any leak, even
  a random model's faint one, moves them.
- **Packed equals alone.** Each example's loss inside the row is compared with its loss run
  alone. This also catches wrong positions or labels, but the two runs round differently, so
  the tolerance follows the precision the forward actually computes in: the autocast dtype,
  half-precision weights, bitsandbytes' 4-bit compute dtype and 8-bit matmuls, and TF32.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from lorafit.errors import PackingError
from lorafit.model.losses import token_loss_sum

# fp32 runs hold packed losses to 1e-4; lower precisions get a few units of their roundoff.
_FP32_LOSS_TOLERANCE = 1e-4
_ROUNDOFF_UNITS = 4
# float32 matmuls on CUDA with TF32 keep 10 mantissa bits, as fp16 does.
_TF32_EPS = torch.finfo(torch.float16).eps


@dataclass(frozen=True)
class Precision:
    """The lowest precision a forward computes in: its name and unit roundoff."""

    name: str
    eps: float

    @property
    def loss_tolerance(self) -> float:
        """Relative difference allowed between an example's loss packed and alone."""
        return max(_FP32_LOSS_TOLERANCE, _ROUNDOFF_UNITS * self.eps)


@dataclass(frozen=True)
class IsolationReport:
    """What the preflight found, both relative: an example's loss packed against alone, and
    how far logits moved when another example of their row changed."""

    precision: Precision
    examples: int
    worst_loss_error: float
    worst_logit_change: float


def _dtype_precision(dtype: torch.dtype) -> Precision:
    return Precision(str(dtype).removeprefix("torch."), torch.finfo(dtype).eps)


def compute_precision(module: torch.nn.Module, device: torch.device) -> Precision:
    """The lowest precision `module`'s forward computes in on `device`, here and now.

    Call it inside the context the forward runs in (autocast included): a float32 parameter
    says little when autocast or a 4-bit layer computes in bf16.
    """
    found = [_dtype_precision(torch.float32)]
    if torch.is_autocast_enabled(device.type):
        found.append(_dtype_precision(torch.get_autocast_dtype(device.type)))
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    found += [_dtype_precision(dtype) for dtype in dtypes]
    for layer in module.modules():
        # bitsandbytes: Linear4bit dequantizes into `compute_dtype` for its matmul, and
        # Linear8bitLt multiplies int8 into float16 outputs.
        compute = getattr(layer, "compute_dtype", None)
        if isinstance(compute, torch.dtype):
            found.append(_dtype_precision(compute))
        if type(layer).__name__ == "Linear8bitLt":
            found.append(_dtype_precision(torch.float16))
    if device.type == "cuda" and torch.get_float32_matmul_precision() != "highest":
        found.append(Precision("tf32", _TF32_EPS))
    return max(found, key=lambda precision: precision.eps)


def _logits(module: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return module(batch["input_ids"], position_ids=batch["position_ids"])


def _perturbed(input_ids: torch.Tensor, end: int, vocab: int) -> torch.Tensor:
    """The row with its first `end` tokens replaced by other ids."""
    changed = input_ids.clone()
    changed[:, :end] = (changed[:, :end] * 7 + 3) % vocab
    return changed


def check_isolation(
    module: torch.nn.Module,
    packed: Any,
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    rows: int = 2,
) -> IsolationReport:
    """Prove on the first `rows` rows holding several examples that packing isolates them.

    Runs in eval mode and in whatever precision context the caller set up (the trainer's
    autocast during training), so it checks the computation training will do.

    Raises:
        PackingError: If an example's logits move when another example of its row changes,
            or its loss packed differs from its loss alone beyond the precision's tolerance.
    """
    candidates = [i for i, row in enumerate(packed.rows) if len(row) > 1][:rows]
    device = next(module.parameters()).device
    precision = compute_precision(module, device)
    worst_loss, worst_logit, checked = 0.0, 0.0, 0
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            for index in candidates:
                batch = {k: v.to(device) for k, v in collate([packed[index]]).items()}
                logits = _logits(module, batch)
                starts = (batch["position_ids"][0] == 0).nonzero().flatten().tolist()
                members = packed.rows[index]
                end = starts[len(members)] if len(starts) > len(members) else logits.shape[1]
                change = _logit_change(module, batch, logits, starts[1], end)
                worst_logit = max(worst_logit, change)
                # One unit of roundoff: isolated kernels give exactly 0, a leak tenths.
                if change > precision.eps:
                    raise PackingError(
                        f"packed examples are not isolated: in packed row {index}, changing "
                        f"example {members[0]} changed the logits of the examples after it by "
                        f"up to {change:.3g} of their largest; check model.attn_implementation, "
                        "or set data.sample_packing=false"
                    )
                for member, start in zip(members, starts, strict=False):
                    error = _loss_error(module, packed, member, logits, start, device)
                    worst_loss = max(worst_loss, error)
                    checked += 1
                    if error > precision.loss_tolerance:
                        raise PackingError(
                            f"packed examples are not isolated: example {member} has a loss "
                            f"inside packed row {index} that differs from its loss alone by "
                            f"{error:.2e} (relative; {precision.name} allows "
                            f"{precision.loss_tolerance:.2g}); check model.attn_implementation, "
                            "or set data.sample_packing=false"
                        )
    finally:
        module.train(was_training)
    return IsolationReport(precision, checked, worst_loss, worst_logit)


def _logit_change(
    module: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    logits: torch.Tensor,
    start: int,
    end: int,
) -> float:
    """How far the logits of tokens [start, end) move when tokens [0, start) change, relative
    to the largest of them."""
    changed = {**batch, "input_ids": _perturbed(batch["input_ids"], start, logits.shape[-1])}
    before = logits[:, start:end].float()
    after = _logits(module, changed)[:, start:end].float()
    return float((after - before).abs().max() / before.abs().max().clamp_min(1e-12))


def _loss_error(
    module: torch.nn.Module,
    packed: Any,
    member: int,
    logits: torch.Tensor,
    start: int,
    device: torch.device,
) -> float:
    """Relative difference of one example's loss inside its packed row and run alone."""
    alone = packed.examples.example(member)
    ids = torch.tensor([alone["input_ids"]], device=device)
    labels = torch.tensor([alone["labels"]], device=device)
    inside, _ = token_loss_sum(logits[:, start : start + ids.shape[1]], labels)
    single, _ = token_loss_sum(module(ids, attention_mask=torch.ones_like(ids)), labels)
    return abs(inside.item() - single.item()) / max(abs(single.item()), 1e-6)
