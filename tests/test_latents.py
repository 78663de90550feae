"""Latent datasets (issue 26, part C) end to end with a tiny random AutoencoderKL (nothing is downloaded): `encode`
(file contents, metadata, kill and resume to the same bytes), `data.source: latents` (two training steps with KNN,
k = 64), `sample` and `eval --fid` decoding through the recorded VAE, and bad input, one line and exit 2 each."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import only_error
from immiscible_cli import config as C
from immiscible_cli import encode as encode_mod
from immiscible_cli import latents, runs, vae as vae_mod
from immiscible_cli.cli import app

pytest.importorskip("diffusers", reason="latents need the examples extra: pip install '.[examples]'")
import safetensors.torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402

runner = CliRunner()
IMAGES = ["--preset", "quickstart", "--set", "data.source=imagefolder", "--set", "data.resolution=16",
          "--set", "data.channels=3", "--set", "data.fit=resize"]
TINY_LATENT_RUN = ["model.channels=8", "model.channel_mult=[1, 2]", "model.num_res_blocks=1",
                   "model.attn_resolutions=[]", "model.head_channels=8", "data.resolution=8", "train.batch_size=4",
                   "train.total_kimg=0.008", "train.tick_kimg=0.004", "train.snapshot_kimg=0.008",
                   "train.warmup_kimg=0.004", "train.ema_halflife_kimg=0.01", "train.device=cpu",
                   "sample.grid_size=4", "sample.steps=2", "eval.every_kimg=0", "eval.steps=2"]


def invoke(*args) -> object:
    return runner.invoke(app, [str(a) for a in args])


def tiny_vae(seed: int = 0) -> AutoencoderKL:
    """16 px RGB images -> 4 latent channels at 8 px (downsampling 2)."""
    torch.manual_seed(seed)
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=4, norm_num_groups=8, sample_size=16,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)


def sets(*fields: str) -> list[str]:
    return [part for field in fields for part in ("--set", field)]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A VAE folder, ten 16 px images in two class folders, their latents (batch 4: chunks of 4, 4, 2) and a run
    trained two steps on them."""
    from PIL import Image

    root = tmp_path_factory.mktemp("latents")
    tiny_vae().save_pretrained(root / "vae")
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / "images" / ("cats" if i < 5 else "dogs")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    encoded = invoke("encode", "--vae", root / "vae", *IMAGES, "--set", f"data.root={root / 'images'}",
                     "--out", root / "latents.safetensors", "--batch", 4, "--device", "cpu")
    assert encoded.exit_code == 0, encoded.output
    trained = invoke("train", "--preset", "latents-knn", *sets(f"data.root={root / 'latents.safetensors'}",
                                                                *TINY_LATENT_RUN), "--out", root / "runs")
    assert trained.exit_code == 0, trained.output
    return {"root": root, "vae": root / "vae", "file": root / "latents.safetensors", "images": root / "images",
            "run": next((root / "runs").iterdir())}


def test_encode_writes_scaled_posterior_means_labels_and_the_vaes_identity(world):
    from immiscible_cli.data import load_images, to_model_space

    tensors = safetensors.torch.load_file(world["file"])
    assert tensors["latents"].shape == (10, 4, 8, 8) and tensors["latents"].dtype == torch.float32
    assert tensors["labels"].tolist() == [0] * 5 + [1] * 5
    vae = AutoencoderKL.from_pretrained(world["vae"], local_files_only=True)
    data = C.load_config("quickstart", [item for item in IMAGES[3::2]] + [f"data.root={world['images']}"]).data
    pixels = to_model_space(load_images(data).images)
    with torch.no_grad():  # the same calls (chunks of 4) give the same bits
        expected = torch.cat([vae.encode(part).latent_dist.mean for part in pixels.split(4)]) * 0.18215
    assert torch.equal(tensors["latents"], expected)
    header = latents.read_header(world["file"])
    assert header.vae.config_sha256 == vae_mod.sha256_file(world["vae"] / "config.json")
    assert (header.vae.scaling_factor, header.vae.shift_factor, header.vae.latent_channels,
            header.vae.downsampling, header.vae.path) == (0.18215, None, 4, 2, str(world["vae"].resolve()))
    assert (header.images, header.shape, header.num_classes, header.precision) == (10, (4, 8, 8), 2, "fp32")
    assert header.source["data"]["source"] == "imagefolder" and header.source["preset"] == "quickstart"
    with open(world["file"], "rb") as f:  # string metadata: format and version, readable without immiscible
        meta = json.loads(f.read(int.from_bytes(f.read(8), "little")))["__metadata__"]
    assert (meta["format"], meta["format_version"], meta["encoding"]) == ("immiscible-latents", "1", "mean")


