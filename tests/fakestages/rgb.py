"""Fake diffusion stage (named rgb, like the real one, so its views are deliverables): keyed on the diffusion knobs; writes view PNGs like the rgb stage."""

from stages.harness import stage_main
from tests.fakestages.common import run_fake

NAME = "rgb"


def run(ctx, prepared) -> None:  # noqa: ANN001
    out = run_fake(ctx, ("prep", "views"))
    for i in range(out.shape[0]):
        ctx.save_image(f"view_{i:02d}.png", out[i].unsqueeze(-1).repeat(1, 1, 3).clamp(0, 1).numpy())


if __name__ == "__main__":
    stage_main(NAME, run)
