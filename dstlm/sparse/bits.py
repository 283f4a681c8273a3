"""Bit-packed bool masks: 1 bit per entry, in checkpoints, mask files and the cross-rank join of masks. Plain
torch, no distributed state: read by the sparse core and by whatever stores masks."""

from __future__ import annotations

import torch

# byte v -> the 8 bytes (0/1) of its bits, as one int64 each (little-endian: bit i in byte i)
_UNPACK = torch.tensor([[(v >> i) & 1 for i in range(8)] for v in range(256)], dtype=torch.uint8).view(torch.int64)
_UNPACK = _UNPACK.view(-1)
_POPCOUNT = torch.tensor([bin(v).count("1") for v in range(256)], dtype=torch.uint8)  # byte v -> its set bits
_TABLES_ON: dict[tuple[str, torch.device], torch.Tensor] = {}


def _table_on(name: str, table: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A lookup table copied to `device` once."""
    key = (name, device)
    if key not in _TABLES_ON:
        _TABLES_ON[key] = table.to(device)
    return _TABLES_ON[key]


def pack_bits(bits: torch.Tensor) -> torch.Tensor:
    """uint8 [8 m] of 0/1 -> uint8 [m], bit i of byte j = bits[8 j + i]. Each 8 bytes are read as one int64 and
    their low bits gathered by multiplying each 4-byte half by 2^7 + 2^14 + 2^21 + 2^28 (no int64 overflow;
    ~4x cheaper than a multiply-and-sum over bytes on the CPU)."""
    words = bits.contiguous().view(torch.uint8)
    if words.storage_offset() % 8:
        words = words.clone()
    words = words.view(torch.int64)
    lo = ((words & 0xFFFFFFFF) * 0x10204080) >> 28
    hi = ((words >> 32) * 0x10204080) >> 24
    return ((lo & 0xF) | (hi & 0xF0)).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, numel: int) -> torch.Tensor:
    """pack_bits' inverse: bool [numel] (a table lookup of 8 bytes per packed byte)."""
    table = _table_on("unpack", _UNPACK, packed.device)
    return table.index_select(0, packed.to(torch.int64)).view(torch.uint8).view(torch.bool)[:numel]


_PACK_CHUNK = 1 << 21  # entries packed at a time: pack_bits' int64 temporaries stay ~6 MB whatever the mask


def pack_mask(mask: torch.Tensor) -> torch.Tensor:
    """A bool tensor bit-packed (flat order, zero-padded to whole bytes): uint8 [ceil(numel / 8)], packed a
    chunk at a time."""
    flat = mask.reshape(-1)
    n = flat.numel()
    out = torch.empty(-(-n // 8), dtype=torch.uint8, device=mask.device)
    for a in range(0, n, _PACK_CHUNK):
        b = min(n, a + _PACK_CHUNK)
        if (b - a) % 8 == 0:
            out[a // 8:b // 8] = pack_bits(flat[a:b].view(torch.uint8))
        else:  # the tail: zero-padded to a whole byte
            bits = torch.zeros(-(-(b - a) // 8) * 8, dtype=torch.uint8, device=mask.device)
            bits[:b - a] = flat[a:b]
            out[a // 8:] = pack_bits(bits)
    return out


def count_packed(packed: torch.Tensor) -> int:
    """Set bits of a packed mask (a 256-entry popcount table; nothing unpacked)."""
    table = _table_on("popcount", _POPCOUNT, packed.device)
    return int(table.index_select(0, packed.to(torch.int64)).sum(dtype=torch.int64))
