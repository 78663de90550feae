"""docs/ARCHITECTURE.md's "where to add" list for an assigner is complete: a dummy rule added to a copy of the
package by exactly those three edits loads from a config, pairs on one process and on two simulated ranks, has its
properties and its label, and nothing else had to change. The copy is imported in this process in place of the
package (torch stays loaded), then the package's own modules come back."""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import immiscible_cli

SECTION = '''

class MirrorAssigner(_AssignerBase):
    name: Literal["mirror"] = "mirror"
    sign: float = -1.0
    """The vanilla draw times this."""

    @classmethod
    def label_settings(cls, section: dict[str, Any]) -> list[str]:
        return [f"sign={section.get('sign', -1.0):g}"]

'''

RULE = '''"""A dummy rule for the where-to-add test: the vanilla draw times `sign`."""
from immiscible_cli.assigners.rule import Rule
from immiscible_cli.assigners.vanilla import draw_noise, record_unpaired_stats, scale_images


def pair(x0, cfg, generator, stats=None, center=None, shard=None):
    x = scale_images(x0, cfg.image_scale)
    noise = cfg.sign * (draw_noise(x, generator) if shard is None else shard.draw(x, generator)[1])
    if stats is not None:
        record_unpaired_stats(stats, x, noise)
    return x, noise


RULE = Rule(pair)
'''

def check_the_copy(root: Path) -> None:
    """The copy's dummy rule at every seam that knows rules (run on the copy, imported in place of the package)."""
    import torch

    import immiscible_cli as copy
    from immiscible_cli import assigners, config, train_batches
    from immiscible_cli.assigners.shard import Shard
    from immiscible_cli.compare_runs import assigner_label

    assert copy.__file__.startswith(str(root)), copy.__file__
    cfg = config.load_config("quickstart", ["assigner.name=mirror", "assigner.sign=-2"])
    assert tuple(assigners.ASSIGNERS) == config.ASSIGNER_NAMES
    x0 = torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(1))
    _, alone = assigners.pair(x0, cfg.assigner, torch.Generator().manual_seed(7), {})
    assert torch.equal(alone, -2 * torch.randn(8, 1, 4, 4, generator=torch.Generator().manual_seed(7)))
    shares = [assigners.pair(x0[Shard(r, 2, 8).rows], cfg.assigner, torch.Generator().manual_seed(7), {},
                             shard=Shard(r, 2, 8))[1] for r in range(2)]
    assert torch.equal(torch.cat(shares), alone)
    assert not train_batches.ahead_of_step(cfg, 1) and not assigners.needs_center(cfg.assigner)
    assigners.check_available(cfg.assigner)
    assert assigner_label(cfg.model_dump()) == "mirror sign=-2"


@contextmanager
def package_from(root: Path):
    """`immiscible_cli` imported from root/ while the block runs; the real package's modules restored after."""
    saved = {name: module for name, module in sys.modules.items() if name.split(".")[0] == "immiscible_cli"}
    for name in saved:
        del sys.modules[name]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for name in [n for n in sys.modules if n.split(".")[0] == "immiscible_cli"]:
            del sys.modules[name]
        sys.modules.update(saved)


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{path.name}: the documented anchor {old!r} moved"
    path.write_text(text.replace(old, new))


def test_a_new_assigner_is_three_edits(tmp_path: Path) -> None:
    package = tmp_path / "immiscible_cli"
    shutil.copytree(Path(immiscible_cli.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (package / "assets").symlink_to(Path(immiscible_cli.__file__).parent / "assets")
    (tmp_path / "presets").symlink_to(Path(immiscible_cli.__file__).parent.parent / "presets")  # a checkout's
    # 1. config/schema.py: the section model, in ASSIGNER_SECTIONS
    schema = package / "config" / "schema.py"
    edit(schema, "\n\nASSIGNER_SECTIONS:", SECTION + "\nASSIGNER_SECTIONS:")
    edit(schema, '"knn": KNNAssigner}', '"knn": KNNAssigner, "mirror": MirrorAssigner}')
    # 2. assigners/NAME.py: pair (one process and sharded) and its Rule
    (package / "assigners" / "mirror.py").write_text(RULE)
    # 3. assigners/__init__.py: the registry entry
    registry = package / "assigners" / "__init__.py"
    edit(registry, "import knn, linear, vanilla", "import knn, linear, mirror, vanilla")
    edit(registry, '"knn": knn.RULE}', '"knn": knn.RULE, "mirror": mirror.RULE}')
    with package_from(tmp_path):
        check_the_copy(tmp_path)
    assert sys.modules["immiscible_cli"] is immiscible_cli
