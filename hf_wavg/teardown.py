"""Leaving a process group together at exit.

A gloo rank that exits while a peer still works (rank 0 writing the model card and reports
after the last collective, say) can abort in gloo's teardown ("terminate called without an
active exception"), and the launcher then reports the run as failed although every file was
written. Users' training scripts rarely end with a barrier, so once hf_wavg averages under
a process group it registers an exit hook that waits for every rank and destroys the
group, as torch asks programs to do before they exit. A process leaving on an uncaught
exception skips the wait: its peers may be stuck in a collective it will never join, and
the launcher stops them only once it has gone.
"""

from __future__ import annotations

import atexit
import datetime
import logging
import sys

import torch.distributed as dist

logger = logging.getLogger(__name__)
# How long a rank waits at exit for the others (e.g. rank 0 pushing to the Hub). A rank
# that died is reported by the launcher, which stops its peers, well before this.
EXIT_BARRIER_TIMEOUT = datetime.timedelta(minutes=30)
_registered = False
_failed = False


def leave_together_at_exit() -> None:
    """Register (once per process) the exit hook :func:`_leave_together`, and note uncaught
    exceptions so that a failing process leaves at once."""
    global _registered
    if _registered:
        return
    previous_hook = sys.excepthook

    def note_failure(*exc_info) -> None:
        global _failed
        _failed = True
        previous_hook(*exc_info)

    sys.excepthook = note_failure
    atexit.register(_leave_together)
    _registered = True


def _leave_together() -> None:
    """Wait for every rank, then destroy the default process group, unless the program has
    destroyed it already or is leaving on an uncaught exception."""
    if _failed or not (dist.is_available() and dist.is_initialized()):
        return
    try:
        if dist.get_backend() == "gloo":
            dist.monitored_barrier(timeout=EXIT_BARRIER_TIMEOUT)
        else:
            dist.barrier()
    except Exception as error:  # noqa: BLE001  (a peer is gone, whatever the error: leave anyway)
        logger.warning("hf_wavg: ranks did not meet at exit (%s); leaving the process group", error)
    finally:
        dist.destroy_process_group()
