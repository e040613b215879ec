"""kd_ops is the library: PyTorch, pyarrow and numpy only. Importing every module of it must not
import Ray or MLflow (workflows orchestrates with them)."""
import pkgutil
import subprocess
import sys
from pathlib import Path

import kd_ops


def test_kd_ops_imports_neither_ray_nor_mlflow():
    modules = sorted(m.name for m in pkgutil.iter_modules(kd_ops.__path__, "kd_ops."))
    assert len(modules) >= 10 and "kd_ops.store" in modules
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            "print(sorted({n.split('.')[0] for n in sys.modules} & {'ray', 'mlflow'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=Path(kd_ops.__file__).parent.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]", out.stdout
