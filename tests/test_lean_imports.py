"""up2you.diffusion.lean_imports: fewer modules imported, the same classes and the same numbers.

Each check runs in a fresh interpreter: what a process has imported is the thing under test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

FORWARD = """
import json, sys, hashlib
from up2you.diffusion.lean_imports import lean_imports
applied = lean_imports()
import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel
from up2you.diffusion.tiny import UNET_TINY, VAE_TINY
torch.manual_seed(0)
unet = UNet2DConditionModel(**UNET_TINY).eval()
vae = AutoencoderKL(**VAE_TINY).eval()
x = torch.randn(2, UNET_TINY.get("in_channels", 4), 16, 16)
emb = torch.randn(2, 77, UNET_TINY["cross_attention_dim"])
with torch.no_grad():
    out = unet(x, torch.tensor(10), encoder_hidden_states=emb).sample
    img = vae.decode(out / 0.18215).sample
digest = hashlib.sha256(out.numpy().tobytes() + img.numpy().tobytes()).hexdigest()
eager = "diffusers.models.transformers.transformer_flux" in sys.modules
import diffusers.models.transformers as package
print(json.dumps({"applied": applied, "digest": digest, "eager_imported": eager, "modules": len(sys.modules),
                  "package_name": package.Transformer2DModel.__name__}))
"""


def _run(code: str, lean: bool, extra_path: str | None = None) -> dict:
    env = {**os.environ, "UP2YOU_LEAN_IMPORTS": "1" if lean else "0"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), extra_path, env.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_lean_imports_skip_the_eager_packages_and_change_no_number() -> None:
    lean, full = _run(FORWARD, True), _run(FORWARD, False)
    assert lean["digest"] == full["digest"]  # the same model code ran: bit for bit the same outputs
    assert set(lean["applied"]["deferred"]) == {"diffusers.models.transformers", "diffusers.models.unets",
                                                "diffusers.models.autoencoders"}  # fmt: skip
    assert full["applied"] == {"deferred": [], "absent": []}
    assert full["eager_imported"] and not lean["eager_imported"]  # the other model families were not imported
    assert lean["modules"] < full["modules"]
    # asking the package itself for a name still works: its real __init__ runs then
    assert lean["package_name"] == full["package_name"] == "Transformer2DModel"


def test_an_unused_optional_package_looks_absent_and_a_used_one_is_left_alone(tmp_path: Path) -> None:
    for name in ("peft", "sklearn"):  # stand-ins: whatever is installed here, these are what is found
        pkg = tmp_path / name
        pkg.mkdir()
        (pkg / "__init__.py").write_text("raise RuntimeError('imported')\n")
    code = """
import importlib.util, json
from up2you.diffusion.lean_imports import mark_absent
before = importlib.util.find_spec("peft") is not None
marked = mark_absent()
try:
    import peft  # noqa: F401
    imported = True
except ImportError:
    imported = False
print(json.dumps({"before": before, "marked": marked, "after": importlib.util.find_spec("peft") is not None,
                  "imported": imported, "json_still_there": importlib.util.find_spec("json") is not None}))
"""
    out = _run(code, True, extra_path=str(tmp_path))
    assert out["before"] and sorted(out["marked"]) == ["peft", "sklearn"]
    assert not out["after"] and not out["imported"] and out["json_still_there"]
