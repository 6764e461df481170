"""Dependencies match use: every declared dependency is imported by ecaseg, the optional ones (pydensecrf,
TensorBoard) are imported lazily and name their extra when missing."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORT_NAMES = {"opencv-python-headless": "cv2", "pyyaml": "yaml", "pillow": "PIL"}


def _requirements(spec: list[str]) -> list[str]:
    return [re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower() for req in spec]


def test_every_declared_dependency_is_imported() -> None:
    tomllib = pytest.importorskip("tomllib")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    sources = "\n".join(p.read_text() for p in (ROOT / "ecaseg").rglob("*.py"))
    for name in _requirements(project["dependencies"]):
        module = IMPORT_NAMES.get(name, name)
        assert re.search(rf"^\s*(import|from) {re.escape(module)}\b", sources, re.M), name
    extras = project["optional-dependencies"]
    assert _requirements(extras["pydensecrf"]) == ["pydensecrf2"]
    assert _requirements(extras["train"]) == ["tensorboard"]
    assert "ecaseg[pydensecrf,train]" in extras["test"]  # CI keeps the equivalence and TensorBoard tests


def test_crf_module_imports_without_pydensecrf() -> None:
    code = (
        "import sys; import ecaseg.crf, ecaseg.engine.inference; "
        "assert 'pydensecrf' not in sys.modules, 'pydensecrf imported eagerly'"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_missing_tensorboard_names_the_train_extra(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from ecaseg.engine.trainer import ECATrainer
    from ecaseg.errors import MissingDependencyError

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(MissingDependencyError, match=r"pip install ecaseg\[train\]"):
        ECATrainer._tensorboard(SimpleNamespace(work_dir=tmp_path))  # type: ignore[arg-type]
