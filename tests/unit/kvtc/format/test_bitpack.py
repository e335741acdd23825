import pytest
import torch

from lnarize_serve.kvtc.format.bitpack import (bit_offsets, check_offsets, pack_codes, unpack_codes,
                                               word_packed_offsets)


@pytest.mark.parametrize("width", range(1, 9))
def test_uniform_width_round_trip(width):
    generator = torch.Generator().manual_seed(width)
    num_components = 13  # odd count: codes straddle byte boundaries for most widths
    bits = torch.full((2, num_components), width, dtype=torch.int32)
    num_bytes = (width * num_components + 7) // 8
    codes = torch.randint(0, 2 ** width, (5, 2, num_components), generator=generator)
    offsets = bit_offsets(bits)  # dense prefix sums: codes straddle bytes
    packed = pack_codes(codes, bits, offsets, num_bytes)
    assert packed.dtype == torch.uint8 and packed.shape == (5, 2, num_bytes)
    assert torch.equal(unpack_codes(packed, bits, offsets), codes.to(torch.int32))


@pytest.mark.parametrize("width", range(1, 9))
def test_word_packed_round_trip(width):
    generator = torch.Generator().manual_seed(width)
    num_components = 64 // width + 3
    widths = [width] * num_components
    offsets = word_packed_offsets(widths, 12)
    assert offsets is not None
    for off in offsets:  # no code straddles a 32-bit word
        assert off % 32 + width <= 32
    bits = torch.tensor([widths], dtype=torch.int32)
    offs = torch.tensor([offsets], dtype=torch.int32)
    codes = torch.randint(0, 2 ** width, (9, 1, num_components), generator=generator)
    assert torch.equal(unpack_codes(pack_codes(codes, bits, offs, 12), bits, offs),
                       codes.to(torch.int32))


def test_layout_is_little_endian_bit_stream():
    # widths 3 then 5 then 2: code0 in bits 0-2, code1 in bits 3-7, code2 in bits 8-9
    bits = torch.tensor([[3, 5, 2]], dtype=torch.int32)
    codes = torch.tensor([[[0b101, 0b11001, 0b10]]])
    packed = pack_codes(codes, bits, bit_offsets(bits), 2)
    assert packed[0, 0].tolist() == [0b11001101, 0b00000010]


def test_mixed_widths_and_padding_per_head():
    generator = torch.Generator().manual_seed(0)
    bits = torch.tensor([[8, 7, 6, 5, 4, 3, 2, 1], [3, 3, 3, 1, 0, 0, 0, 0]], dtype=torch.int32)
    levels = (1 << bits.long())
    codes = (torch.rand(7, 2, 8, generator=generator) * levels).long()
    codes = torch.where(bits > 0, codes, 0)
    offsets = bit_offsets(bits)
    packed = pack_codes(codes, bits, offsets, 5)
    # trailing bits beyond the last code stay zero
    assert int(packed[:, 1, 2:].sum()) == 0
    assert torch.equal(unpack_codes(packed, bits, offsets), codes.to(torch.int32))


def test_word_packing_rule():
    # worst-fit: each code goes to the emptiest word (ties: lowest index)
    assert word_packed_offsets([8, 8, 4, 4, 3], 8) == [0, 32, 8, 40, 12]
    assert word_packed_offsets([8] * 9, 8) is None  # 72 bits cannot fit 64
    assert word_packed_offsets([7, 7, 7, 7, 7, 7, 7, 7, 7], 8) is None  # fits bits, not words
    with pytest.raises(ValueError, match="multiple of 4"):
        word_packed_offsets([1], 6)


def test_offsets_and_overflow():
    bits = torch.tensor([[2, 3, 4]])
    assert bit_offsets(bits).tolist() == [[0, 2, 5]]
    with pytest.raises(ValueError, match="holds 8 bits"):
        pack_codes(torch.zeros(1, 1, 3, dtype=torch.long), bits, bit_offsets(bits), 1)
    with pytest.raises(ValueError, match="overlap"):
        check_offsets(bits, torch.tensor([[0, 1, 5]]), 2)
