"""Fake mesh stage: writes mesh.obj (a deliverable)."""

from stages.harness import stage_main
from tests.fakestages.common import run_fake

NAME = "mesh"


def run(ctx, prepared) -> None:  # noqa: ANN001
    out = run_fake(ctx, ("views", "rgb"))
    with ctx.write_file("mesh.obj") as tmp:
        tmp.write_text("".join(f"v {float(out[i, 0, 0]):.6f} {i} 0\n" for i in range(out.shape[0])) + "f 1 2 3\n")


if __name__ == "__main__":
    stage_main(NAME, run)
