"""Mixed precision: what the hardware can run, and the dtype a batch is delivered in."""

import torch

# The dtype a batch is delivered in, by Trainer precision: what autocast would cast it to.
INPUT_DTYPES = {"bf16-mixed": torch.bfloat16, "16-mixed": torch.float16}


def input_dtype(precision: object) -> torch.dtype:
    """The dtype the model's first layer computes in under ``precision`` (fp32 unless mixed)."""
    return INPUT_DTYPES.get(str(precision), torch.float32)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX)."""
    # torch has no public query for this; its private checks may be missing in other versions
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def resolve_precision(precision: str | int | None, accelerator: str) -> str | int | None:
    """Keep ``bf16-mixed`` where the hardware runs bf16, else the best mixed precision it has."""
    if precision != "bf16-mixed":
        return precision
    if torch.cuda.is_available() and accelerator in ("auto", "gpu", "cuda"):
        return precision if torch.cuda.is_bf16_supported() else "16-mixed"
    return precision if cpu_has_bf16() else "32-true"
