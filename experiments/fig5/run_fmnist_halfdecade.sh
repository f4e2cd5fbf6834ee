#!/usr/bin/env bash
# Figure 5's protocol on Fashion-MNIST 28x28, second run: a half-decade learning-rate grid for all
# three optimizers alike, the rate chosen on the validation split only, then 5 seeds per optimizer.
# Run from the repository root (ideally a git worktree pinned at a named commit):
#   bash experiments/fig5/run_fmnist_halfdecade.sh
# Resumable: run it again with RESUME=true after a kill (finished jobs are skipped).
set -euo pipefail
GSGD=${GSGD:-"python -m gsgd_cli"}
RESUME=${RESUME:-false}
OUT=experiments/fig5
GRID=1,0.5,0.2,0.1,0.05,0.02,0.01,0.005,0.002,0.001

# stage 1: 10 rates x 3 optimizers, seed 0, 10000 training images held out (data.val_size)
$GSGD train experiment=fig5_fmnist optimizer.lr=$GRID resume=$RESUME \
    hydra/launcher=joblib hydra.launcher.n_jobs=2 hydra.sweep.dir=$OUT/fmnist_half_lr
$GSGD report $OUT/fmnist_half_lr --best --csv $OUT/fmnist_half_lr/report.csv > $OUT/fmnist_half_lr/report.md

# the choice: each optimizer's rate with the lowest final validation error (stage 1's CSV only)
choose() {
  python - "$1" <<'PY'
import csv, sys
rows = [r for r in csv.DictReader(open("experiments/fig5/fmnist_half_lr/report.csv"))
        if r["optimizer"] == sys.argv[1] and r["final_val_error_mean"] not in ("", "nan")]
print(min(rows, key=lambda r: float(r["final_val_error_mean"]))["optimizer.lr"])
PY
}
# stage 2: 5 seeds at each optimizer's chosen rate
for opt in sgd path_sgd gsgd; do
  lr=$(choose $opt)
  echo "stage 2: $opt at the chosen rate $lr"
  $GSGD train experiment=fig5_fmnist optimizer=$opt optimizer.lr=$lr seed=0,1,2,3,4 resume=$RESUME \
      hydra/launcher=joblib hydra.launcher.n_jobs=2 hydra.sweep.dir=$OUT/fmnist_half_final/$opt
done
$GSGD report $OUT/fmnist_half_final --best --csv $OUT/fmnist_half_final/report.csv > $OUT/fmnist_half_final/report.md
echo "done"
