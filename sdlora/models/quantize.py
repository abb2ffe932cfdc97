"""QLoRA-style storage of the frozen UNet (`model.quantize_base`): its Linear layers in fp8 or 4-bit NF4, adapters fp32.

LoRA never updates the base weights, so they only have to be good enough to compute with; storing them in 8 or 4
bits frees most of the UNet's memory for activations (QLoRA, arXiv 2305.14314). Only the UNet is quantized: it holds
most of the frozen weights (SD1.5 0.86 of 0.98 B parameters, SDXL 2.6 of 3.4 B), while the text encoders leave the
GPU once their outputs are cached and their error would condition every prediction. Only Linear layers are: the
convolutions stay in the training precision, because bitsandbytes has no 4-bit convolution and autograd keeps a
convolution's weight by reference, so layerwise casting would hand the backward pass the fp8 tensor.

- "nf4": bitsandbytes' Linear4bit (NormalFloat, double-quantized scales), before LoRA is injected so that peft
  wraps those layers in its own bnb LoRA layer (`peft.tuners.lora.bnb`). Works on CPU and GPU.
- "fp8": diffusers' layerwise casting (float8_e4m3fn storage, upcast around each layer's forward), after LoRA is
  injected, as peft creates each adapter in its base layer's dtype; the adapter layers themselves are skipped.
  Autograd holds each upcast weight until the backward pass unless gradient checkpointing recomputes the block,
  so the config requires checkpointing with it.
"""

from __future__ import annotations

import torch
import torch.utils.checkpoint

from sdlora import bnb_import
from sdlora.errors import ModelError

FP8 = torch.float8_e4m3fn


def quantize_nf4(model: torch.nn.Module, compute_dtype: torch.dtype, device: torch.device) -> None:
    """Replace the Linear layers of `model` by NF4 layers, quantized on `device`; the model stays where it was.

    Call it before LoRA injection.

    Raises:
        ModelError: bitsandbytes is not installed.
    """
    try:
        bnb_import.load()  # before accelerate's bnb helpers, which look for it
        from accelerate.utils import BnbQuantizationConfig
        from accelerate.utils.bnb import replace_with_bnb_layers
    except ImportError:
        raise ModelError("model.quantize_base = \"nf4\" needs bitsandbytes: pip install 'sdlora[bnb]'") from None
    config = BnbQuantizationConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=compute_dtype)
    home = next(model.parameters()).device
    replace_with_bnb_layers(model, config)
    # Moving a bitsandbytes weight quantizes it; on the training device, as the CPU path is slow (measured 0.35 s
    # per 6.5 M weights on 2 cores: minutes for SDXL's UNet).
    model.to(device).to(home)
    for module in model.modules():
        # On CPUs with AVX512-BF16, bitsandbytes repacks weights at the first no-grad eval forward (sampling) into
        # a layout whose matmul has no backward, which would cut the gradient to every earlier adapter.
        if hasattr(module, "support_avx512bf16_for_cpu"):
            setattr(module, "support_avx512bf16_for_cpu", False)  # bitsandbytes' attribute, unknown to torch's types
    setattr(model, "is_loaded_in_4bit", True)  # peft reads this to dispatch its bnb LoRA layer


def store_fp8(model, compute_dtype: torch.dtype) -> None:
    """Store the Linear weights of a diffusers model in fp8, upcast to `compute_dtype` around each layer's forward.

    Call it after LoRA injection. Skipped: the adapter layers (names with `lora_`, which diffusers only skips by
    itself when no pattern is given) and diffusers' defaults (norms, the model's own list).
    """
    from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN

    model.enable_layerwise_casting(FP8, compute_dtype, skip_modules_pattern=(*DEFAULT_SKIP_MODULES_PATTERN, "lora_"),
                                   skip_modules_classes=(torch.nn.Conv2d,))


def fp8_checkpointing(block, *args):
    """Gradient checkpointing for `enable_gradient_checkpointing` with fp8 storage: the recompute runs each block to
    its end (torch stops it early by default), or the hook that re-stores the last layer in fp8 would never run and
    its upcast weight would stay on the device."""
    return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False, early_stop=False)


def stored_bytes(models: list[torch.nn.Module], device: torch.device) -> int:
    """Bytes of the frozen weights and buffers of `models` held on `device`, as stored: fp8 at one byte, NF4 packed
    two to a byte plus its quantization scales (which bitsandbytes keeps beside the weight, not as a buffer)."""
    total = 0
    for model in models:
        for tensor in [*(p for p in model.parameters() if not p.requires_grad), *model.buffers()]:
            if tensor.device.type != device.type:
                continue
            total += tensor.numel() * tensor.element_size()
            state = getattr(tensor, "quant_state", None)
            if state is not None:
                total += sum(v.numel() * v.element_size() for v in state.as_dict().values() if torch.is_tensor(v))
    return total
