import os
import subprocess
import sys

from selfspec_core.runtime import openmp


def stat_file(tmp_path, busy: int, idle: int):
    path = tmp_path / "stat"
    # user nice system idle iowait irq softirq steal guest guest_nice
    path.write_text(f"cpu  {busy} 0 0 {idle} 0 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7 8 9 10\n", encoding="ascii")
    return path


def test_cpu_times_count_busy_and_all_ticks(tmp_path):
    assert openmp.cpu_times(str(stat_file(tmp_path, busy=30, idle=70))) == (30, 100)


def test_busy_share_is_the_other_work_over_the_sample(tmp_path, monkeypatch):
    path = stat_file(tmp_path, busy=100, idle=100)
    monkeypatch.setattr(openmp.time, "sleep", lambda _: stat_file(tmp_path, busy=115, idle=185))
    assert openmp.busy_share(str(path)) == 0.15


def test_no_proc_stat_means_unknown_load(tmp_path):
    assert openmp.busy_share(str(tmp_path / "missing"), seconds=0) is None


def test_spin_only_on_an_idle_machine():
    spin, sleep = {"GOMP_SPINCOUNT": openmp.SPIN_COUNT}, {"OMP_WAIT_POLICY": "PASSIVE"}
    assert openmp.wait_policy(0.0) == spin
    assert openmp.wait_policy(openmp.BUSY_SHARE) == spin
    assert openmp.wait_policy(0.5) == sleep
    assert openmp.wait_policy(None) == sleep


def run_python(code: str, env: dict | None = None) -> str:
    """What ``code`` prints in a new Python process whose environment has no wait policy (plus ``env``)."""
    env = {**{k: v for k, v in os.environ.items() if k not in openmp.USER_SETTINGS}, **(env or {})}
    return subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout.strip()


PRINT_POLICY = "print(os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT'))"


def policy_in_new_process(env: dict, torch_first: bool = False) -> str:
    """The policy once the ``selfspec`` command has started (``--version``: it does nothing else)."""
    code = f"import os, {'torch, ' if torch_first else ''}selfspec_core.cli.main as cli; cli.main(['--version']); "
    return run_python(code + PRINT_POLICY, env).splitlines()[-1]


def test_the_command_chooses_a_policy_as_it_starts():
    assert policy_in_new_process({}) in {f"None {openmp.SPIN_COUNT}", "PASSIVE None"}


def test_a_policy_the_user_set_is_kept():
    assert policy_in_new_process({"OMP_WAIT_POLICY": "active"}) == "active None"
    assert policy_in_new_process({"GOMP_SPINCOUNT": "10"}) == "None 10"


def test_nothing_is_chosen_once_torch_is_loaded():
    assert policy_in_new_process({}, torch_first=True) == "None None"


def test_importing_selfspec_chooses_nothing_and_loads_no_torch():
    """The API plugins import at start-up is cheap: no torch, no load sampling, no environment written;
    nor does the command line's module load torch, or its choice would come too late."""
    for module in ("selfspec_core", "selfspec_core.api", "selfspec_core.cli.main"):
        code = f"import os, sys, {module}; print('torch' in sys.modules, end=' '); {PRINT_POLICY}"
        assert run_python(code) == "False None None", module
