#!/usr/bin/env bash
# The main demo: a secure cross-silo federated run of DLRM (configs/dlrm_fl_silo.yml) on the built-in
# Criteo-like data under `mpirun -np 2` (rank 0 aggregates, rank 1 runs the silos): example-level DP-SGD
# in every silo, BFV-encrypted updates, a privacy ledger record before any update leaves a silo. Prints
# the final test AUC and log loss, the epsilon spent with its unit (example-level, per silo), the privacy
# report (scripts/privacy_report.py) and where the TensorBoard logs are.
#
#   scripts/demo.sh [LOGDIR] [extra key=value overrides...]      (default LOGDIR: runs/demo_fl)
set -euo pipefail
cd "$(dirname "$0")/.."
# --- One machine: MPI stays on loopback (docs/federated.md, "MPI on one machine stays on loopback").
# Ranks: libfabric TCP bound to lo (UCX, if chosen, likewise). Launcher: MPICH's gforker forks the ranks
# locally and listens on no socket; hydra's mpirun would listen on 0.0.0.0 whatever the flags.
export MPIR_CVAR_CH4_NETMOD=ofi FI_PROVIDER=tcp FI_TCP_IFACE=lo UCX_NET_DEVICES=lo HYDRA_IFACE=lo
: "${MPIRUN:=$(dirname "${PYTHON:-.venv/bin/python}")/mpiexec.gforker}"
# --- end of the loopback settings
PY=${PYTHON:-.venv/bin/python}
MPIRUN=${MPIRUN:-$(dirname "$PY")/mpirun}
LOGDIR=${1:-runs/demo_fl}
shift || true
if [ -e "$LOGDIR/fl/checkpoint.json" ]; then
  echo "demo: $LOGDIR holds an earlier run; moving it to $LOGDIR.old" >&2
  rm -rf "$LOGDIR.old" && mv "$LOGDIR" "$LOGDIR.old"
fi
mkdir -p "$(dirname "$LOGDIR")"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$MPIRUN" -np 2 "$PY" -m mpi4py.futures scripts/train_fl.py \
  --config configs/dlrm_fl_silo.yml --logdir "$LOGDIR" "$@" | tee "$LOGDIR.out"
grep -v '^WARNING' "$LOGDIR.out" | tail -n 1 > "$LOGDIR.out.json"
"$PY" scripts/privacy_report.py --logdir "$LOGDIR" > /dev/null
"$PY" - "$LOGDIR" <<'PYEOF'
import json, sys
logdir = sys.argv[1]
out = json.loads(open(f"{logdir}.out.json").read().strip().splitlines()[-1])
summary = json.load(open(f"{logdir}/summary.json"))
last = summary["rounds"][-1]
print()
fed = summary["federated"]
rows = fed["partition"]["client_rows"]
print(f"secure federated DLRM: {out['rounds']} rounds, {fed['num_clients']} silos of about {rows['mean']:.0f} rows, "
      f"{last['sampled']} per round, {fed['pool_workers']} worker rank(s)")
print(f"final test AUC      : {out['test']['auc']:.4f}   (log loss {out['test']['logloss']:.4f})")
privacy = fed["privacy"]
print(f"epsilon spent       : {out['epsilon']:.3f} at delta {privacy['delta']:.2g}")
print(f"privacy unit        : {out['privacy_unit']}: one training example (impression) of a silo, "
      f"most exposed silo; ledger: {logdir}/privacy_ledger.sqlite")
if out["epsilon"] > 10:
    print(f"WARNING             : epsilon {out['epsilon']:.2f} is above 10: a weak privacy guarantee")
print(f"privacy report      : {logdir}/privacy_report.html (and .md, .json, PNG plots)")
print(f"TensorBoard logs    : {logdir}   ->  tensorboard --logdir {logdir}")
print(f"summary             : {logdir}/summary.json")
PYEOF