def test_a_killed_encode_resumes_to_the_same_bytes(world, monkeypatch):
    out = world["root"] / "resumed.safetensors"
    args = ["encode", "--vae", world["vae"], *IMAGES, "--set", f"data.root={world['images']}", "--out", out,
            "--batch", 4, "--device", "cpu"]
    calls, real = [], vae_mod.Vae.encode

    class Killed(Exception):
        pass

    def killed_at_the_second_chunk(self, images):
        calls.append(len(images))
        if len(calls) == 2:
            raise Killed  # the process dies between two chunk files
        return real(self, images)

    monkeypatch.setattr(vae_mod.Vae, "encode", killed_at_the_second_chunk)
    assert isinstance(invoke(*args).exception, Killed)
    partial = encode_mod.partial_dir(out)
    assert not out.exists() and json.loads((partial / "progress.json").read_text())["done"] == [0]
    monkeypatch.setattr(vae_mod.Vae, "encode", lambda self, images: calls.append(len(images)) or real(self, images))
    resumed = invoke(*args)
    assert resumed.exit_code == 0, resumed.output
    assert calls == [4, 4, 4, 2]  # chunk 0 was not encoded again
    assert out.read_bytes() == world["file"].read_bytes() and not partial.exists()
    assert only_error(invoke(*args)).startswith(f"error: --out {out}: exists; add --force")  # kept as it was
    assert out.read_bytes() == world["file"].read_bytes()
    other = invoke(*args[:-4], "--batch", 3, "--precision", "fp16", "--force", "--device", "cpu")
    assert other.exit_code == 0, other.output
    assert safetensors.torch.load_file(out)["latents"].dtype == torch.float16


def test_two_steps_on_latents_record_the_vae_and_decode_grids_and_samples(world):
    from PIL import Image

    run = world["run"]
    cfg = C.load_run_config(run / "config.yaml")
    assert (cfg.data.source, cfg.assigner.name, cfg.assigner.k, cfg.data.hflip) == ("latents", "knn", 64, False)
    record = json.loads((run / "meta.json").read_text())["latents"]
    assert record["vae"]["weights_sha256"] == latents.read_header(world["file"]).vae.weights_sha256
    assert record["file"] == str(world["file"].resolve()) and record["source"]["data"]["resolution"] == 16
    grid = Image.open(next((run / "samples").glob("grid-*.png")))
    assert (grid.size, grid.mode) == ((32, 32), "RGB")  # four decoded 16 px images
    for batch in (1, 3):
        result = invoke("sample", run, "--num", 3, "--batch", batch, "--out", world["root"] / f"s{batch}",
                        "--device", "cpu")
        assert result.exit_code == 0, result.output
    for name in ("seed000000.png", "seed000002.png"):
        one, three = (np.asarray(Image.open(world["root"] / f"s{b}" / name)).astype(int) for b in (1, 3))
        assert one.shape == (16, 16, 3) and np.abs(one - three).max() <= 1  # image i from seed i (a rounding flip)


def test_decoding_clips_to_the_image_range(world):
    decoder = vae_mod.load(None, world["vae"], "test", "--vae DIR", torch.device("cpu"))
    images = decoder.decode(torch.randn(3, 4, 8, 8) * 1000)
    assert images.shape == (3, 3, 16, 16) and images.min() == -1 and images.max() == 1


def test_eval_scores_the_decoded_images_and_records_the_decoder(world, stub_fid, tmp_path):
    run = shutil.copytree(world["run"], tmp_path / "run")
    result = invoke("eval", run, "--fid", "--num-images", 4, "--batch", 2, "--device", "cpu")
    assert result.exit_code == 0, result.output
    row = json.loads((run / "fid.jsonl").read_text().splitlines()[-1])
    header = latents.read_header(world["file"])
    assert row["decoder"] == header.vae.setting() and row["decoder_path"] == header.vae.path
    assert row["reference"]["name"] == "imagefolder-images" and row["reference"]["resolution"] == 16
    assert row["reference"]["num_images"] == 10  # the images the latents were encoded from
    assert runs.fid_settings(row)["decoder"] == header.vae.setting()  # a setting of latent rows only:
    assert "decoder" not in runs.fid_settings({**row, "decoder": None})  # pixel rows compare as before
    again = invoke("eval", run, "--fid", "--num-images", 4, "--batch", 2, "--device", "cpu")
    assert "1 already scored with these settings, 0 to score" in again.output
    assert len((run / "fid.jsonl").read_text().splitlines()) == 1


