"""Shared-memory segments belong to one instance of one user (R13.1): planted, swapped or
foreign segments are never created over, mapped or deleted."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from leyline.shm import (
    SLOT_DYNAMIC_AT,
    ControlBlock,
    ForeignSegment,
    LayoutMismatch,
    ShmFull,
    Slot,
    TornHeader,
    check_instance_id,
    control_name,
    instance_segments,
    remove_instance_segments,
    slot_name,
)

MINE = "instance-mine-0001"
THEIRS = "instance-theirs-02"
NOBODY = 65534


def make_slot(directory: Path, instance: str = MINE, index: int = 0) -> Slot:
    return Slot.create(
        directory / slot_name(instance, index),
        index,
        8192,
        4096,
        prefault=True,
        instance_id=instance,
    )


@pytest.mark.req("R13.1")
def test_segments_are_created_mode_0600_and_never_over_an_existing_file(tmp_path: Path) -> None:
    path = tmp_path / control_name(MINE)
    ControlBlock.create(path, 2, instance_id=MINE).close()
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(FileExistsError):
        ControlBlock.create(path, 2, instance_id=MINE)


@pytest.mark.req("R13.1")
def test_a_planted_symlink_is_neither_followed_on_create_nor_on_attach(tmp_path: Path) -> None:
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    path = tmp_path / control_name(MINE)
    path.symlink_to(target)
    with pytest.raises(FileExistsError):
        ControlBlock.create(path, 2, instance_id=MINE)
    with pytest.raises(ForeignSegment, match="symbolic link"):
        ControlBlock.attach(path, instance_id=MINE)
    assert target.read_bytes() == b"precious"


@pytest.mark.req("R13.1")
def test_a_segment_others_can_open_is_never_mapped(tmp_path: Path) -> None:
    make_slot(tmp_path).close()
    path = tmp_path / slot_name(MINE, 0)
    path.chmod(0o644)
    with pytest.raises(ForeignSegment, match="0644"):
        Slot.attach(path, instance_id=MINE)


@pytest.mark.req("R13.1")
def test_a_segment_of_another_user_is_never_mapped_or_removed(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("needs root to give a file to another user (CI runs as root)")
    make_slot(tmp_path).close()
    path = tmp_path / slot_name(MINE, 0)
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(ForeignSegment, match="owned by uid"):
        Slot.attach(path, instance_id=MINE)
    assert remove_instance_segments(MINE, tmp_path) == []
    assert path.exists()


@pytest.mark.req("R13.1")
def test_a_segment_of_another_instance_is_never_mapped_as_ours(tmp_path: Path) -> None:
    theirs = make_slot(tmp_path, THEIRS)
    theirs.close()
    mine_name = tmp_path / slot_name(MINE, 0)
    (tmp_path / slot_name(THEIRS, 0)).rename(mine_name)  # swapped in under our name
    with pytest.raises(ForeignSegment, match=THEIRS):
        Slot.attach(mine_name, instance_id=MINE)


@pytest.mark.req("R13.1")
def test_cleanup_removes_exactly_one_instances_segments(tmp_path: Path) -> None:
    prefix_twin = "instance-mine-0001-2"  # our id is a prefix of this one
    for instance in (MINE, prefix_twin, THEIRS):
        ControlBlock.create(tmp_path / control_name(instance), 2, instance_id=instance).close()
        make_slot(tmp_path, instance).close()
    removed = remove_instance_segments(MINE, tmp_path)
    assert sorted(p.name for p in removed) == sorted([control_name(MINE), slot_name(MINE, 0)])
    assert instance_segments(prefix_twin, tmp_path) and instance_segments(THEIRS, tmp_path)


@pytest.mark.req("R13.1")
@pytest.mark.parametrize("bad", ["", "short", "has space in it", "../../etc/x", "a" * 49, "-lead"])
def test_an_instance_id_that_is_not_a_safe_name_is_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="instance id"):
        check_instance_id(bad)


@pytest.mark.req("R13.2")
@pytest.mark.parametrize("region", ["static header", "dynamic header"])
def test_a_flipped_byte_in_a_slot_header_is_refused_naming_the_segment(
    tmp_path: Path, region: str
) -> None:
    slot = make_slot(tmp_path)
    slot.publish(
        generation=1,
        manifest=b"m",
        data_length=0,
        data_checksum=0,
        checksum_algorithm=3,
        global_step=1,
        epoch=0,
        flags=0,
    )
    offset = 40 if region == "static header" else SLOT_DYNAMIC_AT + 8 + 20
    slot.seg.buf[offset] ^= 0x01
    path = slot.seg.path
    if region == "static header":
        slot.close()
        with pytest.raises((TornHeader, LayoutMismatch), match=path.name):
            Slot.attach(path, instance_id=MINE)
    else:
        with pytest.raises(TornHeader, match=path.name):
            slot.header()
        slot.close()


@pytest.mark.req("R13.5")
def test_a_full_shared_memory_filesystem_names_the_bytes_needed_and_free(tmp_path: Path) -> None:
    if os.geteuid() != 0 or os.system(f"mount -t tmpfs -o size=1m tmpfs {tmp_path} 2>/dev/null"):
        pytest.skip("needs root and a permitted tmpfs mount (CI runs as root)")
    try:
        with pytest.raises(ShmFull) as full:
            Slot.create(
                tmp_path / slot_name(MINE, 0), 0, 8 << 20, 4096, prefault=True, instance_id=MINE
            )
        assert full.value.needed_bytes > 8 << 20 and full.value.available_bytes <= 1 << 20
        assert "needs" in str(full.value) and "available" in str(full.value)
        assert list(tmp_path.iterdir()) == [], "nothing is left behind"
    finally:
        os.system(f"umount {tmp_path}")
