"""A stateful property test of the store (issue 21, deliver 6): random sequences of sweeps over
the real :class:`bench.store.ResultStore` (prepare, record) with a minimal run function, crashes at
random points (after any number of recorded runs, between a run's history and its row, a torn last
line), ``--force``, resumes and foreign columns added between steps, checked after each step
against a from-scratch model of which rows must exist."""

import csv

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from bench.store import ResultStore, read_rows

IDS = [f"r{i}" for i in range(5)]


class Crash(Exception):
    """Stands for a SIGKILL: what was written stays, nothing after it is."""


class StoreMachine(RuleBasedStateMachine):
    def __init__(self, folder):
        super().__init__()
        self.out = folder
        self.ok = {}  # run_id -> attempt token of its recorded ok row
        self.foreign = {}  # run_id -> value of the foreign column, when one was added
        self.attempt = 0

    @rule(
        planned=st.sets(st.sampled_from(IDS), min_size=1),
        force=st.booleans(),
        fail=st.sets(st.sampled_from(IDS)),
        crash_after=st.one_of(st.none(), st.integers(0, 5)),
        where=st.sampled_from(["between", "torn", "clean"]),
    )
    def sweep(self, planned, force, fail, crash_after, where):
        with ResultStore(self.out) as store:
            done = store.prepare(set(planned), force=force)
            assert done == {r for r in self.ok if not (force and r in planned)}
            try:
                for i, rid in enumerate(sorted(set(planned) - done)):
                    self.attempt += 1
                    token = f"t{self.attempt}"
                    status = "failed" if rid in fail else "ok"
                    row = {"run_id": rid, "method": "cd", "status": status, "error": token}
                    hist = [{"run_id": rid, "kind": "epoch", "epoch": token, "step": s} for s in (1, 2)]
                    if crash_after == i:
                        if where == "between" and rid not in store._replace:
                            # a new run: history appended, killed before the run row
                            store._append(store.history_path, hist, store._history_columns)
                        elif where == "torn":
                            with open(store.runs_path, "a") as f:
                                f.write(f"{rid},cd,o")
                        raise Crash
                    store.record(row, hist)
                    if status == "ok":
                        self.ok[rid] = token
                    else:
                        self.ok.pop(rid, None)
                    self.foreign.pop(rid, None)  # a replaced row leaves the foreign column empty
            except Crash:
                pass

    @rule(value=st.sampled_from(["x", "y"]))
    def add_foreign_column(self, value):
        rows = read_rows(self.out / "runs.csv")
        if not rows:
            return
        header = list(rows[0]) + ([] if "other_tool" in rows[0] else ["other_tool"])
        with open(self.out / "runs.csv", "w", newline="") as f:  # rewritten by another tool
            w = csv.DictWriter(f, header, lineterminator="\n")
            w.writeheader()
            for r in rows:
                r["other_tool"] = value
                w.writerow(r)
        self.foreign = {r["run_id"]: value for r in rows}

    @invariant()
    def rows_match_the_model(self):
        runs = read_rows(self.out / "runs.csv")
        hist = read_rows(self.out / "history.csv")
        by_id = {}
        for r in runs:
            assert r["run_id"] not in by_id, f"duplicate row {r['run_id']}"
            by_id[r["run_id"]] = r
            assert r["status"] in ("ok", "failed") and r["error"], r  # every row complete
        for rid, token in self.ok.items():  # no ok row lost
            assert by_id[rid]["status"] == "ok" and by_id[rid]["error"] == token
        assert {r for r, v in by_id.items() if v["status"] == "ok"} == set(self.ok)
        for rid, value in self.foreign.items():  # foreign values preserved
            assert by_id[rid].get("other_tool") == value
        recorded = {(r, v["error"]) for r, v in by_id.items()}
        for h in hist:  # history rows belong to recorded runs (a crash's orphans aside, redone next)
            if (h["run_id"], h["epoch"]) not in recorded:
                assert h["run_id"] not in self.ok, h
        for rid, token in self.ok.items():
            assert sorted(h["step"] for h in hist if h["run_id"] == rid) == ["1", "2"]


def run_machine(tmp_path_factory, max_examples, steps):
    class Case(StoreMachine):
        def __init__(self):
            super().__init__(tmp_path_factory.mktemp("store"))

    Case.TestCase.settings = settings(
        max_examples=max_examples,
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    Case.TestCase().runTest()


def test_store_state_machine_fast(tmp_path_factory):
    run_machine(tmp_path_factory, max_examples=15, steps=12)


@pytest.mark.slow(reason="hundreds of random store sequences")
def test_store_state_machine_large(tmp_path_factory):
    run_machine(tmp_path_factory, max_examples=300, steps=30)
