"""A DST method written the way docs/architecture.md says a user writes one: one registered class, no code about
where the entries live. tests/test_methods.py and tests/test_dist.py run it in one process, on 2-rank DDP and
on 2-rank ZeRO-3 with partitioned masks (rank processes import it through DSTLM_METHOD_MODULE)."""

from dstlm.sparse.methods import DSTMethod, register


@register
class SaliencyRigL(DSTMethod):
    name = "test-saliency"
    summary = "drop the active weights of least first-order saliency |W x dL/dW|, regrow the largest |dL/dW|"
    uses_dense_grad = True

    def update(self, layer, shard, n_swap, t, schedule, ties):
        s, mask, score = shard.select, shard.mask, shard.score
        nnz = s.count(mask)
        kept = s.top(shard.weight * score, nnz - n_swap, ties.sub("keep"), inside=mask, total=nnz)
        return s.top(score, n_swap, ties.sub("grow"), outside=kept, into=kept)
