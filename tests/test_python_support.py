"""Declared support is real: pyproject says Python >= 3.10, where the standard library has no
tomllib. Every TOML read goes through ``pipeline.tomlcompat`` (tomllib, else the tomli package,
which pyproject requires for Python < 3.11)."""

import ast
import re

from conftest import REPO
from pipeline.tomlcompat import tomllib

PACKAGES = ("pipeline", "stage1_teacher_cache", "stage2_student_train", "bench", "tests")


def imports_tomllib(path) -> bool:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and any(a.name in ("tomllib", "tomli") for a in node.names):
            return True
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module in ("tomllib", "tomli"):
            return True
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "__import__" and node.args \
                and getattr(node.args[0], "value", None) in ("tomllib", "tomli"):
            return True
    return False


def test_only_tomlcompat_imports_tomllib():
    offenders = [str(p.relative_to(REPO)) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))
                 if p.name != "tomlcompat.py" and imports_tomllib(p)]
    assert not offenders, f"import tomllib from pipeline.tomlcompat instead (Python 3.10 has none): {offenders}"


def test_the_fallback_is_a_declared_dependency_below_3_11():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    lowest = re.fullmatch(r">=\s*3\.(\d+)", pyproject["project"]["requires-python"])
    assert lowest, pyproject["project"]["requires-python"]
    if int(lowest.group(1)) < 11:
        assert any(re.match(r"tomli\b.*python_version\s*<\s*['\"]3\.11['\"]", d)
                   for d in pyproject["project"]["dependencies"])


def test_tomlcompat_reads_toml_and_raises_its_decode_error():
    assert tomllib.loads('a = 1\n[b]\nc = "x"') == {"a": 1, "b": {"c": "x"}}
    try:
        tomllib.loads("a = ")
    except tomllib.TOMLDecodeError:
        return
    raise AssertionError("a broken TOML line must raise TOMLDecodeError")
