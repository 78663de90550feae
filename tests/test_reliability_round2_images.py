"""Images given to `sample --inpaint` (issue 25, item 5): a decompression bomb is refused from its header, a mask
must be black and white with some white, and 16-bit images are scaled to 8 bits, not clipped to white."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import pytest
from conftest import TINY
from PIL import Image

from immiscible_cli import editing
from immiscible_cli.config import load_config
from immiscible_cli.editing import EditError, load_inputs, read_image

DATA = load_config("quickstart", TINY).data  # grey, 16 px


def bomb(path, width=20000, height=20000):
    """A PNG of a few bytes whose header declares width x height pixels."""
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(path)
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = struct.pack(">II", width, height)
    data[ihdr + 17:ihdr + 21] = struct.pack(">I", zlib.crc32(bytes(data[ihdr:ihdr + 17])))
    path.write_bytes(bytes(data))
    return path


def test_a_decompression_bomb_is_refused_before_decoding(tmp_path):
    path = bomb(tmp_path / "bomb.png")
    assert path.stat().st_size < 200
    with pytest.raises(EditError, match=r"--image .*bomb.png: its header declares over 67,108,864 pixels; give an"):
        read_image(path, "--image")  # past PIL's own bomb check
    just = bomb(tmp_path / "just.png", 9000, 9000)  # past ours only
    with pytest.raises(EditError, match=r"--image .*just.png: 9000x9000 px, over 67,108,864; give an image"):
        read_image(just, "--image")
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(photo)
    with pytest.raises(EditError, match="--mask .*bomb.png: its header declares"):
        load_inputs(photo, str(path), DATA)


def test_masks_must_be_black_and_white_with_some_white(tmp_path):
    photo = tmp_path / "photo.png"
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(photo)
    colour = np.zeros((16, 16, 3), np.uint8)
    colour[:8, :8, 0] = 255  # red: neither black nor white
    Image.fromarray(colour).save(tmp_path / "rgb.png")
    Image.fromarray(np.zeros((16, 16), np.uint8)).save(tmp_path / "black.png")
    grey_rgb = np.zeros((16, 16, 3), np.uint8)
    grey_rgb[:4, :4] = 255  # white in every channel: a black-and-white mask saved as RGB is fine
    Image.fromarray(grey_rgb).save(tmp_path / "bw-rgb.png")
    with pytest.raises(EditError, match="--mask is empty"):
        load_inputs(photo, "", DATA)
    with pytest.raises(EditError, match="a colour image; a mask is black and white"):
        load_inputs(photo, str(tmp_path / "rgb.png"), DATA)
    with pytest.raises(EditError, match="all black, so nothing would be generated"):
        load_inputs(photo, str(tmp_path / "black.png"), DATA)
    _, _, fill = load_inputs(photo, str(tmp_path / "bw-rgb.png"), DATA)
    assert int(fill.sum()) == 16


def test_16_bit_images_are_scaled_not_clipped(tmp_path):
    wide = np.array([[0, 257, 40000, 65535]], np.uint16).repeat(4, 0)
    path = tmp_path / "deep.png"
    Image.fromarray(wide).save(path)
    assert Image.open(path).mode.startswith("I")
    got = read_image(path, "--image")[0, 0, 0].tolist()
    assert got == [0, 1, 156, 255]
    eight = tmp_path / "eight.png"
    Image.fromarray(np.array([[0, 7, 200, 255]], np.uint8)).save(eight)
    assert read_image(eight, "--image")[0, 0, 0].tolist() == [0, 7, 200, 255]


def test_the_pixel_bound_is_far_above_any_resolution():
    assert editing.MAX_PIXELS >= 1024 * 1024 * 16
