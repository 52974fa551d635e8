"""Caches of generation: the key/value cache of batched decoding, and image features.

One ``KVCache`` per decoder layer holds keys and values of shape ``[batch, kv_heads, capacity,
head_dim]``. Storage grows in blocks of ``step`` positions (or is reserved up front with
``reserve``), and new keys are written in place, so a decode step costs O(1) copies instead of the
O(length) copy that growing by concatenation costs. All rows share one offset: rows are
left-padded, so position ``offset`` is the next slot of every row. A ``static`` cache hands
attention its whole buffer (the unwritten slots are masked as future positions), so the shapes
attention sees change once per block instead of once per step. A growing cache hands over its
keys in whole ``KEY_BLOCK``s, so that a row's attention is the same bits in any batch (below).

``ImageFeatureCache`` keeps the projected features of recently seen images by content hash
(``ImageInput.key``), so rows that share an image (several prompts per image) encode it once.
``PrefixCache`` keeps the keys and values of a prompt's part up to its last image slot, so such rows
also prefill that part once.
"""

from __future__ import annotations

from collections import OrderedDict

import mlx.core as mx

# Attention sees keys in whole multiples of this many positions, the slots past the last
# written one masked (they hold zeros). A matmul's last few columns can take another code path
# in the BLAS (OpenBLAS computes a trailing 1-3 columns apart), so a key's score would depend
# on how many keys follow it: on its batch's padding. In whole blocks every key is computed
# the same way wherever it sits, and a row gives the same bits alone as in any batch.
KEY_BLOCK = 16


