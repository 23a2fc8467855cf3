"""`doctor` counts the modules the stages import without bytecode, and `setup` compiles them."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from orchestrator import bytecode, doctor


@pytest.fixture
def package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """An importable package `fakepkg` of three modules (one in a subpackage), with no bytecode at all."""
    root = tmp_path / "site" / "fakepkg"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("X = 1\n")
    (root / "a.py").write_text("def f():\n    return 2\n")
    (root / "sub" / "__init__.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    monkeypatch.setattr(sys, "pycache_prefix", None)
    return "fakepkg"


def test_survey_counts_modules_without_bytecode_and_setup_compiles_them(package: str) -> None:
    (before,) = bytecode.survey([package, "no_such_package_here"])  # an absent package is left out
    assert (before.name, before.modules, before.missing, before.writable) == (package, 3, 3, True)
    ok, detail, fix = bytecode.summary([before])
    assert not ok and f"{package} 3 of 3" in detail and "up2you-budget setup" in fix

    assert bytecode.compile_bytecode([before]).returncode == 0
    (after,) = bytecode.survey([package])
    assert (after.modules, after.missing) == (3, 0)
    assert bytecode.summary([after])[0] is True


def test_an_unwritable_package_is_not_compiled_and_the_fix_says_who_can(package: str,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(bytecode, "_writable", lambda folder: False)
    (pkg,) = bytecode.survey([package])
    assert bytecode.compile_bytecode([pkg]).returncode == 0
    assert bytecode.survey([package])[0].missing == 3  # left as it was
    _, _, fix = bytecode.summary([pkg])
    assert str(pkg.folder) in fix and "PYTHONPYCACHEPREFIX" in fix


def test_doctor_shows_missing_bytecode_as_slow_without_blocking_a_run(package: str) -> None:
    row = doctor.check_bytecode((package,))
    assert not row.ok and not row.blocking and f"{package} 3 of 3" in row.detail
    fine = doctor.Check("host RAM", True, "plenty")
    assert doctor.ready([fine, row])  # a run can start: it is only slower
    assert "slow" in str(doctor.table([row]).columns[1]._cells[0])
