#!/usr/bin/env bash
# GPU checks and measurements, run on the lent GPU machine (Python 3.12, CUDA torch preinstalled):
# opacus and tenseal travel as wheels in .whl/. Results land in $OUT (or ./gpu_out).
# The timeouts add up to about 9.5 minutes: run it as one device call with timeout_s 600.
#   bash bench/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())" | tee -a "$OUT/gpu.txt"

echo "== GPU tests"
timeout 180 python3 -m pytest -q -p no:cacheprovider -m gpu tests/trainers tests/privacy/dp 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"

echo "== train_dp.py, DLRM, CPU then --devices 0 (same seed: the results should agree in distribution)"
for dev in cpu 0; do
  timeout 80 python3 scripts/train_dp.py --config configs/dlrm_dp.yml --logdir "$OUT/train_dp_$dev" --devices $dev \
    train.progress=false model.preproc.synthetic.rows=100000 model.preproc.cache_dir=/tmp/data 2>&1 | tail -1
done

echo "== train_dp.py, MF on MovieLens-format data, --devices 0"
timeout 60 python3 scripts/train_dp.py --config configs/mf_movielens_dp.yml --logdir "$OUT/train_dp_mf_gpu" --devices 0 \
  train.progress=false model.preproc.cache_dir=/tmp/data 2>&1 | tail -1

echo "== DLRM throughput (Kaggle-size tables)"
timeout 60 python3 bench/dlrm_train.py --device cuda:0 --threads 16 --steps 100 2>&1 | tee "$OUT/dlrm_train_gpu.json" | tail -20

echo "== DP-SGD ratios on GPU"
timeout 90 python3 bench/dp_sgd.py --device cuda --skip-utility --skip-opacus --threads 16 --rounds 1 2>&1 | tee "$OUT/dp_sgd_gpu.json" | tail -60
