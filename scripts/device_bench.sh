#!/usr/bin/env bash
# The whole GPU benchmark of the Speed section in one call: about 4 minutes on one H100/H200
# (each stage has its own time limit, 6 minutes in all), markdown on stdout for the README.
# Its last stage is a one-GPU torchrun smoke run of data-parallel training over NCCL (under a
# minute; README "Scaling out").
#
#   bash scripts/device_bench.sh [OUT_DIR]        # from anywhere; JSON and logs go to OUT_DIR
#
# Needs: a python3 with torch and CUDA (else it tries `pip install torch==2.14.1
# torchvision==0.29.1`, which needs a package index). Nothing else is installed: the code runs
# from this checkout (PYTHONPATH). The end-to-end figure runs `gsgd train`, which needs
# hydra-core and omegaconf; on a machine without them and without a package index, put their
# wheels in .whl/ first (on a machine with pip, in the repo root):
#   python3 -m pip download --no-deps -d .whl hydra-core==1.3.2 omegaconf==2.3.0 \
#       antlr4-python3-runtime==4.9.3
# and they are installed from there into /tmp/site; without them that figure is skipped.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-/tmp/gsgd-device-bench}}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export OMP_WAIT_POLICY=${OMP_WAIT_POLICY:-PASSIVE}

if ! nvidia-smi -L >/dev/null 2>&1; then
    echo "device_bench: no NVIDIA GPU here (nvidia-smi -L failed): nothing to measure, nothing installed"
    exit 2
fi
if ! $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null; then
    # a bare GPU machine: torch into a folder of its own, never into the system's packages
    echo "device_bench: no torch with CUDA in $PY; pip install torch==2.14.1 torchvision==0.29.1 into /tmp/torch-site"
    $PY -m pip install -q --target /tmp/torch-site torch==2.14.1 torchvision==0.29.1 \
        && export PYTHONPATH="$PYTHONPATH:/tmp/torch-site"
    $PY -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null \
        || { echo "device_bench: still no torch with CUDA: stop"; exit 1; }
fi
HAVE_HYDRA=1
if ! $PY -c "import hydra, omegaconf, tqdm" 2>/dev/null; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
            && export PYTHONPATH="$PYTHONPATH:/tmp/site"
    fi
    $PY -c "import hydra, omegaconf, tqdm" 2>/dev/null || HAVE_HYDRA=0
fi

echo "## GPU benchmark ($(date -u +%Y-%m-%d), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?'))"
echo
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null | sed 's/^/GPU: /'
$PY -c "import torch; print(f'torch {torch.__version__}, CUDA {torch.version.cuda}')"
echo

echo "### GPU tests (CUDA graphs of the training step, CUDA against CPU steps)"
echo '```'
timeout 150 $PY -m pytest -q -m gpu tests/ -p no:cacheprovider --continue-on-collection-errors \
    2>&1 | tail -n 12
echo '```'
echo

echo "### Step and iteration, eager and as a CUDA graph"
echo
timeout 240 $PY scripts/bench_step.py --suite all --graphs --json "$OUT_DIR/bench_step.json" \
    2>"$OUT_DIR/bench_step.err" || echo "(bench_step stopped: see $OUT_DIR/bench_step.err)"
echo

if [ "$HAVE_HYDRA" = 1 ]; then
    echo "### End to end: gsgd train, one epoch, synthetic data of Fashion-MNIST 7x7's size"
    SYNTH="device=cuda data=synthetic data.shape=[1,7,7] data.num_classes=10 data.train_size=60000 data.test_size=10000"
    timeout 100 $PY scripts/bench_step.py --suite none --e2e --e2e-rounds 2 --e2e-args "$SYNTH" \
        2>>"$OUT_DIR/e2e.err" || echo "(stopped: see $OUT_DIR/e2e.err)"
    timeout 100 $PY scripts/bench_step.py --suite none --e2e --e2e-rounds 2 \
        --e2e-args "$SYNTH train.cuda_graphs=true" 2>>"$OUT_DIR/e2e.err" \
        || echo "(stopped: see $OUT_DIR/e2e.err)"
    echo
    # Data-parallel training on a GPU (README "Scaling out"): the CPU tests use gloo; this runs
    # the NCCL path once, one process, a 2-job sweep (MLP; tiny ResNet with SyncBatchNorm).
    echo "### Data-parallel smoke run: torchrun --nproc_per_node=1 (NCCL)"
    echo '```'
    SMOKE="$OUT_DIR/torchrun_smoke"
    rm -rf "$SMOKE"
    timeout 60 $PY -m torch.distributed.run --standalone --nproc_per_node=1 -m gsgd_cli train -m \
        experiment=smoke device=cuda model=mlp,resnet_tiny distributed.sync_bn=true \
        progress=false hydra.sweep.dir="$SMOKE" 2>"$OUT_DIR/torchrun_smoke.err" \
        | grep "^gsgd train:" | grep -v "note:" \
        || echo "(torchrun smoke run failed: see $OUT_DIR/torchrun_smoke.err)"
    $PY -c "import json, sys, pathlib
for job in sorted(pathlib.Path(sys.argv[1]).glob('*/summary.json')):
    s = json.loads(job.read_text())
    print(job.parent.name, s['status'], 'world_size', s.get('world_size'),
          s.get('distributed_backend'), s['device'], s['config'].get('model'))" "$SMOKE" 2>&1
    echo '```'
else
    echo "(end-to-end figure and torchrun smoke run skipped: hydra-core/omegaconf not installed here; see the header of scripts/device_bench.sh)"
fi
