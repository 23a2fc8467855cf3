#!/usr/bin/env bash
# Does this machine's Python import torch from bytecode, or compile it each time? (no side effects
# outside /tmp). Prints where torch lives, whether its __pycache__ holds bytecode and is writable, and
# the wall time of `import torch` as installed, then with an empty PYTHONPYCACHEPREFIX=/tmp/pyc (no
# bytecode found: what compiling from source costs; under PYTHONDONTWRITEBYTECODE=1 every run compiles,
# otherwise the first run writes the bytecode there and the later ones read it).
PY=${PY:-python3}
$PY - <<'PYEOF'
import os, sys, torch, glob
d = os.path.dirname(torch.__file__)
pyc = glob.glob(os.path.join(d, "__pycache__", "*.pyc"))
print("python", sys.version.split()[0], "torch", torch.__version__, "at", d)
print("dont_write_bytecode", sys.dont_write_bytecode, "pycache_prefix", sys.pycache_prefix,
      "PYTHONDONTWRITEBYTECODE", os.environ.get("PYTHONDONTWRITEBYTECODE"))
print("torch/__pycache__ pyc files:", len(pyc), "writable:", os.access(d, os.W_OK),
      "tag", sys.implementation.cache_tag)
print("sample:", sorted(os.path.basename(p) for p in pyc)[:3])
PYEOF
t() { local s=$(date +%s%N); env "$@" $PY -c "import torch"; echo "$* import torch: $(( ($(date +%s%N) - s) / 1000000 )) ms"; }
t X=1; t X=1; rm -rf /tmp/pyc; t PYTHONPYCACHEPREFIX=/tmp/pyc; t PYTHONPYCACHEPREFIX=/tmp/pyc; t PYTHONPYCACHEPREFIX=/tmp/pyc
$PY -X importtime -c "import torch" 2>&1 | sort -t'|' -k1 -n | tail -3
