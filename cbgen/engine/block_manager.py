"""KV block bookkeeping: free list, ref counts, prefix hashes of full blocks. No torch.

Invariants:
- a block is either referenced (ref_count > 0, owned by >= 1 request) or in
  ``_free`` (ref_count == 0); never both.
- a free block may still carry a hash: its KV stays valid and findable by the
  prefix cache until the block is handed out again (then its hash is dropped).
- only FULL blocks are hashed; the hash of block i chains the hash of block
  i-1, so equal hashes mean equal whole prefixes.
"""

from __future__ import annotations

from collections import OrderedDict

from .request import Request


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        assert num_blocks > 0 and block_size > 0
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hash: list[int | None] = [None] * num_blocks
        self.hash_to_block: dict[int, int] = {}
        # Taken from the front. Freed blocks with no hash go to the front (nothing to keep,
        # and their memory is warm); hashed ones to the back, so cached prefixes are evicted
        # least recently freed first. On CPU this also keeps RSS low: the pool is allocated
        # lazily, and a run that caches nothing reuses a few hot blocks instead of touching
        # every page of the pool.
        self._free: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.prefix_queries = 0   # prompt tokens looked up in the prefix cache
        self.prefix_hits = 0      # of those, tokens found

    # ---- derived figures -------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_tokens(self) -> int:
        """Tokens the whole pool holds."""
        return self.num_blocks * self.block_size

    @property
    def usage(self) -> float:
        return 1.0 - len(self._free) / self.num_blocks

    @property
    def hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- allocation ------------------------------------------------------
    def _take_free(self) -> int:
        block, _ = self._free.popitem(last=False)
        old = self.block_hash[block]
        if old is not None:
            # Evicting a cached block: it no longer answers prefix lookups.
            if self.hash_to_block.get(old) == block:
                del self.hash_to_block[old]
            self.block_hash[block] = None
        self.ref_counts[block] = 1
        return block

    def _chain_hash(self, prev: int | None, tokens: list[int]) -> int:
        return hash((prev, tuple(tokens)))

    def _match_prefix(self, req: Request) -> list[int]:
        """Blocks holding the longest cached prefix of ``req.token_ids``.

        At least one token is always left to compute: the step needs its logits.
        None is reused for a request that still needs prompt logprobs: a cache hit
        would skip computing the logits of the prompt positions it must report.
        """
        if not self.enable_prefix_caching or req.needs_prompt_logprobs:
            return []
        bs = self.block_size
        max_blocks = (req.num_tokens - 1) // bs
        blocks, prev = [], None
        for i in range(max_blocks):
            prev = self._chain_hash(prev, req.token_ids[i * bs:(i + 1) * bs])
            block = self.hash_to_block.get(prev)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def admit(self, req: Request, num_new_tokens: int) -> int | None:
        """Give a waiting request (no blocks yet) its cached prefix plus room for
        ``num_new_tokens`` more tokens. Returns the number of prefix tokens
        reused (the caller sets ``num_computed_tokens``), or None, changing
        nothing, when the pool cannot hold it.
        """
        assert not req.block_table and req.num_computed_tokens == 0
        hit = self._match_prefix(req)
        num_cached = len(hit) * self.block_size
        num_new_tokens = min(num_new_tokens, req.num_tokens - num_cached)
        need_new = self.blocks_needed(num_cached + num_new_tokens) - len(hit)
        # Hit blocks that sit in the free list stop being free once we take them.
        revived = sum(1 for b in hit if self.ref_counts[b] == 0)
        if need_new > self.num_free_blocks - revived:
            return None
        for b in hit:
            if self.ref_counts[b] == 0:
                del self._free[b]
            self.ref_counts[b] += 1
        req.block_table = hit + [self._take_free() for _ in range(need_new)]
        req.block_hashes = [self.block_hash[b] for b in hit]  # type: ignore[misc]
        self.prefix_queries += req.num_prompt_tokens if req.num_preemptions == 0 else 0
        self.prefix_hits += min(num_cached, req.num_prompt_tokens) if req.num_preemptions == 0 else 0
        return num_cached

    def grow(self, req: Request, num_new_tokens: int) -> bool:
        """Make room for ``num_new_tokens`` beyond ``num_computed_tokens``.
        Returns False, changing nothing, when the pool is out of blocks."""
        need = self.blocks_needed(req.num_computed_tokens + num_new_tokens) - len(req.block_table)
        if need <= 0:
            return True
        if need > self.num_free_blocks:
            return False
        req.block_table.extend(self._take_free() for _ in range(need))
        return True

    def cache_full_blocks(self, req: Request) -> None:
        """Register the hashes of blocks that became full of computed tokens."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = req.num_computed_tokens // bs
        prev = req.block_hashes[-1] if req.block_hashes else None
        for i in range(len(req.block_hashes), num_full):
            prev = self._chain_hash(prev, req.token_ids[i * bs:(i + 1) * bs])
            req.block_hashes.append(prev)
            block = req.block_table[i]
            if self.block_hash[block] is None:
                self.block_hash[block] = prev
                # First writer wins: an equal block computed elsewhere stays the canonical one.
                self.hash_to_block.setdefault(prev, block)

    def free(self, req: Request) -> None:
        """Drop ``req``'s references; tail blocks are freed first so that they
        are evicted before the shared prefix blocks."""
        for block in reversed(req.block_table):
            self.ref_counts[block] -= 1
            assert self.ref_counts[block] >= 0
            if self.ref_counts[block] == 0:
                self._free[block] = None
                if self.block_hash[block] is None:
                    self._free.move_to_end(block, last=False)
        req.block_table = []
        req.block_hashes = []

    def all_free(self) -> bool:
        return len(self._free) == self.num_blocks and not any(self.ref_counts)
