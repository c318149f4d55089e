"""What a plan already sent will have done by the time the next one runs (pipelined loop).

With --pipeline-depth 1 the worker loop sends plan k+1 while the worker still runs plan
k, so the planner must see the sequences as plan k leaves them, not as the last report
(k-1) had them:

    report k-1 in | plan k+1 = policy(project(mirror, plan k)) | send | report k in | ...
    worker:   ... step k ........................................|step k+1 ...

Every scheduled item is assumed to run: its chunk is computed, a chunk that reaches the
end of the known tokens samples one (the first token's time is when plan k ends), and a
sequence that reaches its max_tokens ends there (its blocks go back to the free list).
What the report then says instead (a refused item, a sequence that finished on EOS) is
corrected when it arrives, one plan later than in the serial loop: the worker refuses
an item for a finished sequence, and a refused one is planned again. Pure: SeqView in,
SeqView out, nothing of Redis or gRPC.
"""
from __future__ import annotations

from dataclasses import replace

from .planner import SeqView, blocks_of, new_blocks_needed

# The plan fields that pause or drop a sequence's KV; the worker names them in an
# ItemError when it refuses one (pipelined: a sequence that finished a step before).
PREEMPTING_FIELDS = ("preempt", "checkpoint", "recompute")


def project(views: dict[str, SeqView], scheduled: list[tuple[str, int]], done_ms: float,
            block_size: int) -> tuple[dict[str, SeqView], int]:
    """(the views once `scheduled` has run, ending at done_ms; the blocks that takes from
    the free list: those it opens, less those of the sequences it finishes). A sequence
    that reaches its max_tokens (when known: > 0) finishes, so it leaves the views and the
    worker frees its blocks. The views given are not changed; a sequence not scheduled
    keeps its own view."""
    out = dict(views)
    num_blocks = 0
    for rid, num_tokens in scheduled:
        view = out.get(rid)
        n = min(num_tokens, view.num_uncomputed_tokens) if view is not None else 0
        if n <= 0:
            continue
        num_blocks += new_blocks_needed(view, n, block_size)
        view = replace(view, num_computed_tokens=view.num_computed_tokens + n, preempted=False)
        if view.num_computed_tokens == view.num_tokens:   # the chunk reaches the end: one token
            view.num_tokens += 1
            view.num_output_tokens += 1
            view.last_token_ms = done_ms
            if view.first_token_ms is None:
                view.first_token_ms = done_ms
        if 0 < view.max_tokens <= view.num_output_tokens:   # finished by length
            del out[rid]
            num_blocks -= blocks_of(view.num_computed_tokens, block_size)
        else:
            out[rid] = view
    return out, num_blocks


def reapply(views: dict[str, SeqView], recompute, pause, scheduled_ids) -> None:
    """What a plan made before the last report did to the mirror when it was made, which
    the report (its computed counts, a refused resume) must not undo: its recomputes start
    over, its pauses and checkpoints are paused, what it schedules runs. In place."""
    for rid in recompute:
        if rid in views:
            views[rid].num_computed_tokens, views[rid].preempted = 0, False
    for rid in pause:
        if rid in views:
            views[rid].preempted = True
    for rid in scheduled_ids:
        if rid in views:
            views[rid].preempted = False
