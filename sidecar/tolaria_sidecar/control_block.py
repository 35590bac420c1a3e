"""Opening the run's shared-memory control block: re-attached when valid and large enough,
else created, with the emergency record carried over.

Called once by the `Sidecar` as it is built, before any slot, store or thread exists. The
control block outlives a sidecar restart (its emergency generation carries on), so this
never resets a valid one, and it never maps or removes a file at its name that is not this
user's plain 0600 segment (R13.1).
"""

from __future__ import annotations

import contextlib
import logging

from leyline.shm import ControlBlock, ForeignSegment, ShmError, control_name, unlink_own
from tolaria_sidecar.config import SidecarConfig
from tolaria_sidecar.errors import ConfigInvalid

logger = logging.getLogger(__name__)


def open_control_block(config: SidecarConfig) -> ControlBlock:
    """Re-attaches this instance's control block when valid and large enough, else creates it.

    A recreated block gets a new inode (stale mappings stay harmless) and keeps the old
    emergency record when it was readable, so generations keep increasing. A file at the
    control block's name that is not this user's plain 0600 segment is refused
    (`ConfigInvalid`), never mapped or removed (R13.1).
    """
    path = config.shm_dir / control_name(config.instance_id)
    carried = None
    if path.exists() or path.is_symlink():
        try:
            control = ControlBlock.attach(path, instance_id=config.instance_id)
        except ForeignSegment as err:
            raise ConfigInvalid("--instance-id", f"{err}; refusing to use it") from err
        except (ShmError, OSError) as err:
            logger.warning("control block %s unusable (%s); recreating it", path, err)
        else:
            if control.slot_count >= config.snapshots.slots:
                logger.info(
                    "re-attached control block %s (emergency generation %d)",
                    path,
                    control.emergency_generation(),
                )
                return control
            with contextlib.suppress(ShmError):
                carried = control.read_emergency()
            logger.warning(
                "control block %s has %d slot lines, %d needed; recreating it",
                path,
                control.slot_count,
                config.snapshots.slots,
            )
            control.close()
    config.shm_dir.mkdir(parents=True, exist_ok=True)
    try:
        unlink_own(path)
        control = ControlBlock.create(path, config.snapshots.slots, instance_id=config.instance_id)
    except (ForeignSegment, FileExistsError) as err:
        raise ConfigInvalid("--instance-id", f"{path}: {err}; refusing to use it") from err
    except ShmError as err:
        raise ConfigInvalid("shared memory", str(err)) from err
    if carried is not None and carried.generation:
        control.write_emergency(carried)
    return control
