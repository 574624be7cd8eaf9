"""torchrun entry of tests/test_ddp.py: stage 02's command line, one rank killable.

``EMBBENCH_TEST_KILL_RANK=N`` makes rank N kill itself (SIGKILL, as a lost node would) right
after the first epoch's checkpoint; the other ranks are then left waiting in a collective.
"""

from __future__ import annotations

import os
import signal
import sys

import embbench.train.trainer as trainer_mod
from embbench.stages.finetune import main


def _kill_after_first_epoch(trainer, epoch: int) -> None:
    if epoch == 0 and trainer.dist.rank == int(os.environ["EMBBENCH_TEST_KILL_RANK"]):
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if os.environ.get("EMBBENCH_TEST_KILL_RANK"):
        trainer_mod._after_epoch = _kill_after_first_epoch
    sys.exit(main(sys.argv[1:]))
