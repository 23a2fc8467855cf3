"""Fake per-view stage (like apose): keyed on views and resolution."""

from stages.harness import stage_main
from tests.fakestages.common import run_fake

NAME = "views"


def run(ctx, prepared) -> None:  # noqa: ANN001
    run_fake(ctx, ("prep",))


if __name__ == "__main__":
    stage_main(NAME, run)
