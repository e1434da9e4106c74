"""Precision: what a requested Trainer precision becomes on this hardware, and the dtype a batch is delivered in.

``bf16-mixed`` (the recipes') means "the fastest mixed precision the hardware has": it stays on GPUs
with native bf16 (compute capability 8.0+, Ampere and later) and on CPUs with AVX512-BF16/AMX,
becomes ``16-mixed`` on older GPUs (which torch would otherwise emulate bf16 on, slowly) and
``32-true`` on other CPUs. Every other precision is kept as asked, spelled the long way.
"""

import warnings

import torch

# The dtype a batch is delivered in, by Trainer precision: what autocast would cast it to (-mixed),
# or the dtype of the model's weights (-true), whose first layer would otherwise get float32.
INPUT_DTYPES = {
    "bf16-mixed": torch.bfloat16, "16-mixed": torch.float16,
    "bf16-true": torch.bfloat16, "16-true": torch.float16, "64-true": torch.float64,
}
# Lightning's short spellings.
ALIASES = {"16": "16-mixed", "bf16": "bf16-mixed", "32": "32-true", "64": "64-true"}


def input_dtype(precision: object) -> torch.dtype:
    """The dtype the model's first layer computes in under ``precision`` (float32 for 32-true and unknown ones)."""
    return INPUT_DTYPES.get(str(precision), torch.float32)


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 instructions (AVX512-BF16 or AMX)."""
    # torch has no public query for this; its private checks may be missing in other versions
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def cuda_devices(devices: object) -> list[int]:
    """The CUDA device indices a Trainer with ``--trainer.devices`` uses on this node (Lightning's rules:
    a count takes the first N, a list or "1,3" names them, "auto" and -1 take all); all, when unreadable."""
    every = list(range(torch.cuda.device_count()))
    if isinstance(devices, str):
        text = devices.strip()
        if "," in text:
            return [int(d) for d in text.split(",") if d.strip()]
        devices = int(text) if text.lstrip("-").isdigit() else every
    if isinstance(devices, int) and not isinstance(devices, bool):
        return every if devices == -1 else list(range(devices))
    if isinstance(devices, (list, tuple)) and all(isinstance(d, int) for d in devices):
        return list(devices)
    return every


def gpus_have_bf16(devices: list[int]) -> bool:
    """Whether every one of these GPUs computes bf16 natively (not emulated: compute capability 8.0+, or ROCm).

    Not ``torch.cuda.is_bf16_supported()``: it asks about the current device only and, by default,
    also says yes where bf16 is merely emulated (T4, V100)."""
    if torch.version.hip:
        return True
    # An index that is not there is Lightning's error to report, with its own message.
    present = [d for d in devices if 0 <= d < torch.cuda.device_count()]
    return all(torch.cuda.get_device_capability(d) >= (8, 0) for d in present)


def hardware(accelerator: object) -> str:
    """What the Trainer will run on, for the precision decision: "cpu", "cuda" or "other" (MPS, XLA, a custom one)."""
    if accelerator == "auto":
        if torch.cuda.is_available():
            return "cuda"
        mps = getattr(torch.backends, "mps", None)
        return "other" if mps is not None and mps.is_available() else "cpu"
    return {"cpu": "cpu", "gpu": "cuda", "cuda": "cuda"}.get(accelerator if isinstance(accelerator, str) else "", "other")


def resolve_precision(precision: str | int | None, accelerator: object = "auto", devices: object = "auto") -> str | int | None:
    """The precision to run: ``bf16-mixed`` where the hardware has native bf16, else the best mixed precision
    it has (16-mixed on GPUs, 32-true on CPUs); ``16-mixed`` on a CPU, which Lightning runs as bf16-mixed,
    the same way; anything else as asked. Warns where bf16-true would be emulated, and for 16-true on a CPU."""
    precision = ALIASES.get(str(precision), precision)
    where = hardware(accelerator)
    if where == "cuda" and torch.cuda.is_available():
        native = gpus_have_bf16(cuda_devices(devices))
    elif where == "cpu":
        native = cpu_has_bf16()
    else:
        return precision
    if precision == "bf16-mixed" or (precision == "16-mixed" and where == "cpu"):
        return "bf16-mixed" if native else ("16-mixed" if where == "cuda" else "32-true")
    if precision == "bf16-true" and not native:
        hint = "16-mixed" if where == "cuda" else "32-true"
        warnings.warn(f"bf16-true: this {'GPU' if where == 'cuda' else 'CPU'} has no native bf16, torch emulates it "
                      f"(slowly); --trainer.precision {hint} is faster here.", stacklevel=2)
    # Measured: a 3-step fit (batch 16) took 308 s in 16-true, 2.6 s in bf16-mixed.
    if precision == "16-true" and where == "cpu":
        warnings.warn("16-true on a CPU: torch computes fp16 there through slow fallbacks (over 100x slower than "
                      f"bf16-mixed in a measured run); --trainer.precision {'bf16-mixed' if native else '32-true'} "
                      "is faster here.", stacklevel=2)
    return precision


def fallback_message(asked: object, chosen: object) -> str:
    """The one line that says the CLI runs another precision than the one asked (``resolve_precision``'s choice)."""
    why = {"16-mixed": "this GPU has no native bf16", "32-true": "this CPU has no bf16 (AVX512-BF16 or AMX)",
           "bf16-mixed": "Lightning runs 16-mixed on a CPU as bf16"}.get(str(chosen), "this hardware")
    return f"precision: {asked} asked, but {why}: using {chosen} (set --trainer.precision to choose)."
