"""The CPU kernels are pinned before numpy and torch load, so the pipeline's bytes do not depend on
the host's instruction set."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from shiftguard import _kernels

ROOT = Path(__file__).resolve().parents[2]
AVX2 = frozenset({"avx2", "fma", "sse2"})


def test_pin_sets_every_variable_on_an_avx2_x86_64_host() -> None:
    env: dict[str, str] = {}
    added = _kernels.pin(env, machine="x86_64", flags=AVX2)
    assert added == _kernels.PINNED
    assert env == _kernels.PINNED


def test_pin_leaves_what_the_user_set() -> None:
    env = {"MKL_CBWR": "AVX512", "PATH": "/bin"}
    added = _kernels.pin(env, machine="x86_64", flags=AVX2)
    assert "MKL_CBWR" not in added
    assert env["MKL_CBWR"] == "AVX512" and env["PATH"] == "/bin"
    assert env["OPENBLAS_CORETYPE"] == "Haswell"


@pytest.mark.parametrize(
    ("env", "machine", "flags"),
    [
        ({"SHIFTGUARD_NATIVE_KERNELS": "1"}, "x86_64", AVX2),
        ({}, "aarch64", frozenset({"asimd"})),
        ({}, "x86_64", frozenset({"sse2", "avx"})),  # no AVX2: Haswell kernels would not run
        ({}, "x86_64", frozenset({"avx2"})),  # no FMA
    ],
    ids=["opted-out", "arm", "no-avx2", "no-fma"],
)
def test_pin_sets_nothing_where_it_must_not(
    env: dict[str, str], machine: str, flags: frozenset[str]
) -> None:
    before = dict(env)
    assert _kernels.pin(env, machine=machine, flags=flags) == {}
    assert env == before


def test_opting_out_with_zero_or_empty_still_pins() -> None:
    for value in ("0", ""):
        env = {"SHIFTGUARD_NATIVE_KERNELS": value}
        assert _kernels.pin(env, machine="x86_64", flags=AVX2) == _kernels.PINNED


def test_cpu_flags_reads_the_first_processor(tmp_path: Path) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(
        "processor\t: 0\nflags\t\t: fpu sse2 avx2 fma\n\nprocessor\t: 1\nflags\t\t: fpu\n"
    )
    assert _kernels.cpu_flags(str(cpuinfo)) == {"fpu", "sse2", "avx2", "fma"}
    assert _kernels.cpu_flags(str(tmp_path / "missing")) == frozenset()


def test_importing_the_package_first_pins_numpy_and_torch_in_a_fresh_process() -> None:
    env = {
        k: v for k, v in os.environ.items() if k not in _kernels.PINNED and k != _kernels.OPT_OUT
    }
    code = (
        "import json, os, shiftguard, numpy, torch\n"
        "from threadpoolctl import threadpool_info\n"
        "blas = [i.get('architecture') for i in threadpool_info() if i['internal_api'] == 'openblas']\n"
        "print(json.dumps({'env': {k: os.environ.get(k) for k in shiftguard._kernels.PINNED},\n"
        "                  'openblas': blas, 'aten': torch.backends.cpu.get_cpu_capability()}))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    seen = json.loads(out.stdout)
    flags = _kernels.cpu_flags()
    if _kernels.pin({}, flags=flags):  # this host can run the pinned kernels
        assert seen["env"] == _kernels.PINNED
        assert seen["openblas"] and set(seen["openblas"]) == {"Haswell"}
        assert seen["aten"] == "AVX2"
    else:
        assert seen["env"] == dict.fromkeys(_kernels.PINNED)


def test_every_stage_script_imports_the_package_before_any_numeric_library() -> None:
    """A stage that imported numpy or torch first would load them unpinned."""
    stdlib = sys.stdlib_module_names
    for script in sorted((ROOT / "pipelines").glob("*.py")):
        tree = ast.parse(script.read_text(encoding="utf-8"))
        first = None
        for node in tree.body:
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            else:
                continue
            outside = [n for n in names if n.split(".")[0] not in stdlib | {"__future__"}]
            if outside:
                first = outside[0]
                break
        assert first is not None and first.split(".")[0] == "shiftguard", (script.name, first)
