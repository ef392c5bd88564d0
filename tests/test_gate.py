"""The machine's timing gate (issue 15 item 2): no neighbour computes while a run times its
steps.  Threads stand in for processes (``flock`` locks belong to the open file, so two
handles in one process exclude each other as two processes do); every ordering is forced
with events, and the only waits are for a state the test has made inevitable (bounded, as
a guard against a hang, never as a timing assumption)."""

import fcntl
import os
import threading

import pytest

from bench.gate import TimingGate, gate_dir, machine_gate

GUARD_S = 60  # a wait that ends this late means the gate is broken (deadlock or starvation)


def _held(path) -> bool:
    """Whether someone holds ``path`` exclusively (a non-blocking probe from a fresh open file)."""
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def _until(cond, what):
    ev = threading.Event()
    for _ in range(GUARD_S * 100):
        if cond():
            return
        ev.wait(0.01)
    pytest.fail(f"never: {what}")


class Neighbour(threading.Thread):
    """A run that does steps: each step waits for the test's ``go[i]`` while holding the gate
    shared, and sets ``started[i]`` when it begins."""

    def __init__(self, folder, steps=3):
        super().__init__(daemon=True)
        self.gate = TimingGate(folder)
        self.started = [threading.Event() for _ in range(steps)]
        self.go = [threading.Event() for _ in range(steps)]
        self.steps = steps

    def run(self):
        self.gate.enter()
        for i in range(self.steps):
            if i:
                self.gate.boundary()
            self.started[i].set()
            assert self.go[i].wait(GUARD_S)
        self.gate.leave()


class Measurer(threading.Thread):
    def __init__(self, folder):
        super().__init__(daemon=True)
        self.gate = TimingGate(folder)
        self.inside, self.release = threading.Event(), threading.Event()

    def run(self):
        with self.gate.exclusive():
            self.inside.set()
            assert self.release.wait(GUARD_S)


def test_a_measurement_waits_for_the_steps_in_flight_and_holds_back_the_next(tmp_path):
    a, b = Neighbour(tmp_path), Neighbour(tmp_path)
    a.start(), b.start()
    assert a.started[0].wait(GUARD_S) and b.started[0].wait(GUARD_S)  # both in step 0: overlapping steps
    m = Measurer(tmp_path)
    m.start()
    _until(lambda: _held(tmp_path / "timing.turnstile"), "the measurement closes the turnstile")
    a.go[0].set()  # a ends step 0: it must now wait at its boundary, b still computes
    assert not m.inside.is_set()  # b holds the gate shared: the measurement cannot have begun
    b.go[0].set()  # without the turnstile, a would be in step 1 by now and b could follow: starvation
    assert m.inside.wait(GUARD_S), "the measurement never began (starved by its neighbours)"
    assert not a.started[1].is_set() and not b.started[1].is_set()  # nobody computes inside
    m.release.set()
    assert a.started[1].wait(GUARD_S) and b.started[1].wait(GUARD_S)  # both go on afterwards
    for n in (a, b):
        for ev in n.go[1:]:
            ev.set()
        n.join(GUARD_S)
    m.join(GUARD_S)
    assert not (a.is_alive() or b.is_alive() or m.is_alive())


def test_two_measurements_exclude_each_other_and_a_working_handle_can_measure(tmp_path):
    first, second = Measurer(tmp_path), Measurer(tmp_path)
    first.start()
    assert first.inside.wait(GUARD_S)
    second.start()
    # a negative check: with a working gate it passes whatever the machine's speed (a broken one
    # would let the second in at once, and is caught unless its thread is slower than this)
    assert not second.inside.wait(0.3)
    first.release.set()
    assert second.inside.wait(GUARD_S)
    second.release.set()
    first.join(GUARD_S), second.join(GUARD_S)

    g = TimingGate(tmp_path)
    g.enter()
    with g.exclusive():  # a run measuring between its own steps lets go of its shared hold first
        assert g.state == "measuring"
        assert _held(tmp_path / "timing.work")
    assert g.state == "working"
    g.leave()
    assert not _held(tmp_path / "timing.work") and g.state == "idle"
    with pytest.raises(RuntimeError, match="boundary"):
        g.boundary()  # a step boundary outside a run is a bug of the caller
    g.close()


