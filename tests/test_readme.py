"""The README's Python example runs as written."""
import os
import re

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_readme_python_example_runs():
  text = open(os.path.join(ROOT, "README.md")).read()
  blocks = re.findall(r"```python\n(.*?)```", text, re.S)
  assert blocks, "README has no python example"
  scope = {}
  exec(compile(blocks[0], "README.md", "exec"), scope)
  x, score, energy = scope["x"], scope["score"], scope["energy"]
  assert x.shape == (8, 28, 28, 1) and np.all(np.isfinite(np.asarray(x)))
  assert score.shape == (8, 28, 28, 1) and energy.shape == (8,)
