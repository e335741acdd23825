"""The NVFP4 writer (tests/fixtures/nvfp4.py) against vLLM's own NVFP4 code:
its reference quantizer and the dequantizer its loader's kernels follow."""

import pytest
import torch
from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
    cast_to_fp4,
    dequantize_to_dtype,
    ref_nvfp4_quant,
)

from tests.fixtures import nvfp4


def test_every_e2m1_code_round_trips_through_pack_and_value():
    codes = torch.arange(16, dtype=torch.uint8).repeat(3)
    assert torch.equal(nvfp4.unpack_e2m1(nvfp4.pack_e2m1(codes)), codes)
    values = nvfp4.e2m1_values(codes)
    assert torch.equal(nvfp4.e2m1_codes(values[values != 0]), codes[values != 0])


def test_packing_puts_the_even_element_in_the_low_nibble():
    packed = nvfp4.pack_e2m1(torch.tensor([[0x1, 0xA, 0x7, 0x0]], dtype=torch.uint8))
    assert packed.tolist() == [[0xA1, 0x07]]


def test_rounding_matches_vllms_reference_quantizer_including_ties():
    grid = torch.arange(-6.5, 6.5, 0.125)  # every tie between e2m1 values and more
    noise = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 3
    for values in (grid, noise):
        ours = nvfp4.e2m1_values(nvfp4.e2m1_codes(values.clamp(-6, 6)))
        assert torch.equal(ours, cast_to_fp4(values.clamp(-6, 6).clone()))


def test_quantized_weight_matches_vllms_reference_quantizer():
    weight = torch.randn(64, 256, generator=torch.Generator().manual_seed(1)) * 0.02
    q = nvfp4.quantize_weight(weight)
    values, scales = ref_nvfp4_quant(weight, 1.0 / q.weight_scale_2, 16)
    assert torch.equal(q.weight_scale.float(), scales)
    ours = nvfp4.e2m1_values(nvfp4.unpack_e2m1(q.weight))
    assert (ours == values).float().mean() > 0.999  # division order may move an exact tie


@pytest.mark.parametrize("shape", [(48, 64), (1024, 128), (64, 6144)])
def test_vllm_dequantizes_what_the_writer_meant_within_fp4_error(shape):
    weight = (torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 0.02).bfloat16()
    q = nvfp4.quantize_weight(weight)
    assert q.weight.dtype == torch.uint8 and q.weight.shape == (shape[0], shape[1] // 2)
    assert q.weight_scale.dtype == torch.float8_e4m3fn and q.weight_scale.shape == (shape[0], shape[1] // 16)
    assert q.weight_scale_2.dtype == torch.float32 and q.weight_scale_2.shape == ()
    ours = nvfp4.dequantize_weight(q)
    vllm = dequantize_to_dtype(q.weight, q.weight_scale, q.weight_scale_2, torch.float32, 16, swizzle=False)
    assert torch.equal(ours, vllm)
    original = weight.float()
    # e2m1 steps are at most 2 at the top of a block's range (block amax -> 6):
    # rounding errs by at most a third of the block amax, typically far less.
    block_amax = original.reshape(shape[0], -1, 16).abs().amax(-1, keepdim=True)
    error = (ours - original).reshape(shape[0], -1, 16).abs()
    assert (error <= block_amax / 3 + 1e-6).all()
    assert ((ours - original).norm() / original.norm()).item() < 0.12


def test_fused_linears_share_one_global_scale_and_input_scale():
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "a.q.weight": torch.randn(32, 64, generator=gen),
        "a.k.weight": 5 * torch.randn(16, 64, generator=gen),
        "a.o.weight": torch.randn(64, 32, generator=gen),
        "a.norm.weight": torch.ones(64),
    }
    out = nvfp4.quantize_linears(tensors, ["a.q", "a.k", "a.o"], [("a.q", "a.k")], input_amax=4.0)
    assert torch.equal(out["a.q.weight_scale_2"], out["a.k.weight_scale_2"])
    amax = max(tensors["a.q.weight"].abs().max(), tensors["a.k.weight"].abs().max())
    assert out["a.q.weight_scale_2"].item() == pytest.approx(amax.item() / 2688)
    assert out["a.o.weight_scale_2"].item() == pytest.approx(tensors["a.o.weight"].abs().max().item() / 2688)
    assert out["a.q.input_scale"].item() == pytest.approx(4.0 / 2688)
    assert torch.equal(out["a.norm.weight"], tensors["a.norm.weight"])
    assert set(out) == set(tensors) | {
        f"a.{m}.{s}" for m in "qko" for s in ("weight_scale", "weight_scale_2", "input_scale")
    }


def test_quant_configs_are_what_vllms_modelopt_loader_accepts():
    from vllm.model_executor.layers.quantization.modelopt import ModelOptNvFp4Config

    hf_quant_config, quantization_config = nvfp4.quant_configs(["lm_head", "mtp*"])
    for raw in (hf_quant_config, quantization_config):
        config = ModelOptNvFp4Config.from_config(raw)
        assert config.quant_method == "NVFP4"  # W4A4; not downgraded to W4A16
        assert config.is_checkpoint_nvfp4_serialized and config.group_size == 16
        assert config.exclude_modules == ["lm_head", "mtp*"]
    assert ModelOptNvFp4Config.override_quantization_method(quantization_config, None) == "modelopt_fp4"
