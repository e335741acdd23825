"""The recent-token window: each query row's last W positions served exactly.

vLLM 0.32 hands an attention backend block tables, not request identities, so
exact copies are kept per *cache location*: a small pool of exact
sub-blocks (S consecutive slots of one block), keyed by ``slot // S``.

- Once per step, :class:`WindowPool` (owned by the metadata builder) gives
  every sub-block holding one of a running sequence's last W + 15 positions
  (the oldest verify row's window too) a pool entry, evicting the least recently needed entries no sequence needs
  now. A reassigned entry gets a new epoch, so exact copies of its former
  sub-block stop counting.
- Each layer writes the step's K/V into its own pool rows (next to the
  compressed slots) and stamps them with the entry's epoch.
- A read counts a window position exact when its row carries the entry's
  current epoch; each sequence uses the longest exact suffix of its window
  and reads the rest compressed.

Everything is tensor ops of fixed shapes on the cache's device (no host
sync, no request state): preemption, prefix caching and chunked prefill
need no hooks. A sequence whose window sub-blocks lost their entries (or a
prefix-cache hit on blocks whose copies were evicted) reads those positions
compressed: less exact, never wrong. Entries: ``max_num_seqs *
(ceil((W + 15) / S) + 2)``, enough for every sequence's window at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SUB_BLOCK = 16  # slots per pool entry; vLLM block sizes here are multiples of 16


# Rows of one step (MTP verification, short prompts) reach back this much
# further than the newest row: each row's own window must be in the pool.
MAX_ROW_SPREAD = 15


def pool_window(window_tokens: int) -> int:
    """Positions the pool keeps per sequence for a window of W per query row."""
    return window_tokens + MAX_ROW_SPREAD


def pool_entries(max_num_seqs: int, window_tokens: int, sub_block: int = SUB_BLOCK) -> int:
    return max_num_seqs * (-(-pool_window(window_tokens) // sub_block) + 2)


def pool_rows(entries: int, sub_block: int = SUB_BLOCK) -> int:
    """Rows of one layer's copies: every entry's slots plus the spare row."""
    return entries * sub_block + 1


@dataclass
class WindowStep:
    """What one step's layers need (all on the cache's device)."""

    sub_block: int
    entries: int
    write_row: torch.Tensor    # [T] pool row of each written token (the dummy row if none)
    write_epoch: torch.Tensor  # [T] epoch to stamp
    positions: torch.Tensor    # [B, W] the window's positions, seq_len - W + j
    read_row: torch.Tensor     # [B, W] pool row of each window position (dummy if none)
    read_epoch: torch.Tensor   # [B, W] epoch a valid copy carries (-1: none)


class WindowPool:
    """Entry bookkeeping shared by the layers of one KV cache group."""

    def __init__(self, window: int, entries: int, block_size: int, device: torch.device,
                 sub_block: int = SUB_BLOCK) -> None:
        if block_size % sub_block:
            raise ValueError(f"block size {block_size} is not a multiple of {sub_block}")
        self.window, self.entries, self.block_size, self.sub_block = (
            window, entries, block_size, sub_block)
        self.device = device
        self.owner = torch.full((entries + 1,), -1, dtype=torch.int64, device=device)
        self.epoch = torch.zeros(entries + 1, dtype=torch.int64, device=device)
        self.last_used = torch.zeros(entries + 1, dtype=torch.int64, device=device)
        self.clock = 0

    @property
    def dummy_row(self) -> int:
        return self.entries * self.sub_block

    def _lookup(self, keys: torch.Tensor) -> torch.Tensor:
        """Entry of each key (-1: none); keys < 0 map to -1."""
        match = (self.owner[None, : self.entries] == keys.reshape(-1, 1)) & (keys.reshape(-1, 1) >= 0)
        entry = torch.where(match.any(dim=1), match.to(torch.int8).argmax(dim=1), -1)
        return entry.reshape(keys.shape)

    def step(self, block_table: torch.Tensor, seq_lens: torch.Tensor,
             slot_mapping: torch.Tensor) -> WindowStep:
        """Assign entries for this step's windows; rows for writes and reads.

        block_table [B, max_blocks], seq_lens [B] (context after this step),
        slot_mapping [T] (-1 for padding).
        """
        self.clock += 1
        sub, bs, entries = self.sub_block, self.block_size, self.entries
        num_reqs = seq_lens.shape[0]
        positions = (seq_lens.to(torch.int64)[:, None] - self.window
                     + torch.arange(self.window, device=self.device)[None, :])
        in_window = positions >= 0
        clamped = positions.clamp_min(0)
        blocks = torch.gather(block_table[:num_reqs].to(torch.int64), 1, clamped // bs)
        slots = blocks * bs + clamped % bs
        keys = torch.where(in_window, slots // sub, -1)

        # one key per (sequence, sub-block) is enough to find what is needed
        head = torch.ones_like(in_window)
        head[:, 1:] = keys[:, 1:] != keys[:, :-1]
        needed = torch.where(head & in_window, keys, -1).flatten()
        entry = self._lookup(needed)
        in_use = torch.zeros(entries + 1, dtype=torch.bool, device=self.device)
        in_use[torch.where(entry >= 0, entry, entries)] = True

        # missing keys, deduplicated (sequences sharing prefix blocks)
        big = torch.iinfo(torch.int64).max
        missing = torch.where((needed >= 0) & (entry < 0), needed, big)
        ordered, _ = torch.sort(missing)
        first = ordered != big
        first[1:] &= ordered[1:] != ordered[:-1]
        rank = torch.cumsum(first.to(torch.int64), 0) - 1
        # free entries, least recently needed first (sized so there are enough)
        free_order = torch.argsort(
            torch.where(in_use[:entries], big, self.last_used[:entries]), stable=True)
        new_entry = torch.where(first, free_order[rank.clamp(0, entries - 1)], entries)
        self.owner[new_entry] = torch.where(first, ordered, -1)
        self.epoch[new_entry] += 1
        self.owner[entries] = -1

        entry = self._lookup(needed)
        self.last_used[torch.where(entry >= 0, entry, entries)] = self.clock

        write_entry = self._lookup(torch.where(slot_mapping >= 0, slot_mapping // sub, -1))
        write_row = torch.where(write_entry >= 0, write_entry * sub + slot_mapping % sub,
                                self.dummy_row)
        write_epoch = self.epoch[torch.where(write_entry >= 0, write_entry, entries)]
        read_entry = self._lookup(keys)
        read_row = torch.where(read_entry >= 0, read_entry * sub + slots % sub, self.dummy_row)
        read_epoch = torch.where(read_entry >= 0,
                                 self.epoch[torch.where(read_entry >= 0, read_entry, entries)], -1)
        return WindowStep(sub, entries, write_row, write_epoch, positions, read_row,
                          read_epoch)


class LayerWindow:
    """One layer's exact copies: K/V rows [entries * S + 1, H, d] (the last
    row is a sink for tokens outside every window) and their epoch stamps."""

    def __init__(self, entries: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
                 device: torch.device, sub_block: int = SUB_BLOCK) -> None:
        self.keys = torch.zeros(pool_rows(entries, sub_block), num_kv_heads, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.stamp = torch.full((self.keys.shape[0],), -2, dtype=torch.int64, device=device)

    def write(self, key: torch.Tensor, value: torch.Tensor, step: WindowStep) -> None:
        """Copy the step's tokens (one per ``step.write_row``); rows of
        key/value past them are padding and are not written."""
        rows = step.write_row
        num_tokens = rows.shape[0]
        if key.shape[0] < num_tokens or value.shape[0] < num_tokens:
            raise ValueError(f"window write: {num_tokens} tokens in the step, key/value have "
                             f"{key.shape[0]}/{value.shape[0]} rows")
        self.keys[rows] = key[:num_tokens].to(self.keys.dtype)
        self.values[rows] = value[:num_tokens].to(self.values.dtype)
        self.stamp[rows] = step.write_epoch

    def exact_suffix(self, step: WindowStep, first_position: torch.Tensor) -> torch.Tensor:
        """[B, W] bool: window positions read exactly — the longest run of
        valid copies ending at the newest position, not before
        ``first_position[b]`` (the positions before it are served otherwise)."""
        valid = (self.stamp[step.read_row] == step.read_epoch) & (step.read_epoch >= 0)
        valid &= step.positions >= first_position[:, None]
        # a position counts only if every newer one in the window is valid too
        return torch.flip(torch.cumprod(torch.flip(valid, [1]).to(torch.int8), 1), [1]).bool()
