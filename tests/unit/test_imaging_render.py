"""imaging.render: PS3.18 8.3.5 parameters and the grayscale pipeline."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from dicomflow.errors import InvalidRequestError
from dicomflow.imaging.render import RenderOptions, Viewport, apply_window, parse_render_options, render_frame
from tests.factory import make_dataset, to_bytes


def test_parse_render_options() -> None:
    opts = parse_render_options({"window": "40,400,LINEAR", "viewport": "256,128", "quality": "75"}, "image/jpeg")
    assert opts == RenderOptions("image/jpeg", 75, Viewport(256, 128), (40.0, 400.0, "linear"))
    vp = parse_render_options({"viewport": "10,10,1,2,-3,4"}, "image/png").viewport
    assert vp == Viewport(10, 10, 1.0, 2.0, -3.0, 4.0)
    assert parse_render_options({"viewport": "64,64"}, "image/png", thumbnail=True).viewport == Viewport(64, 64)


@pytest.mark.parametrize("query", [
    {"window": "40,400"}, {"window": "a,400,linear"}, {"window": "40,0.5,linear"}, {"window": "40,4,cubic"},
    {"quality": "101"}, {"quality": "7.5"}, {"viewport": "0,10"}, {"viewport": "1,2,3"}, {"viewport": "nan,4"},
    {"annotation": "patient"}, {"unknown": "x"},
])
def test_bad_parameters_are_400(query: dict[str, str]) -> None:
    with pytest.raises(InvalidRequestError):
        parse_render_options(query, "image/jpeg")


def test_thumbnails_take_only_viewport() -> None:
    with pytest.raises(InvalidRequestError):
        parse_render_options({"window": "1,2,linear"}, "image/jpeg", thumbnail=True)


def test_window_functions_follow_ps3_3_c_11_2_1_2() -> None:
    x = np.array([0.0, 49.5, 50.0, 100.0])
    assert apply_window(x, 50, 100, "linear-exact").tolist() == pytest.approx([0.0, 126.225, 127.5, 255.0])
    linear = apply_window(np.array([0.0, 1.0, 99.0, 100.0]), 50, 100, "linear")
    assert linear[0] == 0.0 and linear[-1] == 255.0
    assert apply_window(np.array([50.0]), 50, 100, "sigmoid")[0] == pytest.approx(127.5)


def test_render_uses_the_instance_window_when_none_is_given() -> None:
    ds = make_dataset(rows=4, columns=4)
    ds.PixelData = np.array([[0, 100, 200, 300]] * 4, dtype=np.uint16).tobytes()
    ds.WindowCenter, ds.WindowWidth = 100, 100  # linear: < 50.5 black, >= 149.5 white
    png = render_frame(io.BytesIO(to_bytes(ds)), 1, RenderOptions("image/png"))
    row = np.asarray(Image.open(io.BytesIO(png)))[0]
    assert row[0] == 0 and row[2] == 255 and row[3] == 255 and 100 < row[1] < 160
