"""Which rank was lost: when a collective fails (a peer died: its sockets closed; or hung: the wait ran into
trainer.collective_timeout_s), the survivors name the rank(s) that stopped answering instead of printing the
backend's traceback about a socket.

Every rank records the last step it finished in the rendezvous store (one small key per rank, set once per
optimizer step). A rank whose collective failed says so in the store and waits a few seconds for the other
survivors to say so too: the ranks that do not are the lost ones (with the last step they finished). If the
store itself is gone, rank 0, which hosts it, is.
"""

from __future__ import annotations

import time
from datetime import timedelta

import lightning as L
import torch.distributed as dist

from dstlm.training.resilience.nonfinite import last_checkpoint

KEY = "dstlm/finished_step/{rank}"
FAILED = "dstlm/failed_at/{rank}"
ANSWER_S = 3.0  # how long survivors wait for each other to say so


class RankLostError(ConnectionError):
    """Another rank died or hung (a ConnectionError: the command line prints it as one line)."""


class RankLiveness(L.Callback):
    def __init__(self, timeout_s: int | None) -> None:
        self.timeout_s = timeout_s

    @staticmethod
    def _store():
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return None
        try:
            return dist.distributed_c10d._get_default_store()  # noqa: SLF001 (the rendezvous TCPStore)
        except (RuntimeError, ValueError):
            return None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        store = self._store()
        if store is not None and trainer.global_step != getattr(self, "_recorded", None):
            self._recorded = trainer.global_step
            store.set(KEY.format(rank=trainer.global_rank), str(trainer.global_step))

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        if not isinstance(exception, (dist.DistError, RuntimeError)) or isinstance(exception, RankLostError):
            return
        store = self._store()
        if store is None or not _collective_failure(exception):
            return
        world, me = dist.get_world_size(), trainer.global_rank
        steps: dict[int, int] = {}
        try:
            # every survivor says it is alive; whoever has not said so within a few seconds is the lost one
            store.set_timeout(timedelta(seconds=5))
            store.set(FAILED.format(rank=me), str(trainer.global_step))
            deadline = time.monotonic() + ANSWER_S
            while True:
                alive = {r for r in range(world) if store.check([FAILED.format(rank=r)])}
                if len(alive) == world or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            for rank in range(world):
                key = KEY.format(rank=rank)
                if store.check([key]):
                    steps[rank] = int(store.get(key))
        except Exception as e:  # noqa: BLE001 (the store went with rank 0)
            lost, answered = [0], str(e).splitlines()[0][:120]
        else:
            lost, answered = sorted(set(range(world)) - alive), None
        wait = f"trainer.collective_timeout_s={self.timeout_s} s" if self.timeout_s else "torch's 30 min"
        who = f"rank(s) {lost}" if lost else "another rank"
        seen = (f" (rank 0 hosted the rendezvous store, which did not answer: {answered})" if answered is not None
                else f" (last finished step: {', '.join(f'rank {r}: {steps.get(r, -1)}' for r in lost)})" if lost
                else "")
        last = last_checkpoint(trainer)
        where = f"the last good checkpoint is {last}" if last else "no checkpoint was written yet"
        raise RankLostError(
            f"rank {me} lost {who} at step {trainer.global_step}{seen}: dead, or hung beyond {wait}; training "
            f"stopped ({type(exception).__name__}: {str(exception).splitlines()[0][:160]})"
            f"; {where}; restart the job (--ckpt_path auto resumes)") from exception


def _collective_failure(e: BaseException) -> bool:
    text = str(e).lower()
    return isinstance(e, dist.DistError) or any(w in text for w in ("gloo", "nccl", "connection", "timed out",
                                                                    "timeout", "socket", "peer"))
