"""tools/gpu_check.py proves itself on CPU: its dry run at tiny sizes (sections a and c here;
b, d and e take tens of seconds each on this machine and run in the full dry run, see
docs/benchmarks.md), a section past its budget is recorded, killed, keeps the rows it had
finished, and the next one runs; its budgets and sizes fit one H100 and a rerun."""

import argparse
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))

import gpu_check  # noqa: E402


def test_dry_run_writes_json_and_table(tmp_path):
    out = str(tmp_path / "check")
    res = gpu_check.main(["--dry-run", "--sections", "a", "c", "--out", out])
    assert {k: r["status"] for k, r in res.items()} == {"a": "ok", "c": "ok"}
    kernels = res["a"]["rows"]
    ran = [r for r in kernels if "out" in r]
    assert ran and all(r["ok"] for r in ran), [r for r in ran if not r["ok"]]
    assert {r["kind"] for r in ran} == set(gpu_check.KINDS)
    assert all(r["ratio"] > 0 for r in res["c"]["rows"])
    saved = json.load(open(out + ".json"))
    assert saved["meta"]["dry_run"] and set(saved["sections"]) == {"a", "c"}
    table = open(out + ".md").read()
    assert "DRY RUN on CPU" in table and "| backend | kind | dtype |" in table


def test_a_section_past_its_budget_is_recorded_and_the_next_runs(tmp_path):
    out = str(tmp_path / "check")
    # 0.07 x budget: section b gets 6.3 s; its dry run spawns 2 then 4 gloo ranks and takes
    # 20+ s on this machine. Then a section left with under 5 s (c: 3.5 s) is skipped.
    res = gpu_check.main(["--dry-run", "--sections", "b", "c", "--out", out,
                          "--budget-scale", "0.07"])
    assert res["b"]["status"] == "timeout" and "budget" in res["b"]["error"]
    assert res["c"]["status"] == "skipped"
    assert "timeout" in open(out + ".md").read()


def _two_rows_then_hang(a):
    yield {"case": 1, "ok": True}
    yield {"case": 2, "ok": True}
    time.sleep(120)
    yield {"case": 3, "ok": True}


def test_rows_finished_before_a_timeout_are_kept():
    """Each case's row leaves the section process as the case ends: a section killed at its
    budget still reports what it finished."""
    a = argparse.Namespace(budget_scale=1.0)
    t0 = time.monotonic()
    res = gpu_check.run_section("a", a, 8.0, fn=_two_rows_then_hang)
    assert res["status"] == "timeout" and time.monotonic() - t0 < 20
    assert [r["case"] for r in res["rows"]] == [1, 2]
    table = gpu_check.markdown({"a": res}, dict(device_name="x", torch="t", dry_run=True))
    assert "| case | ok |" in table and "ran past" in table


def test_the_check_fits_a_rerun_in_15_minutes_and_sizes_for_the_card():
    """Budgets: every section's, start-up included, sums under the command's 360 s, so the
    check and a rerun fit in 15 minutes of device time with the machine's start. Section d's
    length follows the free memory (8K on an 80 GB H100, less on smaller cards) and RSA is
    skipped where its CP=1 score rows would not fit."""
    assert sum(gpu_check.BUDGET_S.values()) <= gpu_check.TOTAL_S <= 360
    h100 = 79 * 2**30
    assert gpu_check.gpt_lengths(h100)[0] == 8192
    assert gpu_check.gpt_lengths(24 * 2**30)[0] == 4096
    assert gpu_check.attention_bytes("rsa", 8192) <= 0.6 * h100  # RSA runs at 8K on an H100
    assert gpu_check.attention_bytes("rsa", 16384) > 0.6 * h100  # ... and would not at 16K
    assert gpu_check.attention_bytes("lightseq", 16384) == 0
