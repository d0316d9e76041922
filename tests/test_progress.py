"""The shared progress display (plain lines off a terminal) and the CPU count torch's threads follow."""

from __future__ import annotations

import io
import os
import re

import pytest

from adasvd_lightning.progress import ProgressDisplay, format_duration, progress_display
from adasvd_lightning.threads import available_cpus, cgroup_cpu_limit, configure_threads


def test_plain_lines_are_rate_limited_but_show_start_and_end():
    stream = io.StringIO()
    display = ProgressDisplay(stream=stream, interval=3600)
    for step in range(1, 101):
        display.update("train", step, 100, f"loss {1 / step:.2f}", unit="steps")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2  # the first update, then the one that finishes the stage
    assert re.fullmatch(r"\[adasvd\] train: 1/100 steps \(1%\), 0:00:00 elapsed, ETA \? \[loss 1\.00\]", lines[0])
    assert re.fullmatch(r"\[adasvd\] train: 100/100 steps \(100%\), \d:\d\d:\d\d elapsed, done \[loss 0\.01\]",
                        lines[1])


def test_every_update_is_a_line_with_an_eta_when_the_interval_is_zero():
    stream = io.StringIO()
    display = ProgressDisplay(stream=stream, interval=0)
    for done in (1, 2, 3):
        display.update("evaluate", done, 4, unit="windows")
    lines = stream.getvalue().splitlines()
    assert [line.split(",")[0] for line in lines] == [f"[adasvd] evaluate: {d}/4 windows ({d / 4:.0%})" for d in (1, 2, 3)]
    assert re.search(r"ETA \d:\d\d:\d\d$", lines[-1])  # a rate is known after the second update


def test_a_stage_that_starts_over_is_a_new_stage():
    stream = io.StringIO()
    display = ProgressDisplay(stream=stream, interval=3600)
    for _ in range(2):  # e.g. calibration of a second compression stage
        for done in (1, 2):
            display.update("calibrate", done, 2)
    assert len(stream.getvalue().splitlines()) == 4


def test_nested_displays_share_the_open_one(monkeypatch):
    monkeypatch.setenv("ADASVD_PROGRESS_INTERVAL", "0")
    with progress_display() as outer, progress_display() as inner:
        assert inner is outer
    with progress_display(False) as off:
        assert off is None


def test_format_duration():
    assert format_duration(0) == "0:00:00" and format_duration(61.4) == "0:01:01"
    assert format_duration(3 * 3600 + 5) == "3:00:05"


@pytest.mark.parametrize("files, expected", [
    ({"cpu.max": "200000 100000\n"}, 2),
    ({"cpu.max": "150000 100000\n"}, 2),  # 1.5 CPUs of quota: two threads, rounded up
    ({"cpu.max": "max 100000\n"}, None),
    ({"cpu/cpu.cfs_quota_us": "400000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 4),
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
    ({}, None),
])
def test_cgroup_cpu_quota(files, expected, tmp_path):
    for name, text in files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    assert cgroup_cpu_limit(tmp_path) == expected


def test_threads_follow_the_available_cpus_unless_the_user_chose(monkeypatch):
    import torch

    from adasvd_lightning import threads

    before = torch.get_num_threads()
    try:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY"):
            monkeypatch.delenv(name, raising=False)
        cpus = available_cpus()
        assert 1 <= cpus <= len(os.sched_getaffinity(0))
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (0.0, 0.0, 0.0))  # an idle machine
        assert configure_threads() == {"OMP_NUM_THREADS": str(cpus)}
        assert torch.get_num_threads() == cpus and "OMP_WAIT_POLICY" not in os.environ
        monkeypatch.setattr(threads.os, "getloadavg", lambda: (float(cpus), 0.0, 0.0))  # a busy one
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the user's choice of threads stays
        torch.set_num_threads(before)
        assert configure_threads() == {"OMP_WAIT_POLICY": "PASSIVE"} and torch.get_num_threads() == before
        monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")  # and so does theirs of the wait policy
        assert configure_threads() == {}
    finally:
        torch.set_num_threads(before)
