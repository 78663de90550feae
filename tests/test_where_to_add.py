"""docs/ARCHITECTURE.md's "where to add" lists for an assigner and an objective are complete: a dummy rule added to
a copy of the package by exactly those three edits loads from a config, pairs on one process and on two simulated
ranks, has its properties and its label; a dummy objective added by its three edits loads from a config and works
in editing (the known region re-imposed through its own noising), in analysis (its levels) and in the FID row's
settings; nothing else had to change. The copy is imported in this process in place of the package (torch stays
loaded), then the package's own modules come back."""

from __future__ import annotations

import shutil
import sys
from contextlib import contextmanager
from pathlib import Path

import torch

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

OBJECTIVE_SECTION = '''

class BendObjective(_Section):
    kind: Literal["bend"] = "bend"
    scale: float = 10.0
    """The network sees t times this."""

'''

OBJECTIVE = '''"""A dummy objective for the where-to-add test: x_s = s^2 data + (1 - s^2) noise at level s (1 = clean),
the network predicts the data; one sampler, "bend", that re-noises the prediction at each next level."""
import torch

from immiscible_cli.config import SAMPLERS
from immiscible_cli.objectives.protocol import Coefficients


class Bend:
    samplers = SAMPLERS["bend"]
    editable_samplers = SAMPLERS["bend"]
    batch_dependent_samplers = ()
    sampler_fields = ()

    def __init__(self, cfg):
        self.cfg = cfg

    def sample_t(self, batch, generator, device):
        return torch.rand(batch, generator=generator, device=generator.device).to(device)

    def net_time(self, t):
        return t.to(torch.float32) * self.cfg.scale

    def noised(self, data, noise, level):
        return level ** 2 * data + (1.0 - level ** 2) * noise

    def loss(self, net, data, noise, t, /, labels=None):
        x_t = self.noised(data, noise, t.view(-1, *[1] * (data.ndim - 1)))
        return (net(x_t, self.net_time(t), labels).float() - data.float()).square().flatten(1).mean(dim=1)

    def at_level(self, level):
        s = 1.0 - level
        return Coefficients(s, s ** 2, 1.0 - s ** 2, 1.0, 0.0)

    def times_at_levels(self, levels):
        return (1.0 - levels).to(torch.float32)

    @classmethod
    def sampler_settings(cls, sample, sampler):
        return {}

    def sample(self, net, noise, *, sampler, steps, labels=None, after_step=None, **unused):
        x = noise
        for i in range(steps):
            t = torch.full((x.shape[0],), i / steps, device=x.device)
            x = self.noised(net(x, self.net_time(t), labels).to(x.dtype), noise, (i + 1) / steps)
            if after_step is not None:
                x = after_step(x, (i + 1) / steps)
        return x
'''


class HalfNet(torch.nn.Module):
    """A cheap analytic network: half its input, which it keeps (`inputs`)."""

    def __init__(self) -> None:
        super().__init__()
        self.anchor = torch.nn.Parameter(torch.zeros(()))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x, t, labels=None):
        self.inputs.append(x.clone())
        return 0.5 * x


