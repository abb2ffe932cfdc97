"""Speed options change how the UNet runs, never what it computes: the trained LoRA equals the plain run's.

torch.compile is exercised with the aot_eager backend (the same graph capture through the LoRA layers as inductor,
without minutes of CPU code generation); inductor, CUDA graphs and the speed itself are measured on a GPU
(benchmarks/RESULTS.md).
"""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from sdlora.config import load_config
from sdlora.errors import TrainingError
from sdlora.train.recipe import train

pytestmark = pytest.mark.usefixtures("single_thread_plain_kernels")


def _train(dataset, out, *overrides):
    return load_file(str(train(load_config(None, [
        f'data.dirs=["{dataset.as_posix()}"]', "data.resolution=64", "data.min_bucket_reso=64",
        "data.max_bucket_reso=64", "lora.rank=4", "lora.alpha=4.0", "train.batch_size=2", "train.max_train_steps=3",
        "train.learning_rate=1e-3", "train.save_every_n_epochs=0", f'train.output_dir="{Path(out).as_posix()}"',
        "train.report=false", "export.dtype=fp32", *overrides]))))


@pytest.fixture(scope="module")
def plain(dataset, tmp_path_factory):
    return _train(dataset, tmp_path_factory.mktemp("plain"))


def test_channels_last_keeps_output_and_gradients():
    # One forward and backward, not a training run: Adam turns the last-bit differences of another conv algorithm
    # (NHWC) into visible weight differences where gradients are near zero.
    from sdlora.adapters.lora import inject_lora, trainable_parameters
    from sdlora.models.loading import load_base_model
    from sdlora.train.recipe import _speed_up_unet

    results = []
    for option in ([], ["train.channels_last=true"]):
        unet = load_base_model("tiny-sd15").unet
        torch.manual_seed(0)
        inject_lora(unet, "unet", load_config(None, ["lora.rank=4"]).lora)
        with torch.no_grad():
            for param in trainable_parameters(unet).values():
                param.add_(0.05 * torch.randn_like(param))  # B starts at zero: give every factor a gradient
        _speed_up_unet(unet, load_config(None, option).train)
        latents, states = torch.randn(2, 4, 8, 8), torch.randn(2, 77, unet.config.cross_attention_dim)
        out = unet(latents, torch.tensor([10, 500]), states).sample
        out.pow(2).mean().backward()
        results.append((out.detach(), {n: p.grad for n, p in trainable_parameters(unet).items()}))
    (plain_out, plain_grads), (out, grads) = results
    torch.testing.assert_close(out, plain_out, atol=1e-5, rtol=1e-4)
    assert grads.keys() == plain_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], plain_grads[name], atol=1e-6, rtol=1e-3, msg=name)


def test_regional_compile_trains_the_same_lora(dataset, plain, tmp_path):
    lora = _train(dataset, tmp_path, "train.compile=regional", "train.compile_backend=aot_eager")
    assert lora.keys() == plain.keys()
    for key in lora:
        torch.testing.assert_close(lora[key], plain[key], atol=1e-5, rtol=1e-4, msg=key)


def test_full_compile_wraps_the_whole_unet():
    # Training through a fully compiled UNet takes minutes of graph capture on a CPU; the regional case above runs
    # the same capture per block, so here only the wiring is checked.
    from sdlora.models.loading import load_base_model
    from sdlora.train.recipe import _speed_up_unet

    unet = load_base_model("tiny-sd15").unet
    _speed_up_unet(unet, load_config(None, ["train.compile=full", "train.compile_backend=aot_eager"]).train)
    assert unet._compiled_call_impl is not None
    assert all(b._compiled_call_impl is None for b in unet.modules() if type(b).__name__ == "BasicTransformerBlock")


def test_unknown_compile_backend_is_one_line(dataset, tmp_path):
    with pytest.raises(TrainingError, match="train.compile_backend: 'no_such' is not one of .*inductor"):
        _train(dataset, tmp_path, "train.compile=regional", "train.compile_backend=no_such")
