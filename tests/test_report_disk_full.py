"""A full disk while validation writes its reports: exit 3 with the disk message, nothing half-written under a
final name, and a rerun with space finishes (ISSUES_LOG B85). Real tmpfs, filled deterministically."""

import os
import subprocess

import pytest
from test_benchmark import _report

from cogumi.core.errors import EXIT_DISK_STOP
from cogumi.evaluate.report import REPORT_FILES, ReportDiskStop, write_reports


@pytest.fixture
def small_disk(tmp_path):
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)]).returncode != 0:
        pytest.skip("needs root to mount a tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=True)


def test_full_disk_is_exit_3_and_rerun_finishes(small_disk):
    filler = small_disk / "filler"
    with open(filler, "wb", buffering=0) as fh:  # fill to the last byte: the first report write hits ENOSPC
        try:
            while True:
                fh.write(b"\0" * 4096)
        except OSError:
            pass
    report = _report(passed=True)
    samples = [{"task": "math", "id": str(i), "outcome": "win"} for i in range(100)]
    out = small_disk / "validation"
    with pytest.raises(ReportDiskStop) as caught:
        write_reports(out, report, samples)
    assert caught.value.exit_code == EXIT_DISK_STOP
    assert "disk filled" in caught.value.render()
    assert not any((out / name).exists() for name in REPORT_FILES)
    assert not out.exists() or not list(out.iterdir())  # no temporary file left either
    os.unlink(filler)
    paths = write_reports(out, report, samples)
    assert all(paths[name].exists() for name in REPORT_FILES)
