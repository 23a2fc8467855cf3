"""Fake diffusion stage (named rgb, like the real one, so its views are deliverables): keyed on the diffusion
knobs; its outputs carry images and alphas as the real stage's do, and stages.export writes the view PNGs."""

from stages.harness import stage_main
from tests.fakestages.common import run_fake

NAME = "rgb"


def run(ctx, prepared) -> None:  # noqa: ANN001
    out = run_fake(ctx, ("prep", "views"))
    images = out.clamp(0, 1)[:, None].repeat(1, 3, 1, 1)
    ctx.save_tensors("outputs.safetensors", {"out": out, "images": images, "alphas": images[:, 0]})


if __name__ == "__main__":
    stage_main(NAME, run)