def test_a_missing_or_other_vae_exits_2_before_anything_is_written(world, tmp_path):
    run = shutil.copytree(world["run"], tmp_path / "run")
    fid_before = (run / "fid.jsonl").read_bytes() if (run / "fid.jsonl").exists() else None
    line = only_error(invoke("sample", run, "--num", 1, "--out", tmp_path / "s", "--vae", tmp_path / "nowhere"))
    assert f"VAE folder {tmp_path / 'nowhere'} (--vae): no such folder" in line
    meta = json.loads((run / "meta.json").read_text())
    meta["latents"]["vae"]["path"] = str(tmp_path / "moved")
    (run / "meta.json").write_text(json.dumps(meta))
    line = only_error(invoke("eval", run, "--fid", "--num-images", 2, "--device", "cpu"))
    assert f"VAE folder {tmp_path / 'moved'} (recorded in {run / 'meta.json'}): no such folder" in line
    other = tmp_path / "other-config"
    shutil.copytree(world["vae"], other)
    (other / "config.json").write_text((other / "config.json").read_text().replace("0.18215", "0.2"))
    assert "its config.json (sha256" in only_error(invoke("sample", run, "--num", 1, "--out", tmp_path / "s",
                                                          "--vae", other))
    retrained = tmp_path / "other-weights"
    tiny_vae(seed=1).save_pretrained(retrained)
    assert "its weights (sha256" in only_error(invoke("sample", world["run"], "--num", 1, "--out", tmp_path / "s",
                                                      "--vae", retrained))
    line = only_error(invoke("train", "--preset", "latents-knn", *sets(f"data.root={world['file']}",
                             f"data.vae={retrained}", *TINY_LATENT_RUN), "--out", tmp_path / "runs"))
    assert "(data.vae): its weights" in line and "--set data.vae=DIR" in line
    assert not (tmp_path / "s").exists() and not (tmp_path / "runs").exists()
    assert ((run / "fid.jsonl").read_bytes() if (run / "fid.jsonl").exists() else None) == fid_before


@pytest.mark.parametrize("field, needle", [
    ("data.resolution=16", "data.resolution: 16, but"),
    ("data.channels=3", "data.channels: 3, but"),
    ("data.hflip=true", "data.hflip: flipping a latent"),
    ("sample.clip_x0=true", "sample.clip_x0: latents are not bounded"),
])
def test_latents_that_do_not_fit_the_model_exit_2(world, tmp_path, field, needle):
    line = only_error(invoke("train", "--preset", "latents-knn", *sets(f"data.root={world['file']}",
                             *TINY_LATENT_RUN, field), "--out", tmp_path / "runs"))
    assert needle in line and not (tmp_path / "runs").exists()


def test_files_that_are_not_latents_exit_2(world, tmp_path):
    (tmp_path / "noise.safetensors").write_bytes(np.random.default_rng(0).bytes(4096))
    safetensors.torch.save_file({"images": torch.zeros(2, 3)}, tmp_path / "other.safetensors")
    for name, needle in (("noise.safetensors", "not a safetensors file"), ("missing.safetensors", "no such file"),
                         ("other.safetensors", "a safetensors file, but not of immiscible latents")):
        line = only_error(invoke("train", "--preset", "latents-knn", *sets(f"data.root={tmp_path / name}",
                                 *TINY_LATENT_RUN), "--out", tmp_path / "runs"))
        assert f"data.root {tmp_path / name}: {needle}" in line and "immiscible encode" in line
    assert not (tmp_path / "runs").exists()


def test_encode_refuses_bad_input_in_one_line(world, tmp_path):
    base = ["encode", "--vae", world["vae"], *IMAGES, "--set", f"data.root={world['images']}", "--device", "cpu"]
    assert "no such folder" in only_error(invoke(*base[:2], tmp_path / "none", *base[3:], "--out", tmp_path / "a"))
    assert "not divisible by the VAE's downsampling factor 2" in only_error(
        invoke(*base, "--set", "data.resolution=15", "--set", "model.channel_mult=[1]", "--out", tmp_path / "a"))
    assert "--precision bf16" in only_error(invoke(*base, "--precision", "bf16", "--out", tmp_path / "a"))
    assert not list(tmp_path.glob("a*"))


def test_grey_images_are_repeated_for_an_rgb_vae(world, tmp_path):
    out = tmp_path / "grey.safetensors"
    result = invoke("encode", "--vae", world["vae"], "--preset", "quickstart", "--set", "data.max_images=3",
                    "--set", "data.resolution=16", "--set", "data.fit=resize", "--out", out, "--device", "cpu")
    assert result.exit_code == 0, result.output
    header = latents.read_header(out)
    assert header.source["data"]["channels"] == 3 and header.shape == (4, 8, 8) and header.num_classes == 10


def test_without_diffusers_latents_say_which_extra_to_install(world, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now fails
    line = only_error(invoke("train", "--preset", "latents-knn", *sets(f"data.root={world['file']}",
                             *TINY_LATENT_RUN), "--out", tmp_path / "runs"))
    assert "pip install 'immiscible[examples]'" in line and not (tmp_path / "runs").exists()


def test_image_configs_keep_their_rules():
    with pytest.raises(C.ConfigError, match="data.channels: 4; images have 1"):
        C.load_config("quickstart", ["data.channels=4"])
    with pytest.raises(C.ConfigError, match="data.vae: a VAE decodes latents"):
        C.load_config("quickstart", ["data.vae=/somewhere"])


def test_image_commands_import_neither_diffusers_nor_safetensors():
    code = ("import sys; import immiscible_cli.cli, immiscible_cli.trainer, immiscible_cli.evaluate, "
            "immiscible_cli.sampling, immiscible_cli.encode, immiscible_cli.latents; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('diffusers', 'safetensors')))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
