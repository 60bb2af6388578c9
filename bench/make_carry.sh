#!/bin/bash
# Builds the CARRY folder that bench/gpu_quality.sh and bench/gpu_session.sh
# read on a lent GPU machine (it has JAX, flax, optax, orbax and chex, but no
# ml_collections, tensorboardX or internet). Run here, from the repository root:
#   bash bench/make_carry.sh CARRY MNIST_DIR CLASSIFIER_NPZ [VAE_SAFETENSORS]
# CARRY gets whl/ (ml_collections and tensorboardX wheels, no dependencies),
# mnist/ (the four IDX .gz files, copied), classifier.npz (copied) and, for a
# latent run, vae.safetensors (train_autoencoder.py's weights, copied; a run
# of configs/mnist_latent.py or mnist_latent_conv.py, which hold the VAE's
# ddconfig, then takes --config.model.autoencoder.weights=CARRY/vae.safetensors
# and the scale_factor the script printed, if not the config's). For
# bench/gpu_session.sh, PEER=path/to/torch_scoreflow.py copies the PyTorch peer
# and PINS=1 downloads pins/: this Python's flax, optax, orbax-checkpoint and
# chex wheels (the versions the project is tested with). Nothing already in
# CARRY is overwritten. Keep CARRY inside the repository and ignored by git
# (/.gpu/ is), and pass it to the device tool's `carry`.
set -eu
CARRY=$1; MNIST=$2; CLF=$3; VAE=${4:-}
FILES="train-images-idx3-ubyte.gz train-labels-idx1-ubyte.gz t10k-images-idx3-ubyte.gz t10k-labels-idx1-ubyte.gz"
for f in $FILES; do
  [ -f "$MNIST/$f" ] || { echo "make_carry: $MNIST/$f is missing (the MNIST IDX .gz files)" >&2; exit 1; }
done
[ -f "$CLF" ] || { echo "make_carry: $CLF is missing (train it: python train_classifier.py --data_dir $MNIST --out $CLF)" >&2; exit 1; }
[ -z "$VAE" ] || [ -f "$VAE" ] || { echo "make_carry: $VAE is missing (train it: python train_autoencoder.py --data_dir $MNIST --out $VAE)" >&2; exit 1; }
mkdir -p "$CARRY/whl" "$CARRY/mnist"
for pkg in ml_collections tensorboardx; do  # wheel names are lower case
  ls "$CARRY/whl" | grep -qi "^$pkg-" || python3 -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/whl" $pkg
done
for f in $FILES; do cp -n "$MNIST/$f" "$CARRY/mnist/"; done
cp -n "$CLF" "$CARRY/classifier.npz"
[ -z "$VAE" ] || cp -n "$VAE" "$CARRY/vae.safetensors"
if [ -n "${PEER:-}" ]; then
  [ -f "$PEER" ] || { echo "make_carry: PEER=$PEER is missing (the PyTorch peer, torch_scoreflow.py)" >&2; exit 1; }
  cp -n "$PEER" "$CARRY/torch_scoreflow.py"
fi
if [ "${PINS:-0}" = 1 ] && [ ! -d "$CARRY/pins" ]; then
  pins=$(python3 -c "from importlib.metadata import version as v
print(' '.join(f'{p}=={v(p)}' for p in ('flax', 'optax', 'orbax-checkpoint', 'chex')))")
  python3 -m pip download -q --no-deps --only-binary=:all: -d "$CARRY/pins" $pins
fi
du -sh "$CARRY"; ls "$CARRY"/whl "$CARRY"/pins 2>/dev/null