def test_a_killed_holder_releases_the_gate(tmp_path):
    """The kernel drops flock locks when their process dies, even by SIGKILL."""
    import signal
    import subprocess
    import sys

    code = (
        "import sys; from bench.gate import TimingGate; g = TimingGate(sys.argv[1]); "
        "cm = g.exclusive(); cm.__enter__(); print('in', flush=True); sys.stdin.read()"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert p.stdout.readline().strip() == "in"
        assert _held(tmp_path / "timing.work")
    finally:
        p.send_signal(signal.SIGKILL)
        p.wait()
    g = TimingGate(tmp_path)
    with g.exclusive():
        pass
    g.close()


def test_the_trace_orders_events_as_the_locks_were_held(tmp_path):
    trace = tmp_path / "trace"
    a = TimingGate(tmp_path, trace=trace)
    m = TimingGate(tmp_path, trace=trace)
    a.enter()
    assert a.boundary() == 0.0  # nobody waits: a keeps its hold (no second "enter")
    a.leave()
    with m.exclusive():
        pass
    pid = os.getpid()
    assert trace.read_text().splitlines() == [
        f"{pid} enter",
        f"{pid} boundary",
        f"{pid} leave",
        f"{pid} exclusive",
        f"{pid} release",
    ]


def test_boundary_reports_its_wait_and_syncs_only_when_a_measurement_waits(tmp_path):
    """The seconds held at a boundary are what a packed run leaves out of its training time;
    ``before_wait`` (the device synchronisation) runs only when it must let go."""
    calls = []
    a = TimingGate(tmp_path)
    a.enter()
    assert a.boundary(lambda: calls.append("sync")) == 0.0 and calls == [] and a.state == "working"
    m = Measurer(tmp_path)
    m.start()
    _until(lambda: _held(tmp_path / "timing.turnstile"), "the measurement closes the turnstile")
    held = []
    t = threading.Thread(target=lambda: held.append(a.boundary(lambda: calls.append("sync"))), daemon=True)
    t.start()
    assert m.inside.wait(GUARD_S)  # a let go at its boundary
    assert calls == ["sync"] and not held  # and waits while the measurement runs
    m.release.set()
    t.join(GUARD_S)
    assert len(held) == 1 and held[0] > 0.0 and a.state == "working"
    m.join(GUARD_S)
    a.leave()
    a.close()


def test_gate_folder_is_private_and_configurable(tmp_path, monkeypatch):
    monkeypatch.setenv("CDBENCH_LOCK_DIR", str(tmp_path / "locks"))
    assert gate_dir() == tmp_path / "locks"
    g = machine_gate()
    assert g is not None and (tmp_path / "locks" / "timing.work").is_file()
    assert (tmp_path / "locks").stat().st_mode & 0o777 == 0o700
    g.close()
    monkeypatch.delenv("CDBENCH_LOCK_DIR")
    assert gate_dir().name == f"cdbench-{os.getuid()}"


# -- bounded waits, the folder's owner (issue 21 item 9) ------------------------------------------
def _holder(folder):
    """A process holding the gate ``folder`` exclusively (a stopped sweep) until killed."""
    import subprocess
    import sys

    code = (
        "import sys; from bench.gate import TimingGate; g = TimingGate(sys.argv[1]); "
        "cm = g.exclusive(); cm.__enter__(); print('in', flush=True); sys.stdin.read()"
    )
    p = subprocess.Popen(
        [sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    assert p.stdout.readline().strip() == "in"
    return p


def test_a_wait_held_by_another_process_gives_up_with_one_line_naming_folder_and_holder(tmp_path, capsys):
    from bench.gate import run_gated

    p = _holder(tmp_path)
    try:
        g = TimingGate(tmp_path, notice_s=0.05, timeout_s=0.3)

        def run(cfg, progress=None, timing_lock=None):
            with timing_lock():
                pass
            progress(1, 1, 0)
            return {"timing_exclusive": True}, []

        row, _ = run_gated(g, run, None)
        err = capsys.readouterr().err.splitlines()
        assert row["timing_exclusive"] is False  # the measurement was not alone: recorded as such
        assert any("waiting" in line for line in err)  # the notice, before giving up
        gave_up = [line for line in err if "still held by" in line]
        assert len(gave_up) == 1 and str(tmp_path) in gave_up[0] and f"pid {p.pid}" in gave_up[0]
        assert "bench.gate" in gave_up[0]  # its command, from /proc
        # while the holder still holds it, the handle only tries: no second wait, no new line
        run_gated(g, run, None)
        assert capsys.readouterr().err == ""
        g.close()
    finally:
        p.kill()
        p.wait()
    g = TimingGate(tmp_path, timeout_s=5)
    with g.exclusive() as alone:
        assert alone is True  # free again: exclusive again
    g.close()


@pytest.mark.parametrize("mode, who", [(0o770, "its group"), (0o707, "others")])
def test_a_gate_folder_writable_by_others_is_refused_with_one_line(tmp_path, monkeypatch, capsys, mode, who):
    from bench.gate import GateRefused

    folder = tmp_path / "locks"
    folder.mkdir()
    folder.chmod(mode)
    with pytest.raises(GateRefused, match=f"writable by {who}"):
        TimingGate(folder)
    monkeypatch.setenv("CDBENCH_LOCK_DIR", str(folder))
    assert machine_gate() is None
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1 and str(folder) in err and "refused" in err and "timing_exclusive False" in err
    )


def test_a_gate_folder_of_another_user_is_refused(tmp_path, monkeypatch):
    from bench.gate import GateRefused

    monkeypatch.setattr(os, "getuid", lambda: os.stat(tmp_path).st_uid + 1)
    with pytest.raises(GateRefused, match="owned by uid"):
        TimingGate(tmp_path)


def test_lock_files_that_cannot_be_opened_are_noted_in_one_line(tmp_path, monkeypatch, capsys):
    real_open = os.open

    def deny(path, *a, **kw):
        if str(path).endswith("timing.work"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *a, **kw)

    monkeypatch.setenv("CDBENCH_LOCK_DIR", str(tmp_path))
    monkeypatch.setattr(os, "open", deny)
    assert machine_gate() is None
    err = capsys.readouterr().err
    assert (
        err.count("\n") == 1
        and str(tmp_path) in err
        and "Permission denied" in err
        and "not exclusive" in err
    )
