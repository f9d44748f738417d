"""tools/gpu_check.py proves itself on CPU: its dry run at tiny sizes (sections a and c here;
b, d and e take tens of seconds each on this machine and run in the full dry run, see
docs/benchmarks.md), and a section past its budget is recorded, killed, and the next one runs."""

import json
import os
import sys

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
    # 0.05 x budget: section b gets 6 s; its dry run spawns 2 then 4 gloo ranks and takes
    # 20+ s on this machine. Then a section left with under 5 s is skipped, not started.
    res = gpu_check.main(["--dry-run", "--sections", "b", "c", "--out", out,
                          "--budget-scale", "0.05"])
    assert res["b"]["status"] == "timeout" and "budget" in res["b"]["error"]
    assert res["c"]["status"] == "skipped"
    assert "timeout" in open(out + ".md").read()
