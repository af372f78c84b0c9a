"""Per-request block tables on top of the BlockPool: prefix-cache lookups, slot allocation,
forks that share blocks and copy-on-write when a shared block is written."""

from __future__ import annotations

from strata.core.block_pool import BlockHash, BlockPool, KVCacheBlock, hash_block_tokens
from strata.core.request import Request


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_caching: bool):
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_caching)
        self.req_blocks: dict[str, list[KVCacheBlock]] = {}
        self._req_hashes: dict[str, list[BlockHash]] = {}
        self._num_cached_blocks: dict[str, int] = {}
        # (src_block_id, dst_block_id) copies the runner must do before the next forward.
        self.pending_copies: list[tuple[int, int]] = []

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    def block_ids(self, request_id: str) -> list[int]:
        return [b.block_id for b in self.req_blocks.get(request_id, ())]

    def _block_hashes(self, request: Request, num_full_blocks: int) -> list[BlockHash]:
        hashes = self._req_hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while len(hashes) < num_full_blocks:
            i = len(hashes)
            tokens = [request.token_at(j) for j in range(i * bs, (i + 1) * bs)]
            hashes.append(hash_block_tokens(hashes[-1] if hashes else None, tokens))
        return hashes[:num_full_blocks]

    def get_computed_blocks(self, request: Request) -> tuple[list[KVCacheBlock], int]:
        """Longest cached prefix of the request, in whole blocks. At least one token is always
        left to compute, because the step that computes it produces the next token's logits."""
        if not self.pool.enable_caching or request.sampling_params.prompt_logprobs is not None:
            return [], 0
        max_blocks = (request.num_tokens - 1) // self.block_size
        hits: list[KVCacheBlock] = []
        for block_hash in self._block_hashes(request, max_blocks):
            block = self.pool.get_cached_block(block_hash)
            if block is None:
                break
            hits.append(block)
        self.pool.num_queries += max_blocks
        self.pool.num_hits += len(hits)
        return hits, len(hits) * self.block_size

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: list[KVCacheBlock] = ()) -> bool:
        """Make room for ``num_new_tokens`` more tokens after ``request.num_computed_tokens``
        (plus any prefix-cache hits). Returns False, changing nothing, when blocks run out."""
        blocks = self.req_blocks.setdefault(request.request_id, [])
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        total = num_computed + num_new_tokens
        num_needed = cdiv(total, self.block_size) - len(blocks) - len(computed_blocks)
        # A shared partial block about to be written must be copied first.
        cow_index = num_computed // self.block_size
        needs_cow = (num_computed % self.block_size != 0 and cow_index < len(blocks)
                     and blocks[cow_index].ref_cnt > 1)
        revived = sum(1 for b in computed_blocks if b.ref_cnt == 0)   # leave the free queue
        if max(num_needed, 0) + int(needs_cow) + revived > self.pool.num_free_blocks:
            if not blocks:
                del self.req_blocks[request.request_id]
            return False
        if computed_blocks:
            self.pool.touch(computed_blocks)
            blocks.extend(computed_blocks)
        if needs_cow:
            (copy,) = self.pool.allocate(1)
            self.pending_copies.append((blocks[cow_index].block_id, copy.block_id))
            self.pool.free([blocks[cow_index]])
            blocks[cow_index] = copy
        if num_needed > 0:
            blocks.extend(self.pool.allocate(num_needed))
        self._cache_full_blocks(request, blocks, total)
        return True

    def _cache_full_blocks(self, request: Request, blocks: list[KVCacheBlock], num_tokens: int) -> None:
        """Index every block that will be full once this step's tokens are computed and whose
        token ids are all known (a placeholder's block waits for a later step): later steps only
        ever read them."""
        if not self.pool.enable_caching:
            return
        num_full = min(num_tokens, request.num_tokens) // self.block_size
        start = self._num_cached_blocks.get(request.request_id, 0)
        if num_full <= start:
            return
        hashes = self._block_hashes(request, num_full)
        for i in range(start, num_full):
            self.pool.cache_block(blocks[i], hashes[i])
        self._num_cached_blocks[request.request_id] = num_full

    def cache_computed_blocks(self, request: Request) -> None:
        """Index the full blocks whose tokens are known and computed (or being computed by a
        launched step). With async scheduling the last one may have held a placeholder when its
        step was scheduled, and a request ending by length is not scheduled again to catch up."""
        blocks = self.req_blocks.get(request.request_id)
        if blocks:
            self._cache_full_blocks(request, blocks, min(request.num_computed_tokens, request.num_tokens))

    def fork(self, parent: Request, child: Request, num_tokens: int) -> None:
        """Let ``child`` share the blocks holding the parent's first ``num_tokens`` tokens."""
        shared = self.req_blocks[parent.request_id][: cdiv(num_tokens, self.block_size)]
        self.pool.touch(shared)
        self.req_blocks[child.request_id] = list(shared)
        self._num_cached_blocks[child.request_id] = min(
            self._num_cached_blocks.get(parent.request_id, 0), num_tokens // self.block_size)

    def free(self, request: Request) -> None:
        blocks = self.req_blocks.pop(request.request_id, [])
        self.pool.free(reversed(blocks))
        self._num_cached_blocks.pop(request.request_id, None)

    def forget(self, request: Request) -> None:
        """Drop the cached hashes of a finished request (a preempted one keeps them)."""
        self._req_hashes.pop(request.request_id, None)

    def take_pending_copies(self) -> list[tuple[int, int]]:
        copies, self.pending_copies = self.pending_copies, []
        return copies
