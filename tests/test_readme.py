"""The README's Python example runs as written (with fewer epochs)."""

import pathlib
import re

import pytest


@pytest.mark.slow
def test_readme_example_runs():
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert blocks, "README has no Python example"
    code = blocks[0].replace("num_epochs=40", "num_epochs=2")
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert namespace["log_probs"].shape == (451, 10)
    assert namespace["members"].shape == (5, 451, 10)


@pytest.mark.slow
def test_readme_sabma_example_runs():
    readme = pathlib.Path(__file__).resolve().parents[1] / "README.md"
    blocks = re.findall(r"```python\n(.*?)```", readme.read_text(), re.S)
    assert len(blocks) >= 2, "README has no SA-BMA example"
    namespace = {}
    for block in blocks[:2]:
        code = block.replace("num_epochs=40", "num_epochs=2")
        exec(compile(code, "README.md", "exec"), namespace)
    summary = namespace["bf"].metrics.summary(
        namespace["log_probs"], namespace["splits"]["test"].labels
    )
    assert 0.3 < float(summary["accuracy"]) <= 1.0  # 2 epochs; chance is 0.1
