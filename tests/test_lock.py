"""One command per run directory: a second one stops at once naming the first; a killed one's lock is taken over."""

import json
import os
import signal
import subprocess
import sys
import textwrap

from selfspec_core.run.rundir import RunDir

HOLD = textwrap.dedent("""
    import sys, time
    from selfspec_core.run.rundir import RunDir
    with RunDir(sys.argv[1], "finance").open().locked():
        print("locked", flush=True)
        time.sleep(120)
""")


def selfspec(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "selfspec_core", *args], capture_output=True, text=True, cwd=cwd, timeout=300
    )


def hold(run):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_a_second_command_stops_naming_the_first_and_a_killed_ones_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = hold(run)
    try:
        busy = selfspec("train", "--domain", "finance", "--out", "run", cwd=tmp_path)
        assert busy.returncode == 2 and "Traceback" not in busy.stderr
        assert busy.stderr.strip().count("\n") == 0, busy.stderr
        assert f"run is in use by process {holder.pid} on " in busy.stderr and "wait for it to finish" in busy.stderr
        info = json.loads((run / ".lock.holder.json").read_text())
        assert info["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(30)
    assert (run / ".lock.holder.json").exists()  # a kill leaves the holder file behind: stale
    # the kernel released the dead process's lock: the next command takes it and gets on with its work
    after = selfspec("train", "--domain", "finance", "--out", "run", cwd=tmp_path)
    assert after.returncode == 2 and "in use" not in after.stderr
    assert "respond/data.jsonl is missing: run `selfspec respond --domain finance --out run`" in after.stderr
    assert not (run / ".lock.holder.json").exists()  # released on exit


def test_the_lock_is_released_for_the_next_command_in_the_same_process(tmp_path):
    run = RunDir(tmp_path / "run", "finance").open()
    with run.locked():
        assert json.loads((run.path / ".lock.holder.json").read_text())["pid"] == os.getpid()
    with run.locked():
        pass


def test_a_second_lock_in_the_same_process_is_refused_too(tmp_path):
    import pytest

    from selfspec_core.errors import SelfspecError

    run = RunDir(tmp_path / "run", "finance").open()
    with (
        run.locked(),
        pytest.raises(SelfspecError, match=f"in use by process {os.getpid()}"),
        RunDir(tmp_path / "run", "finance").locked(),
    ):
        pass
