"""Load a Qwen3.6-shaped checkpoint into vLLM's own model classes on the CPU
and report what vLLM made of it, as JSON on the last stdout line.

What runs is vLLM 0.32's real code: the engine configuration (language model
only, MTP n=3), `Qwen3_5ForConditionalGeneration` and the `Qwen3_5MTP` draft,
the default safetensors loader with its checks (a checkpoint tensor no module
takes, or a parameter no tensor fills, is an error), the ModelOpt NVFP4 config
with its exclude list, and each layer's post-load processing (an NVFP4 scale
that never loaded is an error there).

Two stand-ins, both for paths this CPU machine cannot reach, neither on the
path being checked:
- NVFP4 GEMM kernel: vLLM has none registered for the CPU platform; its own
  software kernel (EmulationNvFp4LinearKernel, dequantize + matmul) is
  registered for it. The GPU selects Marlin (Hopper) or a native FP4 kernel
  (Blackwell) over the same parameters.
- torchvision: vLLM's qwen3_5 module imports the vision image processor,
  whose torchvision binary needs CUDA torch. The caller puts a stand-in
  `torchvision` package first on PYTHONPATH (TORCHVISION_STAND_IN below);
  image processing never runs: the model is loaded language-model only.

Usage: python tests/integration/test_model/vllm_load.py MODEL_DIR [REFERENCE_BF16_DIR]
With a reference, each NVFP4 layer is dequantized with vLLM's own
`dequantize_to_dtype` and compared with the reference bf16 weights.
       python tests/integration/test_model/vllm_load.py --generate MODEL_DIR
runs vLLM's CPU engine on a bf16 checkpoint (language model only, MTP n=3,
eager, prefix caching off: CPU_ENGINE_NOTES) and reports one greedy
generation and the speculative-decoding counters.
"""

from __future__ import annotations

import json
import sys

TORCHVISION_STAND_IN = '''
import importlib.machinery, sys, types

__version__ = "0.28.0"


class _Anything:
    def __init__(self, *args, **kwargs): pass
    def __call__(self, *args, **kwargs): return _Anything()
    def __getattr__(self, name):
        if name.startswith("__"): raise AttributeError(name)
        return _Anything()
    def __mro_entries__(self, bases): return (object,)


def __getattr__(name):
    if name.startswith("__"): raise AttributeError(name)
    return _Anything()


for _name in ("transforms", "transforms.v2", "transforms.v2.functional", "transforms.functional", "io", "ops"):
    _module = types.ModuleType(f"torchvision.{_name}")
    _module.__spec__ = importlib.machinery.ModuleSpec(_module.__name__, None, is_package=True)
    _module.__path__ = []
    _module.__getattr__ = __getattr__
    sys.modules[_module.__name__] = _module
'''

# Language model only, MTP n=3 as the server runs it; eager and without prefix
# caching as the CPU engine needs (CPU_ENGINE_NOTES).
ENGINE_SETTINGS = {
    "language_model_only": True,
    "enforce_eager": True,
    "dtype": "bfloat16",
    "max_model_len": 2048,
    "enable_prefix_caching": False,
    "speculative_config": {"method": "mtp", "num_speculative_tokens": 3},
}

# vLLM fused module -> the checkpoint modules it stacks, in its output order.
_FUSED_PARTS = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "in_proj_qkvz": ("in_proj_qkv", "in_proj_z"),
}


def _load(vllm_config, model_config):
    import torch
    from vllm.model_executor.model_loader import get_model_loader
    from vllm.model_executor.model_loader.utils import process_weights_after_loading
    from vllm.utils.torch_utils import set_default_torch_dtype

    # BaseModelLoader.load_model's steps, minus its accelerator cache release
    # (no accelerator here).
    loader = get_model_loader(vllm_config.load_config)
    with set_default_torch_dtype(model_config.dtype), torch.device("cpu"):
        model = loader.create_model(vllm_config=vllm_config, model_config=model_config)
    loader.load_weights(model, model_config)
    process_weights_after_loading(model, model_config, torch.device("cpu"))
    return model


