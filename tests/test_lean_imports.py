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
from up2you.diffusion.lean_imports import compiler_state, lean_imports
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
                  "package_name": package.Transformer2DModel.__name__, "compiler": compiler_state()}))
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
    assert lean["applied"]["held_back"] == ["torch._dynamo"]
    assert full["applied"] == {"deferred": [], "absent": [], "held_back": []}
    assert lean["compiler"] == "held back"  # the compiler's front end was never imported, not even for the forward
    assert full["compiler"] == "imported"
    assert full["eager_imported"] and not lean["eager_imported"]  # the other model families were not imported
    assert lean["modules"] < full["modules"]
    # asking the package itself for a name still works: its real __init__ runs then
    assert lean["package_name"] == full["package_name"] == "Transformer2DModel"


def test_an_unused_optional_package_looks_absent_and_a_used_one_is_left_alone(tmp_path: Path) -> None:
    for name in ("peft", "sklearn", "scipy"):  # stand-ins: whatever is installed here, these are what is found
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
    assert out["before"] and sorted(out["marked"]) == ["peft", "scipy", "sklearn"]
    assert not out["after"] and not out["imported"] and out["json_still_there"]


def test_the_compiler_stand_in_steps_aside_for_anything_but_its_decorators() -> None:
    code = """
import json, sys, torch
from up2you.diffusion.lean_imports import CompilerStandIn, compiler_state, lean_imports
lean_imports()
import diffusers, transformers  # noqa: F401
stand_in = sys.modules["torch._dynamo"]

@torch.compiler.disable
def kept(x):
    return x + 1

before = compiler_state()
same = kept(torch.ones(1)).item() == 2.0 and isinstance(stand_in, CompilerStandIn)
import torch._dynamo.config as config  # a submodule: the real compiler, and its own copy of the submodule
compiled = torch.compile(lambda t: t * 2 + 1, backend="eager")(torch.ones(2)).tolist()
print(json.dumps({"before": before, "same": same, "after": compiler_state(), "compiled": compiled,
                  "real": not isinstance(sys.modules["torch._dynamo"], CompilerStandIn),
                  "one_config": config is sys.modules["torch._dynamo"].config,
                  "through_stand_in": stand_in.config is config}))
"""
    out = _run(code, True)
    assert out["before"] == "held back" and out["same"]
    assert out["after"] == "imported for torch._dynamo.config (from <string>:14)" and out["real"]
    assert out["one_config"] and out["through_stand_in"] and out["compiled"] == [3.0, 3.0]
