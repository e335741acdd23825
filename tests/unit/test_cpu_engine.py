import pytest

from lnarize_serve.cpu_engine import isa_name


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (dict(amx=True, avx512_bf16=True, avx512=True, avx2=True), "amx"),
        (dict(amx=False, avx512_bf16=True, avx512=True, avx2=True), "avx512_bf16"),
        (dict(amx=False, avx512_bf16=False, avx512=True, avx2=True), "avx512"),
        (dict(amx=False, avx512_bf16=False, avx512=False, avx2=True), "avx2"),
        (dict(amx=False, avx512_bf16=False, avx512=False, avx2=False), "none of avx2/avx512/amx"),
    ],
)
def test_isa_name_is_the_most_capable_set(flags, expected):
    assert isa_name(**flags) == expected