def _methods(model) -> dict[str, list[str]]:
    methods: dict[str, list[str]] = {}
    for name, module in model.named_modules():
        method = getattr(module, "quant_method", None)
        if method is not None:
            methods.setdefault(type(method).__name__, []).append(name)
    return methods


def _compare_with_reference(model, reference_dir: str) -> dict:
    import torch
    from safetensors import safe_open
    from vllm.model_executor.layers.quantization.utils.nvfp4_emulation_utils import (
        dequantize_to_dtype,
    )

    worst = 0.0
    compared = 0
    with safe_open(f"{reference_dir}/model.safetensors", "pt") as reference:
        for name, module in model.named_modules():
            if type(getattr(module, "quant_method", None)).__name__ != "ModelOptLinearMethod":
                continue
            assert name.startswith("language_model.model."), name
            hf_name = "model.language_model." + name[len("language_model.model."):]
            parent, leaf = hf_name.rsplit(".", 1)
            parts = _FUSED_PARTS.get(leaf, (leaf,))
            original = torch.cat([reference.get_tensor(f"{parent}.{p}.weight") for p in parts]).float()
            served = dequantize_to_dtype(
                module.weight.data, module.weight_scale.data, module.weight_global_scale,
                torch.float32, 16, swizzle=False,
            )
            error = ((served - original).norm() / original.norm()).item()
            worst = max(worst, error)
            compared += 1
    return {"compared_layers": compared, "worst_relative_error": worst}


def main(model_dir: str, reference_dir: str | None = None) -> dict:
    import torch
    from vllm.config import set_current_vllm_config
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.engine.arg_utils import EngineArgs
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.model_executor.kernels.linear.nvfp4.emulation import EmulationNvFp4LinearKernel
    from vllm.platforms import PlatformEnum
    from vllm.utils.network_utils import get_open_port

    register_linear_kernel(EmulationNvFp4LinearKernel, PlatformEnum.CPU, "nvfp4")
    vllm_config = EngineArgs(model=model_dir, **ENGINE_SETTINGS).create_engine_config()
    draft_config = vllm_config.speculative_config.draft_model_config
    with set_current_vllm_config(vllm_config):
        init_distributed_environment(
            world_size=1, rank=0, local_rank=0, backend="gloo",
            distributed_init_method=f"tcp://127.0.0.1:{get_open_port()}",
        )
        initialize_model_parallel(1, 1)
        target = _load(vllm_config, vllm_config.model_config)
        draft = _load(vllm_config, draft_config)
        report = {
            "quantization": vllm_config.model_config.quantization,
            "target_class": type(target).__name__,
            "draft_class": type(draft).__name__,
            "target_methods": {k: len(v) for k, v in _methods(target).items()},
            "draft_methods": {k: len(v) for k, v in _methods(draft).items()},
            "quantized": sorted(_methods(target).get("ModelOptLinearMethod", [])),
            "draft_quantized": sorted(_methods(draft).get("ModelOptLinearMethod", [])),
            "parameter_dtypes": sorted(
                {str(p.dtype) for n, p in target.named_parameters() if n.endswith("weight")}
            ),
            "vision_tower": type(target.visual).__name__,
        }
        if reference_dir:
            report.update(_compare_with_reference(target, reference_dir))
        return report


def generate(model_dir: str) -> dict:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model_dir, max_num_seqs=4, disable_log_stats=False, **ENGINE_SETTINGS)
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    output = llm.generate(["The capital of France is"], params)[0].outputs[0]
    counters = {
        metric.name: metric.value
        for metric in llm.get_metrics()
        if metric.name.startswith("vllm:spec_decode") and hasattr(metric, "value")
    }
    return {
        "architecture": llm.llm_engine.vllm_config.model_config.architecture,
        "generated_tokens": len(output.token_ids),
        "spec_decode": counters,
    }


if __name__ == "__main__":
    if sys.argv[1] == "--generate":
        print(json.dumps(generate(sys.argv[2])))
    else:
        print(json.dumps(main(*sys.argv[1:3])))
