"""Every preset the settings can load says what it is for and carries its memory math."""

from __future__ import annotations

import pytest

from lnarize_serve.profiles import PROFILE_NAMES, profile_path


@pytest.mark.parametrize("name", PROFILE_NAMES)
def test_preset_is_commented_with_purpose_and_memory_math(name: str) -> None:
    text = profile_path(name).read_text()
    assert text.startswith(f'# Profile "{name}"'), "first line: what the preset is for"
    assert "Memory math" in text
