#!/usr/bin/env bash
# Regenerates every result the README and docs/results/ quote, from a fresh clone:
# runs each config below into runs/<name>, copies its results.json to
# docs/results/runs/<name>.json, then rewrites the generated tables
# (python -m survjax.docs). Runs already finished are reused (a run directory resumes).
#   bash scripts/reproduce_results.sh              # everything (about an hour on 2 cores)
#   bash scripts/reproduce_results.sh must snn     # some of them
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
declare -A CONFIGS=(
  [must]="configs/must.py"
  [must_paper_decomp]="configs/must.py:paper_decomp"
  [abmil]="configs/abmil.py"
  [transmil]="configs/transmil.py"
  [snn]="configs/snn.py"
  [must_breast]="configs/must_breast.py"
  [parachute]="configs/parachute.py"
  [parachute_no_dce]="configs/parachute.py:no_dce"
  [parachute_no_gcs]="configs/parachute.py:no_gcs"
  [parachute_no_dce_no_gcs]="configs/parachute.py:no_dce_no_gcs"
  [abmil_radiology]="configs/abmil.py:radiology"
  [abmil_parachute_cohort]="configs/abmil.py:parachute_cohort"
  [tta]="configs/tta.py"
  [imputmae]="configs/imputmae.py"
)
ORDER=(must abmil transmil snn must_paper_decomp must_breast tta parachute parachute_no_dce
       parachute_no_gcs parachute_no_dce_no_gcs abmil_radiology abmil_parachute_cohort imputmae)
names=("$@")
[ ${#names[@]} -gt 0 ] || names=("${ORDER[@]}")
for name in "${names[@]}"; do
  cfg=${CONFIGS[$name]:?unknown result $name}
  echo "== $name: $cfg"
  "$PY" -m survjax.main --config="$cfg" --workdir="runs/$name" --config.progress=False
  cp "runs/$name/results.json" "docs/results/runs/$name.json"
done
# Paired comparisons on identical folds (each needs its runs finished).
compare() {
  local name=$1 ref=$2; shift 2
  for run in "$@"; do [ -f "$run/results.json" ] || { echo "skip $name: $run missing"; return 0; }; done
  "$PY" -m survjax.compare "$@" --reference "$ref" --out "docs/results/compare/$name" > /dev/null
}
compare must_vs_pathology_only abmil:full runs/must runs/abmil runs/transmil
compare must_vs_genomics_only snn:full runs/must runs/snn
compare must_fill_pathology must:missing_pathology runs/must
compare must_fill_genomics must:missing_genomics runs/must
compare tta_vs_must must:full runs/tta runs/must runs/abmil runs/snn
compare parachute_ablations parachute:full runs/parachute runs/parachute_no_dce \
  runs/parachute_no_gcs runs/parachute_no_dce_no_gcs runs/abmil_radiology runs/abmil_parachute_cohort
"$PY" -m survjax.docs
