"""The pool of KV-cache blocks: reference counts, a free queue and the prefix-cache index.

A block whose reference count drops to zero goes to the *tail* of the free queue but keeps its
hash, so a later request with the same prefix can revive it; new allocations take blocks from
the *head*, evicting the least recently freed cached content first. A freed block with no hash
(prefix caching off, or a partly filled last block) holds nothing to revive: it goes to the head
and is the next one handed out, so no cached prefix is evicted while it waits, and the engine keeps
writing into cache memory it already touched (on a CPU a never-used block is a fresh page of a
calloc'd cache: its first write faults, ~6% of a 512-token prefill when every prompt walked the
whole pool).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Hashable, Iterable

# A chained block hash: (hash of the previous block's key, the block's token ids). Keeping the
# tokens in the key makes a lookup exact: a hash collision can never alias two prefixes.
BlockHash = tuple[int, tuple[int, ...]]


def hash_block_tokens(parent: BlockHash | None, token_ids: Iterable[int]) -> BlockHash:
    return (hash(parent) if parent is not None else 0, tuple(token_ids))


@dataclass(eq=False)
class KVCacheBlock:
    block_id: int
    ref_cnt: int = 0
    block_hash: Hashable | None = None


class BlockPool:
    def __init__(self, num_blocks: int, enable_caching: bool):
        if num_blocks < 1:
            raise ValueError(f"the KV cache needs at least one block, got num_blocks={num_blocks}")
        self.num_blocks = num_blocks
        self.enable_caching = enable_caching
        self.blocks = [KVCacheBlock(i) for i in range(num_blocks)]
        self._free: OrderedDict[int, KVCacheBlock] = OrderedDict((b.block_id, b) for b in self.blocks)
        self._cached: dict[Hashable, KVCacheBlock] = {}
        # Counters for metrics: prefix-cache lookups and hits, in blocks.
        self.num_queries = 0
        self.num_hits = 0

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    def get_cached_block(self, block_hash: Hashable) -> KVCacheBlock | None:
        return self._cached.get(block_hash) if self.enable_caching else None

    def allocate(self, num_blocks: int) -> list[KVCacheBlock]:
        if num_blocks > len(self._free):
            raise RuntimeError(f"asked for {num_blocks} blocks with only {len(self._free)} free")
        out = []
        for _ in range(num_blocks):
            _, block = self._free.popitem(last=False)
            self._evict(block)
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Take a reference on blocks found in the prefix cache or shared by a fork."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._free[block.block_id]
            block.ref_cnt += 1

    def free(self, blocks: Iterable[KVCacheBlock]) -> None:
        """Drop one reference each; callers pass a request's blocks tail first so the end of a
        sequence is evicted before its (more shareable) beginning."""
        for block in blocks:
            if block.ref_cnt <= 0:
                raise RuntimeError(f"double free of KV block {block.block_id}")
            block.ref_cnt -= 1
            if block.ref_cnt == 0:
                self._free[block.block_id] = block
                if block.block_hash is None:
                    self._free.move_to_end(block.block_id, last=False)

    def cache_block(self, block: KVCacheBlock, block_hash: Hashable) -> None:
        if not self.enable_caching or block.block_hash is not None:
            return
        if block_hash in self._cached:
            return   # the same content already lives in another block; keep the first
        block.block_hash = block_hash
        self._cached[block_hash] = block

    def _evict(self, block: KVCacheBlock) -> None:
        if block.block_hash is not None:
            if self._cached.get(block.block_hash) is block:
                del self._cached[block.block_hash]
            block.block_hash = None

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            if block.ref_cnt == 0:
                self._evict(block)
