"""Chat templates shipped with the package, selected by LNARIZE_CHAT_TEMPLATE.

``qwen3-fixed``: the Qwen3.5/3.6 structure for the qwen3_xml tool-call parser
(the VLM NVFP4 recipe's pairing). The upstream template of that recipe drops
an assistant turn's tool calls and mishandles ``enable_thinking=false``; this
one renders every tool call in Qwen's XML format and opens the answer with an
empty think block when thinking is off.
"""

from __future__ import annotations

from pathlib import Path

_DIR = Path(__file__).resolve().parent
SHIPPED_CHAT_TEMPLATES: dict[str, Path] = {path.stem: path for path in sorted(_DIR.glob("*.jinja"))}


def chat_template_path(value: str) -> Path:
    """The file of a shipped template name or a path; ValueError when neither."""
    if value in SHIPPED_CHAT_TEMPLATES:
        return SHIPPED_CHAT_TEMPLATES[value]
    path = Path(value).expanduser()
    if path.is_file():
        return path
    shipped = ", ".join(SHIPPED_CHAT_TEMPLATES)
    raise ValueError(f"{value!r} is neither a shipped chat template ({shipped}) nor a file")
