#!/usr/bin/env bash
# The whole product on a GPU with tiny weights: every stage's CUDA path (nvdiffrast, memory caps, NVML
# per-process sampling), an injected OOM in `rgb` that must be retried, then a resume. Run from the repo root
# on a GPU machine; writes logs and run.json files to $OUT (default ./out/gpu_smoke).
set -uo pipefail
OUT=${OUT:-out/gpu_smoke}; mkdir -p "$OUT"
export UP2YOU_CACHE_DIR=${UP2YOU_CACHE_DIR:-/tmp/up2you-cache}
photos=$(mktemp -d)/photos
python3 - "$photos" <<'PY'
import sys
from pathlib import Path
from PIL import Image, ImageDraw
d = Path(sys.argv[1]); d.mkdir(parents=True)
for i in range(3):
    im = Image.new("RGBA", (240, 360), (0, 0, 0, 0)); g = ImageDraw.Draw(im)
    g.ellipse((90, 16, 150, 76), fill=(220, 180, 150, 255)); g.rectangle((76, 76, 164, 220), fill=(40 + 60 * i, 80, 160, 255))
    g.rectangle((84, 220, 116, 344), fill=(30, 30, 60, 255)); g.rectangle((124, 220, 156, 344), fill=(30, 30, 60, 255))
    im.save(d / f"photo_{i}.png")
PY
up() { python3 -c "import cli, sys; sys.exit(cli.main())" "$@"; }
up gpus 2>&1 | tee "$OUT/gpus.txt"
UP2YOU_FAULTS=rgb:oom:1 up --tiny --vram 12GB --views 20 --resolution 768 "$photos" --out "$OUT/run" 2>&1 | tee "$OUT/run1.log"
echo "exit $?"
cp "$OUT/run/run.json" "$OUT/run1.json" 2>/dev/null
up --tiny --vram 12GB --views 20 --resolution 768 "$photos" --out "$OUT/run" 2>&1 | tail -5 | tee "$OUT/run2.log"
cp "$OUT/run/vram_timeline.png" "$OUT/" 2>/dev/null
