"""torchrun's agent for a trial, or a warm group, over several processes: ``python -m
harness.worker.group TORCHRUN_ARGS...`` is ``python -m torch.distributed.run`` that dies with the
driver.

Its ranks die with it (each sets ``die_with_parent``), but the agent itself would outlive a killed
driver, and a warm group's ranks with it, waiting for trials that never come. It watches for its
parent process to end rather than ask for a parent-death signal: that signal comes when the
*thread* that started it ends, and a warm group is started by a slot's thread, which may end
(its slot out of trials) while the driver still has the group to close cleanly.
"""

import os
import signal
import sys
import threading
import time


def die_with_driver() -> None:
    driver = os.getppid()

    def watch() -> None:
        while os.getppid() == driver:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="die-with-driver", daemon=True).start()


if __name__ == "__main__":
    die_with_driver()
    from torch.distributed.run import main

    main(sys.argv[1:])