def check_the_objective(root: Path) -> None:
    """The copy's dummy objective at every seam that knows objectives besides training: its samplers, editing,
    the analysis levels and the FID row's sampling settings."""
    import immiscible_cli as copy
    from immiscible_cli import config, editing, objectives
    from immiscible_cli.analysis.levels import noise_level, times_in_bin
    from immiscible_cli.data import to_model_space
    from immiscible_cli.metrics.scorer import sampling_settings

    assert copy.__file__.startswith(str(root)), copy.__file__
    cfg = config.load_config("quickstart", ["objective.kind=bend", "objective.scale=5", "sample.sampler=bend",
                                            "eval.sampler=bend", "data.resolution=16",
                                            "model.channel_mult=[1, 2]", "model.attn_resolutions=[8]"])
    assert tuple(objectives.OBJECTIVES) == tuple(config.OBJECTIVE_SECTIONS) == ("ddpm", "flow", "bend")
    bend = objectives.build_objective(cfg.objective)
    generator = torch.Generator().manual_seed(0)
    data, noise = torch.rand(4, 1, 2, 2, generator=generator), torch.randn(4, 1, 2, 2, generator=generator)
    t = bend.sample_t(4, generator, "cpu")
    assert torch.allclose(bend.loss(lambda x, t_net, labels: data, data, noise, t), torch.zeros(4))
    # analysis: the level axis is the objective's (level 0.25 is s = 0.75)
    point = noise_level(bend, 0.25)
    assert (point.t, point.signal, point.noise, point.target_data, point.target_noise) == (0.75, 0.5625, 0.4375,
                                                                                            1.0, 0.0)
    times = times_in_bin(bend, 0.2, 0.3, 100, torch.Generator().manual_seed(0))
    assert times.dtype == torch.float32 and 0.7 <= float(times.min()) and float(times.max()) <= 0.8
    # the FID row: every objective's sampler fields null (bend reads none), the start noise's as always
    settings = sampling_settings(cfg, "bend")
    assert settings == {**dict.fromkeys(objectives.SAMPLER_FIELDS), "noise": cfg.sample.noise,
                        "start_std": cfg.sample.start_std, "start": cfg.sample.start}
    assert objectives.SAMPLER_FIELDS == ("eta", "clip_x0", "ddim_grid", "ode_atol", "ode_rtol")
    # editing: the known region is re-imposed at each step's level by the objective's own noising (level 1/3:
    # 1/9 of the image, the seed's second draw after its start noise), is the input's after the last step, the rest
    # generated; seeded
    ramp = torch.arange(16).view(1, 16) + torch.arange(16).view(16, 1)
    known = (ramp * 8).clamp(0, 255).to(torch.uint8).expand(1, 1, 16, 16).clone()  # [1, 1, 16, 16]
    fill = editing.named_mask("center", 16).unsqueeze(0)  # [1, 1, 16, 16]
    edits = editing.inpaint(HalfNet(), cfg, known, fill, [0, 1, 0], sampler="bend", steps=3, batch=2)
    deviation = (edits[0].int() - known.int()).abs()  # [3, 1, 16, 16]
    assert deviation[:, ~fill[0]].max() == 0 and deviation[:, fill[0]].float().mean() > 4
    assert torch.equal(edits[0, 0], edits[0, 2]) and not torch.equal(edits[0, 0], edits[0, 1])
    net = HalfNet()
    editing.inpaint(net, cfg, known, fill, [5], sampler="bend", steps=3, batch=1)
    draws = torch.Generator().manual_seed(5)
    start, second = torch.randn(1, 16, 16, generator=draws), torch.randn(1, 16, 16, generator=draws)
    assert torch.equal(net.inputs[0][0], start)
    expected = (1 / 3) ** 2 * to_model_space(known)[0] + (1 - (1 / 3) ** 2) * second  # [1, 16, 16]
    torch.testing.assert_close(net.inputs[1][0][~fill[0]], expected[~fill[0]], rtol=0, atol=1e-6)


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


def copy_package(tmp_path: Path) -> Path:
    """A copy of the package under tmp_path (its assets and the checkout's presets linked); the copy's folder."""
    package = tmp_path / "immiscible_cli"
    shutil.copytree(Path(immiscible_cli.__file__).parent, package,
                    ignore=shutil.ignore_patterns("__pycache__", "assets"))
    (package / "assets").symlink_to(Path(immiscible_cli.__file__).parent / "assets")
    (tmp_path / "presets").symlink_to(Path(immiscible_cli.__file__).parent.parent / "presets")  # a checkout's
    return package


def test_a_new_assigner_is_three_edits(tmp_path: Path) -> None:
    package = copy_package(tmp_path)
    # 1. config/methods.py: the section model, in ASSIGNER_SECTIONS
    methods = package / "config" / "methods.py"
    edit(methods, "\n\nASSIGNER_SECTIONS:", SECTION + "\nASSIGNER_SECTIONS:")
    edit(methods, '"knn": KNNAssigner}', '"knn": KNNAssigner, "mirror": MirrorAssigner}')
    # 2. assigners/NAME.py: pair (one process and sharded) and its Rule
    (package / "assigners" / "mirror.py").write_text(RULE)
    # 3. assigners/__init__.py: the registry entry
    registry = package / "assigners" / "__init__.py"
    edit(registry, "import knn, linear, vanilla", "import knn, linear, mirror, vanilla")
    edit(registry, '"knn": knn.RULE}', '"knn": knn.RULE, "mirror": mirror.RULE}')
    with package_from(tmp_path):
        check_the_copy(tmp_path)
    assert sys.modules["immiscible_cli"] is immiscible_cli


def test_a_new_objective_is_three_edits(tmp_path: Path) -> None:
    package = copy_package(tmp_path)
    # 1. config/methods.py: the section model in OBJECTIVE_SECTIONS, its samplers in SAMPLERS
    methods = package / "config" / "methods.py"
    edit(methods, "\n\nOBJECTIVE_SECTIONS:", OBJECTIVE_SECTION + "\nOBJECTIVE_SECTIONS:")
    edit(methods, '"flow": FlowObjective}', '"flow": FlowObjective, "bend": BendObjective}')
    edit(methods, '"dopri5")}', '"dopri5"), "bend": ("bend",)}')
    # 2. objectives/NAME.py: the interface of objectives/protocol.py
    (package / "objectives" / "bend.py").write_text(OBJECTIVE)
    # 3. objectives/__init__.py: the registry entry
    registry = package / "objectives" / "__init__.py"
    edit(registry, "from immiscible_cli.objectives.ddpm import DDPM\n",
         "from immiscible_cli.objectives.bend import Bend\nfrom immiscible_cli.objectives.ddpm import DDPM\n")
    edit(registry, '"flow": Flow}', '"flow": Flow, "bend": Bend}')
    with package_from(tmp_path):
        check_the_objective(tmp_path)
    assert sys.modules["immiscible_cli"] is immiscible_cli
