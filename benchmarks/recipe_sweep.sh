#!/usr/bin/env bash
# Recipe variants of quickstart.py's cpu preset, trained side by side (one process each) to the kimg the preset
# reaches on a 2-core CPU, then sampled the preset's way: autoguided at w = 3 by the variant's own snapshot nearest
# a third of the training, UniPC NFE 15, seeds 0..NSAMP-1. Meant for a GPU, where a dozen variants take minutes;
# FID is left to fid.py (the detector's weights need not be on that machine):
#   bash benchmarks/recipe_sweep.sh OUTDIR            # then, anywhere:
#   python fid.py calc --images=OUTDIR/samples/NAME --ref=REFERENCE.npz --num=1000
# Variables: KIMG (48), GUIDE_KIMG (16), NSAMP (1000), DEVICE (cuda), ONLY (a space-separated list of names).
set -u
out=${1:?usage: recipe_sweep.sh OUTDIR}
kimg=${KIMG:-48}; guide_kimg=${GUIDE_KIMG:-16}; nsamp=${NSAMP:-1000}; device=${DEVICE:-cuda}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
mkdir -p "$out"
python3 dataset_tool.py --source=data/fashion-mnist/t10k-images-idx3-ubyte.gz --dest="$out/train.zip" \
    --resolution=28x28 --max-images=5000 > /dev/null 2>&1 || { echo "recipe_sweep.sh: dataset conversion failed" >&2; exit 1; }
# The cpu preset's training options when this sweep chose its successor (DDPM++; the preset is EDM2 at lr 0.04
# since, the edm2-* variants' recipe), in fp32: the 2-core CPU it was measured on has no bfloat16 arithmetic.
base=(--arch=ddpmpp --precond=edm --cond=1 --cbase=32 --cres=1,1,2 --blocks=1 --attn= --batch=32 --lr=1e-3
      --lr-rampup=1 --ema=0.5 --ema-rampup=0.1 --dropout=0 --augment=0 --bf16=0 --duration=$(python3 -c "print($kimg / 1000)")
      --tick=$(python3 -c "print($kimg / 12)") --snap=1 --dump=1000 --grid=0 --seed=0 --workers=0 --device=$device)
declare -A variants=(
  [base]=""
  [lr2e-3]="--lr=2e-3"
  [lr4e-3]="--lr=4e-3"
  [lr2e-3-emar0.05]="--lr=2e-3 --ema-rampup=0.05"
  [lr2e-3-emar0.2]="--lr=2e-3 --ema-rampup=0.2"
  [b64-lr2e-3]="--batch=64 --lr=2e-3"
  [b16]="--batch=16"
  [b2-0.99-lr2e-3]="--lr=2e-3 --adam-beta2=0.99"
  [edm2-lr0.01]="--arch=edm2 --lr=0.01 --lr-decay=500"
  [edm2-lr0.02]="--arch=edm2 --lr=0.02 --lr-decay=500"
  [pmean-1.0-lr2e-3]="--lr=2e-3 --p-mean=-1.0"
  [rampup0.25-lr2e-3]="--lr=2e-3 --lr-rampup=0.25"
)
names=${ONLY:-${!variants[@]}}
for name in $names; do
  [ -n "${variants[$name]+set}" ] || { echo "recipe_sweep.sh: unknown variant '$name'" >&2; exit 2; }
done
start=$(date +%s)
for name in $names; do
  # Later options override earlier ones (click keeps the last).
  python3 train.py --outdir="$out/$name" --nosubdir --data="$out/train.zip" "${base[@]}" ${variants[$name]} \
      > "$out/$name.log" 2>&1 &
done
wait
echo "training: $(( $(date +%s) - start )) s"
for name in $names; do
  (
    # The traditional EMA's snapshots (EDM2 runs also write power-function EMA ones, named ...-S.SSS.pkl).
    read -r final guide < <(python3 - "$out/$name" "$guide_kimg" <<'PY'
import glob, os, sys
from training.run_files import labelled_nimg  # None for the power-function EMAs' snapshots
paths = [p for p in glob.glob(os.path.join(sys.argv[1], "network-snapshot-*.pkl")) if labelled_nimg(p) is not None]
kimg = lambda p: labelled_nimg(p) / 1000
print(max(paths, key=kimg), min(paths, key=lambda p: abs(kimg(p) - float(sys.argv[2]))))
PY
)
    [ -n "${guide:-}" ] || { echo "$name: no snapshots (see $out/$name.log)"; exit 0; }
    echo "$name: $(basename "$final") guided by $(basename "$guide")"
    python3 generate.py --network="$final" --gnet="$guide" --guidance=3 --outdir="$out/samples/$name" \
        --seeds=0-$((nsamp - 1)) --batch=500 --sampler=unipc_bh2 --nfe=15 --steps-schedule=loguniform \
        --device=$device > "$out/$name.gen.log" 2>&1 || echo "$name: generation failed (see $out/$name.gen.log)"
  ) &
done
wait
