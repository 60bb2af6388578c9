#!/bin/bash
# Equal-wall-clock quality comparison on a lent GPU, as one script (what
# docs/results.md reports as "H100, session 3"). Run from the repository root:
#   bash bench/gpu_quality.sh CARRY OUT TRAIN_SECONDS RUN [RUN ...]
# RUN is NAME=CONFIG[,OVERRIDE ...], e.g.
#   unet=mnist_unet  conv_lin=mnist_conv,--config.model.score_flow.energy_linear=True
# Each run trains for TRAIN_SECONDS of wall clock (compilation included; since
# session 8 data loading and a Gaussian base's fit count too), one after the
# other, and draws 2,000 unguided Heun-18 samples; then FD and class accuracy
# of each (SEEDS="0 1" draws a second set per run, seed 1, as NAME_2k_s1.npz:
# single 2k draws differ by up to 2.5 in FD; WEIGHTS="ema raw" draws each seed
# with the raw weights too, NAME_raw_2k*.npz; every draw is scored against the
# reference sets of REF_SEEDS, default "0 1 2", and the FDs averaged). CARRY (bench/make_carry.sh
# builds it) holds whl/ (ml_collections, tensorboardX), mnist/ (the IDX files)
# and classifier.npz (train_classifier.py). Results are packed into
# OUT/results.tgz after every stage, so a timeout keeps what was finished.
# BUDGET=S (seconds from the start; e.g. 570 in a 590-s call) skips a run that
# could not train and draw before then (it needs T + RUN_EXTRA s, default 90:
# start, save and the draws, which run side by side) and a draw or the
# evaluation that could not finish, instead of being killed in them.
# Each call trains into a new folder, /tmp/results/<start time> (RESULTS=DIR
# to choose it; /tmp/results/latest points to the last one): a second call on
# a warm machine would otherwise resume the first call's runs.
# NPC=N samples per class per draw (default 200: 2,000 per draw); EVAL=0 skips
# the evaluation on the device (score the .npz files afterwards).
# CFG="1 1.5" draws every seed (and WEIGHTS) at each classifier-free guidance
# scale too, at every sigma: 1 is unguided (NAME_2k.npz), S another draw,
# NAME_cfgS_2k.npz, scored as the model NAME_cfgS. A guided draw makes two
# network calls per step: raise RUN_EXTRA for it.
# SCORE_SCALES="2" draws every seed (and WEIGHTS) unguided with the score
# times 2 where sigma is in SCORE_SCALE_INTERVAL (default 0.1,1; sample.py
# --score_scale), NAME_ss2_2k.npz, scored as the model NAME_ss2 (session 46:
# a third off the flows' FD on this CPU; whether the UNet gains as much is
# what a GPU call would say). No extra network call per step.
# SWEEP="1,1.5,2,2.5" (empty: none), after the draws and their scores: each
# run's FD at 1,000 samples for each of these score scales on each band of
# SWEEP_INTERVALS (default 0.1:1), all from one noise (bench/score_scale_sweep.py;
# NAME_sweep.json and .png in results.tgz, no .npz): which scale suits which
# model, e.g. whether the UNet's best is 1. It needs the carry's classifier.
set -u
CARRY=$1; OUT=$2; T=$3; shift 3
NPC=${NPC:-200}  # samples per class
SEEDS=${SEEDS:-0}  # sample seeds per run; seed 0 -> NAME_2k.npz, seed s -> NAME_2k_sS.npz
WEIGHTS=${WEIGHTS:-ema}  # "ema raw": every seed also with the raw weights, as NAME_raw_2k*.npz
CFG=${CFG:-1}  # guidance scales per seed: 1 unguided, S as NAME_cfgS_2k*.npz
SCORE_SCALES=${SCORE_SCALES:-}  # unguided draws with the score times K, as NAME_ssK_2k*.npz
SCORE_SCALE_INTERVAL=${SCORE_SCALE_INTERVAL:-0.1,1}
SWEEP=${SWEEP:-}; SWEEP_INTERVALS=${SWEEP_INTERVALS:-0.1:1}  # score scale sweeps after the scores
VARIANTS="$CFG"; for k in $SCORE_SCALES; do VARIANTS+=" ss$k"; done  # one draw each
BUDGET=${BUDGET:-0}; RUN_EXTRA=${RUN_EXTRA:-90}  # BUDGET 0: no deadline
t0=$(date +%s)
left() { echo $(( t0 + BUDGET - $(date +%s) )); }  # seconds to the deadline
fits() { [ "$BUDGET" = 0 ] || [ "$(left)" -ge "$1" ]; }  # fits SECONDS
draws=$(( $# * $(wc -w <<< "$SEEDS") * $(wc -w <<< "$WEIGHTS") * $(wc -w <<< "$VARIANTS") ))
if [ $draws -gt 7 ]; then  # the device tool brings back at most 8 files
  echo "gpu_quality: $draws draws of 2k samples (runs x SEEDS x WEIGHTS x (CFG + SCORE_SCALES)) would"\
    "not come back: at most 7 .npz files and results.tgz do. Name fewer runs, SEEDS, WEIGHTS, CFG"\
    "or SCORE_SCALES." >&2
  exit 2
fi
positive() { python3 -c "import sys; float(sys.argv[1]) > 0 or sys.exit(1)" "$1" 2>/dev/null; }
for scale in $CFG; do  # a typo here would otherwise surface as failed draws after training
  positive "$scale" || {
    echo "gpu_quality: CFG scale '$scale' is not a positive number (e.g. CFG=\"1 1.5\")" >&2; exit 2; }
done
for k in $SCORE_SCALES; do
  positive "$k" || {
    echo "gpu_quality: SCORE_SCALES entry '$k' is not a positive number (e.g. SCORE_SCALES=2)" >&2; exit 2; }
done
python3 -c "import sys; lo, hi = map(float, sys.argv[1].split(',')); 0 <= lo < hi or sys.exit(1)" \
  "$SCORE_SCALE_INTERVAL" 2>/dev/null || {
  echo "gpu_quality: SCORE_SCALE_INTERVAL '$SCORE_SCALE_INTERVAL' is not lo,hi with 0 <= lo < hi" >&2; exit 2; }
if [ -n "$SWEEP" ]; then  # its own checks (scales, bands) before any training
  python3 -c "
import sys; sys.path.insert(0, 'bench'); import score_scale_sweep as s
ks = [float(k) for k in sys.argv[1].split(',')]; s.parse_intervals(sys.argv[2])
assert all(k > 0 for k in ks)" "$SWEEP" "$SWEEP_INTERVALS" 2>/dev/null || {
    echo "gpu_quality: SWEEP '$SWEEP' / SWEEP_INTERVALS '$SWEEP_INTERVALS' are not scales > 0" \
      "(e.g. 1,1.5,2) and bands lo:hi with 0 <= lo < hi (e.g. 0.1:1,0.03:1)" >&2; exit 2; }
fi
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
R=${RESULTS:-/tmp/results/$t0}; mkdir -p $R
[ -z "${RESULTS:-}" ] && ln -sfn $R /tmp/results/latest
echo "results in $R"
draw() { [ "$2" = 0 ] && echo ${1}_2k || echo ${1}_2k_s$2; }  # NAME SEED -> file stem
tag() {  # NAME VARIANT -> the model it scores: 1 -> NAME, S -> NAME_cfgS, ssK -> NAME_ssK
  if [ "$2" = 1 ]; then echo $1; elif [[ $2 == ss* ]]; then echo ${1}_$2; else echo ${1}_cfg$2; fi; }
sampling() {  # VARIANT -> sample.py's flags for it
  if [[ $1 == ss* ]]; then echo "--cfg_scale 1 --score_scale ${1#ss} --score_scale_interval $SCORE_SCALE_INTERVAL"
  else echo "--cfg_scale $1"; fi; }
pack() {  # a timeout during the pack leaves the last whole archive
  (cd $R && tar czf $OUT/results.tgz.part --exclude='*.npz' --exclude='latent_moments.npy*' \
    --exclude=checkpoints . ) && mv -f $OUT/results.tgz.part $OUT/results.tgz
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $CARRY/whl/*.whl
nvidia-smi -L
python3 -c "import jax, flax; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__)"
DATA="--config.data.source=offline --config.data.data_dir=$CARRY/mnist"
names=(); evals=()  # evals: the draws' models scored: NAME, then NAME_cfgS, NAME_raw, ...
for run in "$@"; do
  name=${run%%=*}; spec=${run#*=}; cfg=${spec%%,*}
  overrides=(); [ "$spec" != "$cfg" ] && IFS=, read -ra overrides <<< "${spec#*,}"
  path=configs/${cfg%%:*}.py; [[ $cfg == *:* ]] && path+=":${cfg#*:}"  # e.g. mnist_conv:tiny
  if ! fits $((T + RUN_EXTRA)); then
    echo "== $name skipped: $(left) s left, it needs $((T + RUN_EXTRA)) (BUDGET=$BUDGET)"
    continue
  fi
  names+=($name)
  echo "== $name: $path ${overrides[*]} ($(( $(date +%s) - t0 )) s)"
  timeout $((T + 120)) python3 train.py --config $path --workdir $R/$name $DATA \
    --config.training.time_limit_s=$T --config.training.image_every=0 \
    --config.training.log_every=250 --config.training.checkpoint_every=1000000 --config.training.keep_every=0 \
    "${overrides[@]}" 2>&1 | tee $R/$name.train.log
  for weights in $WEIGHTS; do
    base=$name; flag=--ema; [ "$weights" = raw ] && base=${name}_raw && flag=--noema
    tags=(); for scale in $VARIANTS; do tags+=($(tag $base $scale)); done
    evals+=("${tags[@]}")
    fits 120 || { echo "== ${tags[*]} draws skipped: $(left) s left"; continue; }
    # side by side (one compile's wait for all; without preallocation, which
    # would give the first process 75% of the GPU's memory)
    for scale in $VARIANTS; do
      for seed in $SEEDS; do
        out=$(draw $(tag $base $scale) $seed)
        XLA_PYTHON_CLIENT_PREALLOCATE=false timeout 120 python3 sample.py --workdir $R/$name $flag --sampler heun_edm --num_steps 18 \
          $(sampling $scale) --num_per_class $NPC --batch_size 1000 --seed $seed --out $R/$out.png > $R/$out.sample.log 2>&1 &
      done
    done
    wait
    for t in "${tags[@]}"; do
      for seed in $SEEDS; do
        out=$(draw $t $seed)
        tail -n 1 $R/$out.sample.log
        cp $R/$out.npz $OUT/ 2>/dev/null
      done
    done
    pack
  done
done
# The runs' loss curves against step and wall clock in one picture each (the
# metrics.jsonl files are in results.tgz too: the same command redraws them
# anywhere, e.g. if this machine's Python has no matplotlib).
specs=(); for name in "${names[@]}"; do specs+=("$name=$R/$name"); done
for x in step wall; do
  python3 -m scoreflow_jax.run_logging --x $x --out $R/loss_curves_$x.png "${specs[@]}" 2>&1 | tail -n 1
done
pack
# FD and class accuracy here unless EVAL=0 (the .npz files in OUT can be
# evaluated on any machine with the same evaluate.py command): one evaluate.py
# per run scores each of its draws against REF_SEEDS' reference sets and
# prints the mean FD, its spread and each one (NAME_eval.json).
REF_SEEDS=${REF_SEEDS:-"0 1 2"}
if [ "${EVAL:-1}" = 1 ]; then
  for name in "${evals[@]}"; do
    fits 60 || { echo "== evaluation of $name skipped: $(left) s left"; continue; }
    files=(); for seed in $SEEDS; do
      [ -f $R/$(draw $name $seed).npz ] && files+=($R/$(draw $name $seed).npz); done
    [ ${#files[@]} -gt 0 ] || { echo "== evaluation of $name skipped: no draws"; continue; }
    list=$(IFS=,; echo "${files[*]}")
    timeout 180 python3 evaluate.py --samples $list --seed ${REF_SEEDS// /,} \
      --classifier $CARRY/classifier.npz --data_dir $CARRY/mnist \
      --num_samples $((NPC * 10)) --out $R/${name}_eval.json 2>&1 | tail -6
    pack
  done
  # each model paired with the first on the same evaluations (those scored)
  specs=(); for name in "${evals[@]}"; do
    [ -f $R/${name}_eval.json ] && specs+=("$name=$R/${name}_eval.json"); done
  if [ ${#specs[@]} -gt 1 ] && fits 30; then
    timeout 60 python3 evaluate.py --compare $(IFS=,; echo "${specs[*]}") --out $R/compare.json 2>&1 | tail -n $(( ${#specs[@]} + 2 ))
    pack
  fi
fi
if [ -n "$SWEEP" ]; then
  for name in "${names[@]}"; do
    fits 90 || { echo "== score scale sweep of $name skipped: $(left) s left"; continue; }
    echo "== score scale sweep of $name: scales $SWEEP on $SWEEP_INTERVALS ($(( $(date +%s) - t0 )) s)"
    timeout 300 python3 bench/score_scale_sweep.py --workdir $R/$name --data_dir $CARRY/mnist \
      --classifier $CARRY/classifier.npz --scales $SWEEP --intervals $SWEEP_INTERVALS \
      --sampler heun_edm --num_steps 18 --num_per_class 100 --batch_size 1000 --out $R/${name}_sweep.json 2>&1 | grep -v "^ *$" | tail -n 12
    pack
  done
fi
echo "== done in $(( $(date +%s) - t0 )) s"
