"""A SIGTERM or SIGHUP to a process ends its pool workers, their own workers and the programs it launched."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(not Path("/proc").is_dir(), reason="reads process states from /proc")

TASKS = '''
import os, subprocess, sys, time
from pathlib import Path

from pairtrace.processes import owned, spawn_pool


def sleeper(pid_dir):
    """A pool worker that waits (the retrain it stands for)."""
    Path(pid_dir, f"worker-{os.getpid()}").write_text("")
    time.sleep(120)


def nested(pid_dir):
    """A pool worker with a pool of its own (a robustness build running its retrains)."""
    Path(pid_dir, f"worker-{os.getpid()}").write_text("")
    with spawn_pool(1) as pool:
        pool.submit(sleeper, pid_dir).result()


def parent(pid_dir, mode):
    if mode == "program":  # a launched program (accelerate launch, a judge server)
        with owned(subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])) as program:
            Path(pid_dir, f"program-{program.pid}").write_text("")
            program.wait()
        return
    with spawn_pool(2) as pool:
        futures = [pool.submit(nested if mode == "nested" else sleeper, pid_dir) for _ in range(2)]
        for future in futures:
            future.result()
'''

MAIN = '''
import signal
import sys
import tasks

if __name__ == "__main__":
    for signum in (signal.SIGTERM, signal.SIGHUP):  # as in a terminal, whatever this test runs under (nohup, CI)
        signal.signal(signum, signal.SIG_DFL)
    tasks.parent(sys.argv[1], sys.argv[2])
'''


def _alive(pid: int) -> bool:
    """Running (a zombie, or a pid gone from /proc, counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _pids(pid_dir: Path) -> list[int]:
    return [int(p.name.split("-")[1]) for p in pid_dir.iterdir()]


@pytest.mark.parametrize(("mode", "children", "signum"), [
    ("flat", 2, signal.SIGTERM),
    ("nested", 4, signal.SIGTERM),
    ("program", 1, signal.SIGTERM),
    ("flat", 2, signal.SIGHUP),
    ("nested", 4, signal.SIGKILL),  # no handler runs: the workers notice they were orphaned
])
def test_children_end_with_their_parent(tmp_path: Path, mode: str, children: int, signum: signal.Signals) -> None:
    (tmp_path / "tasks.py").write_text(textwrap.dedent(TASKS))
    (tmp_path / "main.py").write_text(textwrap.dedent(MAIN))
    pid_dir = tmp_path / "pids"
    pid_dir.mkdir()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    parent = subprocess.Popen([sys.executable, str(tmp_path / "main.py"), str(pid_dir), mode], env=env,
                              cwd=tmp_path, start_new_session=True)  # its own group: only the parent is signalled
    try:
        deadline = time.monotonic() + 120
        while len(_pids(pid_dir)) < children:
            assert parent.poll() is None, f"the parent exited early ({parent.returncode})"
            assert time.monotonic() < deadline, f"only {len(_pids(pid_dir))} of {children} children started"
            time.sleep(0.2)
        pids = _pids(pid_dir)
        assert all(_alive(pid) for pid in pids)
        parent.send_signal(signum)
        assert parent.wait(timeout=60) == -signum  # it dies of the signal, as it would without the handler
        deadline = time.monotonic() + 15
        while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in pids if _alive(pid)], "children outlived their parent"
    finally:
        if parent.poll() is None:
            os.killpg(parent.pid, signal.SIGKILL)
        for pid in _pids(pid_dir):
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_a_handled_or_ignored_signal_is_left_alone() -> None:
    script = textwrap.dedent('''
        import signal
        from pairtrace.processes import end_children_on_termination, spawn_pool
        mine = lambda signum, frame: None
        signal.signal(signal.SIGTERM, mine)
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        end_children_on_termination()
        spawn_pool(1).shutdown()
        assert signal.getsignal(signal.SIGTERM) is mine
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN
        print("ok")
    ''')
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
