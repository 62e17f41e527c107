#!/usr/bin/env bash
# Recipe variants of quickstart.py's cpu preset as it is now (EDM2; its options read from quickstart.py), each
# trained with seeds 0 and 1 side by side (one process each) to the kimg the preset reaches on a CPU, then sampled
# the preset's way: autoguided at w = 2.5 by the run's own snapshot nearest a third of the training, UniPC NFE 15,
# balanced classes, seeds 0..NSAMP-1. Meant for a GPU, where a dozen runs take minutes; FID is left to fid.py
# (the detector's weights need not be on that machine), e.g. for every variant and seed:
#   bash benchmarks/recipe_sweep_edm2.sh OUTDIR
#   for d in OUTDIR/samples/*; do python fid.py calc --images=$d --ref=REFERENCE.npz --num=1000; done
# Variables: KIMG (100), NSAMP (1000), DEVICE (cuda), SEEDS ("0 1"), ONLY (variant names), MAX_MINUTES (each
# run's wall-clock cap; the log's last tick says how far a capped run got).
set -u
out=${1:?usage: recipe_sweep_edm2.sh OUTDIR}
kimg=${KIMG:-100}; nsamp=${NSAMP:-1000}; device=${DEVICE:-cuda}; seeds=${SEEDS:-0 1}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
python3 dataset_tool.py --source=data/fashion-mnist/t10k-images-idx3-ubyte.gz --dest="$out/train.zip" \
    --resolution=28x28 --max-images=5000 > /dev/null 2>&1 || { echo "recipe_sweep_edm2.sh: dataset conversion failed" >&2; exit 1; }
read -r -a base < <(python3 -c "import quickstart; print(' '.join(quickstart.render(quickstart.PRESETS['cpu'].train_options)))")
read -r -a generate_args < <(python3 -c "import quickstart; print(' '.join(quickstart.render(quickstart.PRESETS['cpu'].sampler_options)))")
read -r guidance < <(python3 -c "import quickstart; print(quickstart.PRESETS['cpu'].guidance[-1])")
# Twelve ticks: a snapshot falls at a third of the run, where the guide is taken.
base+=(--duration=$(python3 -c "print($kimg / 1000)") --tick=$(python3 -c "print($kimg / 12)") --snap=1 --dump=1000
       --workers=0 --device=$device)
[ -n "${MAX_MINUTES:-}" ] && base+=(--max-minutes=$MAX_MINUTES)
declare -A variants=(
  [base]=""
  [cool0.33]="--lr-cooldown=0.333"
  [cool0.5]="--lr-cooldown=0.5"
  [lr0.06-cool0.33]="--lr=0.06 --lr-cooldown=0.333"
  [lr0.03-cool0.33]="--lr=0.03 --lr-cooldown=0.333"
  [decay1000-cool0.33]="--lr-decay=1000 --lr-cooldown=0.333"
)
names=${ONLY:-${!variants[@]}}
for name in $names; do
  [ -n "${variants[$name]+set}" ] || { echo "recipe_sweep_edm2.sh: unknown variant '$name'" >&2; exit 2; }
done
start=$(date +%s)
for name in $names; do
  for seed in $seeds; do
    # Later options override earlier ones (click keeps the last).
    python3 train.py --outdir="$out/$name-s$seed" --nosubdir --data="$out/train.zip" "${base[@]}" \
        ${variants[$name]} --seed=$seed > "$out/$name-s$seed.log" 2>&1 &
  done
done
wait
echo "training: $(( $(date +%s) - start )) s"
for name in $names; do
  for seed in $seeds; do
    (
      run="$out/$name-s$seed"
      # The traditional EMA's snapshots (EDM2 runs also write power-function EMA ones, named ...-S.SSS.pkl).
      read -r final guide < <(python3 - "$run" "$kimg" <<'PY'
import glob, os, sys
from training.run_files import labelled_nimg  # None for the power-function EMAs' snapshots
paths = [p for p in glob.glob(os.path.join(sys.argv[1], "network-snapshot-*.pkl")) if labelled_nimg(p) is not None]
kimg = lambda p: labelled_nimg(p) / 1000
print(max(paths, key=kimg), min(paths, key=lambda p: abs(kimg(p) - float(sys.argv[2]) / 3)))
PY
)
      [ -n "${guide:-}" ] || { echo "$name-s$seed: no snapshots (see $run.log)"; exit 0; }
      echo "$name-s$seed: $(basename "$final") guided by $(basename "$guide")"
      python3 generate.py --network="$final" --gnet="$guide" --guidance="$guidance" "${generate_args[@]}" \
          --outdir="$out/samples/$name-s$seed" --seeds=0-$((nsamp - 1)) --batch=500 --device=$device \
          > "$run.gen.log" 2>&1 || echo "$name-s$seed: generation failed (see $run.gen.log)"
    ) &
  done
done
wait
echo "total: $(( $(date +%s) - start )) s"
