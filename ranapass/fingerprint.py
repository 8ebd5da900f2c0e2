"""A short fingerprint of a model's weights, so a plan or profile is never applied to another model."""

from __future__ import annotations

import hashlib

import torch

from ranapass.offload import onloaded

__all__ = ["weights_fingerprint"]

_SAMPLES_PER_TENSOR = 4096


@torch.no_grad()
def weights_fingerprint(model: torch.nn.Module) -> str:
    """Hash of every parameter's name, shape and a strided sample of its values (fast on 8B models).

    Tied parameters count once. Dtype and device do not enter, so a bf16 copy on the GPU of the
    model a plan was made for still matches it.
    """
    h = hashlib.blake2b(digest_size=12)
    seen: set[int] = set()
    # named_parameters' order, one module at a time so that layers offloaded by accelerate are read in place.
    for prefix, module in model.named_modules():
        own = [short for short, p in module._parameters.items() if p is not None and id(p) not in seen]
        seen.update(id(module._parameters[short]) for short in own)
        with onloaded([module]):
            for short in own:
                p = module._parameters[short]
                flat = p.detach().reshape(-1)
                step = max(1, flat.numel() // _SAMPLES_PER_TENSOR)
                sample = flat[::step][:_SAMPLES_PER_TENSOR].to("cpu", torch.float32)
                # Rounded so the bf16/fp16 copy of an fp32 model hashes alike.
                sample = sample.to(torch.bfloat16).to(torch.float32)
                h.update((prefix + "." + short if prefix else short).encode())
                h.update(str(tuple(p.shape)).encode())
                h.update(sample.numpy().tobytes())
    return h.hexdigest()
