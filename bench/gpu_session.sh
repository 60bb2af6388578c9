#!/bin/bash
# One lease of a GPU machine, all measurements in one go (what docs/benchmarks.md
# and docs/results.md report as "H100"). Run from the repository root:
#   bash bench/gpu_session.sh CARRY OUT TRAIN_SECONDS
# CARRY holds whl/ (ml_collections, tensorboardX), pins/ (the tested flax, optax,
# orbax, chex, used only if the machine's own fail), mnist/ (the IDX files),
# classifier.npz (train_classifier.py) and torch_scoreflow.py (the peer).
# 1. train-step throughput, JAX (both parameterizations) and the PyTorch peer;
# 2. the UNet baseline and the conv ScoreFlowNetwork, each trained for the same
#    wall-clock budget (compilation included), one after the other;
# 3. 2,000 unguided Heun-18 samples of each, FD and class accuracy.
set -u
CARRY=$1; OUT=$2; T=${3:-150}; NPC=${NPC:-200}  # samples per class
export PYTHONUNBUFFERED=1 PYTHONPATH=/tmp/site:$PWD
R=/tmp/results/$(date +%s); mkdir -p $R  # a new folder per call: no resumed runs
pack() {  # a timeout during the pack leaves the last whole archive
  (cd $R && tar czf $OUT/results.tgz.part --exclude='*.npz' --exclude='latent_moments.npy*' \
    --exclude=checkpoints . ) && mv -f $OUT/results.tgz.part $OUT/results.tgz
}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $CARRY/whl/*.whl
nvidia-smi -L
python3 -c "import jax, flax, optax, orbax.checkpoint as o, chex; print('jax', jax.__version__, jax.devices(), 'flax', flax.__version__, 'optax', optax.__version__, 'orbax', o.__version__, 'chex', chex.__version__)"
DATA="--config.data.source=offline --config.data.data_dir=$CARRY/mnist"
train() {  # name config
  timeout $((T + 120)) python3 train.py --config configs/$2.py --workdir $R/$1 $DATA \
    --config.training.time_limit_s=$T --config.training.image_every=0 \
    --config.training.log_every=250 --config.training.checkpoint_every=1000000 \
    --config.training.keep_every=0 2>&1 | tee $R/$1.train.log
  return ${PIPESTATUS[0]}
}
# The machine's flax/optax/orbax/chex first; if the first training fails at once,
# retry with the versions the project is tested with.
t0=$(date +%s)
if ! train unet mnist_unet; then
  if [ $(( $(date +%s) - t0 )) -lt 90 ]; then
    echo "== retrying with the pinned flax/optax/orbax/chex"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $CARRY/pins/*.whl
    rm -rf $R/unet; train unet mnist_unet
  fi
fi
pack
train conv mnist_conv; pack
for name in unet conv; do
  timeout 120 python3 sample.py --workdir $R/$name --sampler heun_edm --num_steps 18 \
    --num_per_class $NPC --batch_size 1000 --seed 0 --out $R/${name}_2k.png 2>&1 | tail -3
  cp $R/${name}_2k.npz $OUT/ 2>/dev/null
  timeout 90 python3 evaluate.py --samples $R/${name}_2k.npz --classifier $CARRY/classifier.npz \
    --data_dir $CARRY/mnist --num_samples $((NPC * 10)) --out $R/${name}_eval.json 2>&1 | tail -4
  pack
done
for p in seed preconditioned; do
  timeout 90 python3 bench/train_throughput.py --parameterization $p --batch 128 --steps 30 2>&1 | tail -1 | tee -a $R/bench.jsonl
  timeout 60 python3 bench/torch_peer_device.py --peer $CARRY/torch_scoreflow.py --parameterization $p --device cuda --steps 30 2>&1 | tail -1 | tee -a $R/bench.jsonl
done
pack
echo "== done in $(( $(date +%s) - t0 )) s"
