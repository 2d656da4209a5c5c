"""Generated documentation: every table agrees with the committed JSON it comes from."""

import json

from survjax import docs


def test_generated_tables_agree_with_the_committed_json():
  runs = docs.load_runs()
  stale = [str(p) for p in docs.documents() if docs.update(p.read_text(), runs) != p.read_text()]
  assert not stale, f"out of date (run python -m survjax.docs): {stale}"


def test_a_changed_number_changes_the_table(tmp_path):
  run = {"scenarios": {"full": {"c_index_mean": 0.7123, "c_index_std": 0.0311,
                                "per_fold": [0.7, 0.72], "oracle_c_index": 0.8}}}
  text = "a\n<!-- generated: scenarios.x -->\nold\n<!-- end generated -->\nb\n"
  out = docs.update(text, {"x": run})
  assert "| `full` | 0.712 +- 0.031 | 0.700, 0.720 | 0.800 |" in out
  assert out.startswith("a\n") and out.endswith("<!-- end generated -->\nb\n")
  run["scenarios"]["full"]["c_index_mean"] = 0.6
  assert "0.600 +- 0.031" in docs.update(out, {"x": run})
  assert docs.update(out, {"x": json.loads(json.dumps(run))}) == docs.update(out, {"x": run})
