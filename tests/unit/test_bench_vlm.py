"""bench/vlm.py's GPU case builds its Gemma-3-4B-shaped config on this CPU (meta device only)."""

from __future__ import annotations

import importlib.util
import sys

from tests import REPO_ROOT

BENCH = REPO_ROOT / "bench" / "vlm.py"


def test_gemma3_4b_shape_dry_run() -> None:
    spec = importlib.util.spec_from_file_location("bench_vlm", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_vlm"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    info = module.dry_run("gemma3-4b")
    assert info["image_tokens"] == 256 and info["pool_block"] == 4 and info["patches"] == 4096
    assert info["d_transcoder"] == 16384 and info["dtype"] == "bfloat16"
    assert 4.0e9 < info["model_params"] < 4.6e9  # Gemma-3-4B: 4.3 B parameters
