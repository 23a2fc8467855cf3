"""Fake first stage: reads the input photos."""

from stages.harness import stage_main
from tests.fakestages.common import run_fake

NAME = "prep"


def run(ctx, prepared) -> None:  # noqa: ANN001 - the harness's signature
    run_fake(ctx, ("inputs",))


if __name__ == "__main__":
    stage_main(NAME, run)
