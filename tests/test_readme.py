"""README tables name real objects; the README opens with the main job and the test command."""

from __future__ import annotations

import re
from pathlib import Path

import jaxenc

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_every_name_in_the_layer_table_exists():
    section = README.split("## Layers")[1].split("\n## ")[0]
    names = re.findall(r"`(jaxenc\.(?:nn|losses)\.\w+)", section)
    assert len(names) >= 25
    for dotted in names:
        _, package, name = dotted.split(".")
        assert hasattr(getattr(jaxenc, package), name), dotted


def test_readme_opens_with_exactly_the_two_commands():
    block = README.split("```bash\n")[1].split("```")[0].strip().splitlines()
    assert len(block) == 2
    assert block[0].startswith(
        "bash .ci/setup && .venv/bin/python -m train.main --config configs/default.py --workdir runs/default"
    )
    assert block[1].startswith("bash .ci/run")


def test_readme_recipe_table_names_real_configs_and_store_weights():
    from jaxenc.models import store

    section = README.split("## Recipes")[1].split("\n## ")[0]
    recipes = re.findall(r"^\| `(\w+)` \|", section, flags=re.M)
    configs = Path(__file__).resolve().parents[1] / "configs"
    assert len(recipes) >= 8 and all((configs / f"{r}.py").is_file() for r in recipes)
    for name in re.findall(r"--checkpoint (\w+)`", section):
        assert name in store.pretrained_model_list(), name
