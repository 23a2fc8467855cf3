# Source this from the repository root on a fresh GPU machine (torch with CUDA preinstalled, no network):
#     . benchmarks/gpu_env.sh
# It installs the wheels carried in .whl/ (diffusers, smplx, diffrp-nvdiffrast, trimesh, imageio-ffmpeg)
# into /tmp/site without touching the machine's torch, puts the repo and them on PYTHONPATH, and starts the
# one-time nvdiffrast build in the background (waited for by `wait_nvdiffrast`), so that no benchmark's
# first stage pays it. Wheels are fetched beforehand on a machine with an index:
#     pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux2014_x86_64 --platform any -d .whl diffusers smplx trimesh imageio-ffmpeg==0.5.1
#     pip download --no-deps -d .whl diffrp-nvdiffrast
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || return 1 2>/dev/null || exit 1
# bytecode now, as a user's `pip install` does by default: otherwise the first stage to import diffusers or
# trimesh compiles them on the clock (trimesh: 1.1 s inside the mesh stage's run on the H200)
python3 -m compileall -q -j 0 /tmp/site orchestrator stages up2you budgets >/dev/null || true
# and for the machine's own packages (torch, transformers, ...): installed here without bytecode, and with
# PYTHONDONTWRITEBYTECODE=1 Python keeps none of what it compiles, so every stage process compiled torch
# again (benchmarks/pyc_check.sh shows it). In place when the folder is writable, as pip would have;
# otherwise into a cache that every process then reads (PYTHONPYCACHEPREFIX: all modules, ours included)
MACHINE_SITE=$(python3 -c "import torch, os; print(os.path.dirname(os.path.dirname(torch.__file__)))")
COMPILE_T0=$(date +%s)
if [ -w "$MACHINE_SITE" ]; then
    python3 -m compileall -q -j 0 "$MACHINE_SITE" >/dev/null 2>&1 || true
else
    export PYTHONPYCACHEPREFIX=/tmp/pycache
    python3 -m compileall -q -j 0 "$MACHINE_SITE" /tmp/site orchestrator stages up2you budgets >/dev/null 2>&1 || true
fi
echo "bytecode for $MACHINE_SITE in $(( $(date +%s) - COMPILE_T0 )) s (prefix: ${PYTHONPYCACHEPREFIX:-none})"
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
export PYTHONUNBUFFERED=1
export UP2YOU_CACHE_DIR=${UP2YOU_CACHE_DIR:-/tmp/up2you-cache}
export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-/tmp/torch_extensions}
python3 -c "from up2you.render.nvdiffrast_backend import load_nvdiffrast as l; print('nvdiffrast built in %.0f s' % l()[1])" \
    >/tmp/nvdiffrast_build.log 2>&1 &
NVDIFFRAST_BUILD_PID=$!
wait_nvdiffrast() { wait "$NVDIFFRAST_BUILD_PID"; cat /tmp/nvdiffrast_build.log; }
nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv,noheader
python3 -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
