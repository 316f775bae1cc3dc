#!/usr/bin/env bash
# GPU proof for `corolla sim --gpus-per-client` (issue #14): 4 virtual clients, each with a quarter of a GPU, through
# Flower's Ray simulation. Prints the GPU every actor was given (Ray's id) and the device torch trained on, per node
# profile and per training job (updates.jsonl's trainer_pid -> the profile of the same actor process).
# Needs CUDA GPUs and the CUDA build of torch (deploy/setup.sh installs it when nvidia-smi sees a GPU).
#   bash bench/gpu_sim.sh [OUT [corolla sim options...]]   (MODEL=minilm or a model folder; default: tiny-bert)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/gpu_sim}
MODEL=${MODEL:-tiny-bert}
SHARE=${SHARE:-0.25}  # GPU share per actor; SHARE=0 checks the script on a CPU machine
nvidia-smi -L || echo "nvidia-smi: no GPU driver here"
.venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available(), torch.cuda.device_count(), 'GPUs')"
.venv/bin/corolla sim --out "$OUT" --overwrite --nodes 4 --gpus-per-client "$SHARE" --cpus-per-client 1 \
    --set model="$MODEL" --set num-rounds=2 --set clients-per-round=4 --set local-steps=5 --set min-nodes=4 \
    --set max-length=32 "${@:2}"
.venv/bin/python - "$OUT" <<'PY'
import json, sys
from pathlib import Path

run = Path(sys.argv[1])
rows = lambda name: [json.loads(line) for line in (run / name).read_text().splitlines() if line.strip()]
where = {}
print("node profiles (the actor that answered each node's profile query):")
for n in rows("nodes.jsonl"):
    if n.get("status") != "ok":
        continue
    device, *placement = n["device"].split()
    info = dict(p.split("=", 1) for p in placement)
    where[info.get("pid")] = (device, info.get("gpu", "none"), info.get("ray-node", "?"))
    print(f"  node {n['node']}: torch device {device}, Ray GPU {info.get('gpu', 'none')}, actor pid {info.get('pid')}")
print("training jobs:")
for u in rows("updates.jsonl"):
    pid = str(int(u["trainer_pid"])) if u.get("trainer_pid") is not None else "?"
    device, gpu, _ = where.get(pid, ("?", "?", "?"))
    print(f"  version {u.get('base_version')} node {u.get('node')}: actor pid {pid} -> {device} (Ray GPU {gpu}),"
          f" {u.get('status')}")
gpus = sorted({g for _, g, _ in where.values()})
print(f"{len(where)} actor(s) seen on Ray GPU(s) {gpus}; every actor on CUDA: "
      f"{all(d.startswith('cuda') for d, _, _ in where.values())}")
print(json.dumps(json.loads((run / "summary.json").read_text()), indent=1))
PY
