"""docs/extending.md shows the code the extension tests run: every Python block in it is, line for line, a class
of tests/test_extending_*.py (so the page cannot drift from what is tested); every test docs/reliability.md names
exists."""

import re

from conftest import ROOT


def test_every_example_in_extending_md_is_tested_code():
    doc = (ROOT / "docs" / "extending.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", doc, flags=re.S)
    assert len(blocks) >= 5  # a block, an objective (+ its sampler), a sampler, a metric, a training accelerator
    tests = "\n".join(p.read_text() for p in sorted((ROOT / "tests").glob("test_extending_*.py")))
    for block in blocks:
        for chunk in block.strip().split("\n\n\n"):  # one class per chunk
            assert chunk.strip() in tests, chunk.splitlines()[0]


def test_every_test_the_fault_table_names_exists():
    doc = (ROOT / "docs" / "reliability.md").read_text()
    named = re.findall(r"`(tests/test_\w+\.py)::(test_\w+)`", doc)
    assert len(named) >= 30
    for path, name in named:
        source = (ROOT / path).read_text()
        assert re.search(rf"^def {name}\(", source, flags=re.M), f"{path}::{name}"