class KVCache:
    step = 256

    def __init__(self, static: bool = False):
        self.keys: mx.array | None = None
        self.values: mx.array | None = None
        self.offset = 0
        self.reserved = 0
        self.static = static

    @property
    def capacity(self) -> int:
        return 0 if self.keys is None else self.keys.shape[2]

    def _size_for(self, needed: int) -> int:
        """Positions an allocation for ``needed`` positions holds (whole blocks, the
        reservation included)."""
        return -(-max(needed, self.reserved) // self.step) * self.step

    def visible(self, end: int) -> int:
        """Keys attention sees once positions up to ``end`` are written: ``end`` in whole
        ``KEY_BLOCK``s, or for a static cache the whole buffer, as it will be then."""
        if not self.static:
            return -(-end // KEY_BLOCK) * KEY_BLOCK
        return self.capacity if end <= self.capacity else self._size_for(end)

    def _grow(self, keys: mx.array, values: mx.array, needed: int, batch: int = 0) -> None:
        """Room for ``needed`` positions, shaped like ``keys``/``values`` (``batch`` rows, if
        given); what is stored so far is kept."""
        _, heads, _, k_dim = keys.shape
        batch = batch or keys.shape[0]
        v_dim = values.shape[3]
        size = self._size_for(needed)
        new_k = mx.zeros((batch, heads, size, k_dim), keys.dtype)
        new_v = mx.zeros((batch, heads, size, v_dim), values.dtype)
        if self.keys is not None:
            new_k[..., : self.offset, :] = self.keys[..., : self.offset, :]
            new_v[..., : self.offset, :] = self.values[..., : self.offset, :]
        self.keys, self.values = new_k, new_v

    def reserve(self, total: int) -> None:
        """Make the next allocation hold ``total`` positions, so decoding never reallocates."""
        self.reserved = total

    def update_and_fetch(self, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
        """Write ``keys``/``values`` ``[B, H, L, D]`` at the current offset; return the first
        ``visible(end)`` positions."""
        start = self.offset
        end = start + keys.shape[2]
        if end > self.capacity:
            self._grow(keys, values, end)
        self.keys[..., start:end, :] = keys
        self.values[..., start:end, :] = values
        self.offset = end
        if self.static:
            return self.keys, self.values
        seen = self.visible(end)
        return self.keys[..., :seen, :], self.values[..., :seen, :]

    def write_row(self, row: int, batch: int, keys: mx.array, values: mx.array) -> None:
        """Place one row's prompt keys/values ``[1, H, L, D]`` so they end at this cache's
        offset (its left padding before them), allocating ``batch`` rows on first use."""
        if self.keys is None:
            self._grow(keys, values, self.offset, batch)
        start = self.offset - keys.shape[2]
        self.keys[row : row + 1, :, start : self.offset, :] = keys
        self.values[row : row + 1, :, start : self.offset, :] = values

    def last(self, width: int, rows: mx.array | None = None) -> tuple[mx.array, mx.array]:
        """The last ``width`` positions before the offset (fewer if fewer are written) of the
        batch rows ``rows`` (default: all), as views or gathered copies."""
        start = max(self.offset - width, 0)
        keys, values = (
            self.keys[..., start : self.offset, :],
            self.values[..., start : self.offset, :],
        )
        if rows is not None:
            keys, values = keys[rows], values[rows]
        return keys, values

    @property
    def state(self) -> tuple[mx.array, mx.array] | None:
        if self.keys is None:
            return None
        return self.keys[..., : self.offset, :], self.values[..., : self.offset, :]


def make_cache(num_layers: int, static: bool = False) -> list[KVCache]:
    return [KVCache(static) for _ in range(num_layers)]


def stack_rows(
    parts: list[tuple[KVCache, mx.array | None]], width: int, reserve: int, static: bool = False
) -> KVCache:
    """A new cache of the rows of ``parts`` (``rows`` of each part, None: all), one part after
    another, each row holding its part's last ``width`` positions before the part's offset and
    zeros before a part that holds fewer (masked as padding, like any left padding). Its offset is
    ``width`` and it has room for ``reserve`` positions; finished rows leave a batch and new rows
    join it this way, and positions that are padding in every row are cut off."""
    pieces = [part.last(width, rows) for part, rows in parts]
    batch = sum(keys.shape[0] for keys, _ in pieces)
    out = KVCache(static)
    out.reserve(reserve)
    out.offset = width
    sample_k, sample_v = pieces[0]
    out._grow(sample_k, sample_v, width, batch)
    row = 0
    for keys, values in pieces:
        rows, held = keys.shape[0], keys.shape[2]
        out.keys[row : row + rows, :, width - held : width, :] = keys
        out.values[row : row + rows, :, width - held : width, :] = values
        row += rows
    return out


class _BytesLRU:
    """Values by key, least recently used first out once they hold more than ``max_bytes``;
    a value larger than ``max_bytes`` is not kept."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = self.misses = 0
        self._entries: OrderedDict[str, tuple[object, int]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def fits(self, nbytes: int) -> bool:
        """Whether a value of ``nbytes`` would be kept."""
        return nbytes <= self.max_bytes

    def _get(self, key: str, count: bool = True):
        entry = self._entries.get(key)
        if entry is None:
            self.misses += count
            return None
        self.hits += count
        self._entries.move_to_end(key)
        return entry[0]

    def _put(self, key: str, value, nbytes: int) -> None:
        if key in self._entries or not self.fits(nbytes):
            return
        self._entries[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, (_, dropped) = self._entries.popitem(last=False)
            self.bytes -= dropped


class ImageFeatureCache(_BytesLRU):
    """Projected image features ``[num_tokens, hidden]`` by content hash, least recently used
    first out once they hold more than ``max_bytes``."""

    def __init__(self, max_bytes: int = 256 << 20):
        super().__init__(max_bytes)

    def get(self, key: str) -> mx.array | None:
        return self._get(key)

    def put(self, key: str, features: mx.array) -> None:
        self._put(key, features, features.nbytes)


class PrefixCache(_BytesLRU):
    """Per-layer ``(keys, values)`` ``[1, H, P, D]`` of prompt prefixes (see
    ``model.generate.prompt_prefix``), least recently used first out once they hold more than
    ``max_bytes``. The arrays must be evaluated and own their memory (not be slices of a larger
    cache)."""

    default_bytes = 1 << 30

    def __init__(self, max_bytes: int = default_bytes):
        super().__init__(max_bytes)

    @classmethod
    def for_memory(cls, memory_bytes: int | None, weight_bytes: int = 0) -> PrefixCache:
        """A cache of an eighth of the device's (or machine's) memory left beside the weights,
        at least the default. The planner runs the prompts over one image together, so a few
        prefixes are enough; what the cache does not take is left to the batches' KV cache."""
        return cls(max(cls.default_bytes, ((memory_bytes or 0) - weight_bytes) // 8))

    def get(self, key: str, count: bool = True) -> list[tuple[mx.array, mx.array]] | None:
        """The prefix's states, or None; ``count``: whether to count the hit or miss."""
        return self._get(key, count)

    def put(self, key: str, states: list[tuple[mx.array, mx.array]]) -> None:
        self._put(key, states, sum(k.nbytes + v.nbytes for k, v in states))
