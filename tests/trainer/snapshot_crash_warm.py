"""Preloaded by the snapshot crash harness's forkserver (and only there): each forked child
then starts in milliseconds instead of seconds.

Warms torch's autograd and optimizer machinery (~1.5 s the first time) once. One intra-op
thread, because forking a process whose OpenMP pool has started can deadlock the child; the
test process itself never imports this module, so its thread count is untouched.
"""

import torch

from tests.trainer import snapshot_crash_child

torch.set_num_threads(1)
snapshot_crash_child.build()
