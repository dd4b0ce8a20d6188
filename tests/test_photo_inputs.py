"""Photo inputs through the one preprocessing function: EXIF orientation, transparency, 16-bit, CMYK,
palette, gray <-> RGB, channel order of numpy frames, and the centre-crop geometry. Every input is made
by hand here and every expected tensor is computed by hand (with a tolerance only where JPEG is lossy)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageOps
from runtime_support import linear_encoder, make_bundle, weight

from fewshot_edge import glyphs
from fewshot_edge.data import load_image_folders
from fewshot_edge.runtime import FewShotInputError, FewShotModel, Frame, InputSpec, open_bundle, to_pixels, write_bundle
from fewshot_edge.runtime.bundle import EmbeddingSpec
from fewshot_edge.runtime.preprocess import preprocess, source_hash
from fewshot_edge.runtime.pretrained import default_bundle

RGB = InputSpec(3, 8, 8)
GRAY = InputSpec(1, 8, 8)
ORIENTATION = 0x0112


def blocks(h: int = 16, w: int = 8) -> np.ndarray:
    """An asymmetric RGB image (h, w, 3) of flat 8x8 blocks, each its own colour (JPEG keeps flat blocks)."""
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8)
    return np.repeat(np.repeat(colours, 8, axis=0), 8, axis=1)


def chw(hwc: np.ndarray) -> np.ndarray:
    return hwc.transpose(2, 0, 1) if hwc.ndim == 3 else hwc[None]


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(FewShotInputError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message
    return message


# --- EXIF orientation -------------------------------------------------------------------------------

# orientation -> how the stored pixels relate to the upright picture (numpy, by hand): 3 is upside
# down, 6 was taken with the camera turned so the picture must turn 90 degrees clockwise to be seen
# upright (stored = upright turned counter-clockwise), 8 the other way.
STORED = {
    3: lambda a: np.rot90(a, 2),
    6: lambda a: np.rot90(a, 1),
    8: lambda a: np.rot90(a, -1),
}


@pytest.mark.parametrize("orientation", sorted(STORED))
def test_exif_rotated_jpeg_is_turned_upright(tmp_path, orientation):
    upright = blocks(16, 8)
    stored = np.ascontiguousarray(STORED[orientation](upright))
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    path = save(Image.fromarray(stored), tmp_path / "photo.jpg", quality=95, subsampling=0, exif=exif.tobytes())
    spec = InputSpec(3, 16, 8)
    for source in (path, Image.open(path)):  # a file, or the PIL image an app opened (not yet turned)
        pixels = to_pixels(source, spec).astype(int)
        assert pixels.shape == (3, 16, 8)
        assert np.abs(pixels - chw(upright)).max() <= 4


def test_an_image_already_turned_upright_is_not_turned_again(tmp_path):
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path = save(Image.fromarray(np.rot90(blocks(16, 8)).copy()), tmp_path / "p.jpg", quality=95, exif=exif.tobytes())
    turned = ImageOps.exif_transpose(Image.open(path))
    np.testing.assert_array_equal(to_pixels(turned, InputSpec(3, 16, 8)), to_pixels(path, InputSpec(3, 16, 8)))


# --- transparency -----------------------------------------------------------------------------------


def rgba_with_known_alpha() -> np.ndarray:
    """2x2 RGBA: transparent black, transparent red, opaque green, half-transparent blue."""
    return np.array(
        [[[0, 0, 0, 0], [255, 0, 0, 0]], [[0, 255, 0, 255], [0, 0, 255, 128]]],
        dtype=np.uint8,
    )


def over(background: np.ndarray, colour: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """colour over background with alpha in [0, 255], rounded."""
    return np.rint((colour * alpha + background * (255 - alpha)) / 255.0)


def test_transparent_rgba_is_composited_on_the_spec_background(tmp_path):
    rgba = rgba_with_known_alpha()
    path = save(Image.fromarray(rgba), tmp_path / "cutout.png")
    for background in ((255,), (0, 128, 255)):
        spec = InputSpec(3, 2, 2, background=background)
        bg = np.broadcast_to(np.asarray(spec.background, float), (2, 2, 3))
        expected = over(bg, rgba[..., :3].astype(float), rgba[..., 3:].astype(float))
        pixels = to_pixels(path, spec)
        assert np.abs(pixels.astype(int) - chw(expected)).max() <= 1
        # fully transparent pixels are the background, whatever colour they hid; opaque ones are kept
        np.testing.assert_array_equal(pixels[:, 0, 0], spec.background)
        np.testing.assert_array_equal(pixels[:, 0, 1], spec.background)
        np.testing.assert_array_equal(pixels[:, 1, 0], [0, 255, 0])


def test_a_transparent_png_is_not_a_black_square():
    """Before: alpha was dropped, so a cut-out on transparent black came out black. Default: white."""
    cutout = np.zeros((8, 8, 4), np.uint8)
    cutout[2:6, 2:6] = [200, 30, 30, 255]
    pixels = to_pixels(Image.fromarray(cutout), RGB)
    expected = np.full((8, 8, 3), 255, np.uint8)
    expected[2:6, 2:6] = [200, 30, 30]
    np.testing.assert_array_equal(pixels, chw(expected))


def test_la_and_palette_with_transparency(tmp_path):
    la = np.array([[[10, 0], [10, 255]], [[200, 255], [200, 0]]], dtype=np.uint8)
    spec = InputSpec(1, 2, 2, background=(90,))
    np.testing.assert_array_equal(to_pixels(Image.fromarray(la, "LA"), spec), [[[90, 10], [200, 90]]])

    palette = Image.new("P", (2, 2))
    palette.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    palette.putdata([0, 1, 2, 1])
    palette.info["transparency"] = 1  # index 1 (blue) is transparent: a GIF or PNG with tRNS
    for source in (palette, save(palette, tmp_path / "p.png"), save(palette, tmp_path / "p.gif")):
        pixels = to_pixels(source, InputSpec(3, 2, 2, background=(7, 8, 9)))
        np.testing.assert_array_equal(pixels, chw(np.array([[[255, 0, 0], [7, 8, 9]], [[0, 255, 0], [7, 8, 9]]])))


def test_palette_without_transparency_and_rgba_into_gray():
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 0])
    palette.putdata([0, 1])
    np.testing.assert_array_equal(to_pixels(palette, InputSpec(3, 1, 2)), [[[10, 200]], [[20, 100]], [[30, 0]]])
    rgba = np.array([[[255, 255, 255, 0], [0, 0, 0, 255]]], np.uint8)  # transparent white, opaque black
    np.testing.assert_array_equal(to_pixels(Image.fromarray(rgba), InputSpec(1, 1, 2, background=(40,))), [[[40, 0]]])


# --- 16-bit, CMYK, gray <-> RGB ---------------------------------------------------------------------

SIXTEEN = np.array([[0, 257, 32768, 65535], [1000, 40000, 65278, 128]], dtype=np.uint16)
SIXTEEN_AS_8 = np.rint(SIXTEEN / 257.0).astype(np.uint8)  # v * 255 / 65535, rounded: not clipped at 255


def test_16_bit_png_is_scaled_to_8_bits(tmp_path):
    assert SIXTEEN_AS_8.tolist() == [[0, 1, 128, 255], [4, 156, 254, 0]]
    path = save(Image.fromarray(SIXTEEN), tmp_path / "depth.png")
    assert Image.open(path).mode.startswith("I")  # Pillow decodes it as 16-bit ("I;16", or "I" before)
    np.testing.assert_array_equal(to_pixels(path, InputSpec(1, 2, 4)), SIXTEEN_AS_8[None])
    np.testing.assert_array_equal(to_pixels(path, InputSpec(3, 2, 4)), np.stack([SIXTEEN_AS_8] * 3))
    np.testing.assert_array_equal(to_pixels(Image.open(path).convert("I"), InputSpec(1, 2, 4)), SIXTEEN_AS_8[None])


def test_16_bit_arrays_are_scaled_to_8_bits():
    np.testing.assert_array_equal(to_pixels(SIXTEEN, InputSpec(1, 2, 4)), SIXTEEN_AS_8[None])
    colour = np.stack([SIXTEEN, SIXTEEN[::-1], np.full_like(SIXTEEN, 514)], axis=-1)
    expected = np.stack([SIXTEEN_AS_8, SIXTEEN_AS_8[::-1], np.full_like(SIXTEEN_AS_8, 2)])
    np.testing.assert_array_equal(to_pixels(Frame(colour, "RGB"), InputSpec(3, 2, 4)), expected)


def test_cmyk_jpeg_becomes_rgb(tmp_path):
    rng = np.random.default_rng(1)
    cmyk = np.repeat(np.repeat(rng.integers(0, 256, (2, 2, 4), dtype=np.uint8), 8, axis=0), 8, axis=1)
    path = save(Image.fromarray(cmyk, "CMYK"), tmp_path / "print.jpg", quality=95)
    assert Image.open(path).mode == "CMYK"
    c, m, y, k = (cmyk[..., i].astype(float) for i in range(4))
    expected = np.stack([(255 - c) * (255 - k), (255 - m) * (255 - k), (255 - y) * (255 - k)]) / 255.0
    pixels = to_pixels(path, InputSpec(3, 16, 16))
    assert np.abs(pixels - expected).max() <= 4


def test_gray_into_rgb_and_rgb_into_gray(tmp_path):
    gray = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    path = save(Image.fromarray(gray), tmp_path / "gray.png")
    for source in (path, gray, Image.fromarray(gray), Frame(gray, "BGR")):
        np.testing.assert_array_equal(to_pixels(source, RGB), np.stack([gray] * 3))
    rgb = blocks(8, 8)
    luma = (rgb.astype(float) @ [0.299, 0.587, 0.114])[None]  # ITU-R 601-2, as Pillow's "L"
    assert np.abs(to_pixels(Frame(rgb, "RGB"), GRAY) - luma).max() <= 1


# --- numpy frames and their channel order ----------------------------------------------------------


def test_bgr_frame_gives_the_same_tensor_as_the_rgb_frame():
    rgb = blocks(8, 8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])  # what OpenCV's imread / VideoCapture give
    expected = chw(rgb)
    np.testing.assert_array_equal(to_pixels(Frame(rgb, "RGB"), RGB), expected)
    np.testing.assert_array_equal(to_pixels(Frame(bgr, "BGR"), RGB), expected)
    np.testing.assert_array_equal(to_pixels(Image.fromarray(rgb), RGB), expected)
    np.testing.assert_array_equal(preprocess([Frame(bgr, "BGR")], RGB), preprocess([Image.fromarray(rgb)], RGB))
    # the same array read as the wrong order is colour-swapped: the order matters
    np.testing.assert_array_equal(to_pixels(Frame(bgr, "RGB"), RGB), expected[::-1])
    # BGRA (OpenCV's IMREAD_UNCHANGED) keeps its alpha last
    bgra = np.concatenate([bgr, np.zeros((8, 8, 1), np.uint8)], axis=-1)
    np.testing.assert_array_equal(to_pixels(Frame(bgra, "BGR"), RGB), np.full((3, 8, 8), 255))
    bgra[..., 3] = 255
    np.testing.assert_array_equal(to_pixels(Frame(bgra, "BGR"), RGB), expected)
    assert source_hash(Frame(bgr, "BGR")) != source_hash(Frame(bgr, "RGB"))


def test_a_colour_array_without_its_channel_order_is_refused():
    rgb = blocks(8, 8)
    one_line_error(lambda: to_pixels(rgb, RGB), "channel order", "Frame(array, 'BGR')")
    one_line_error(lambda: to_pixels(np.zeros((8, 8, 4), np.uint8), GRAY), "channel order")
    one_line_error(lambda: Frame(rgb, "bgr"), "'RGB' or 'BGR'")
    one_line_error(lambda: Frame(rgb.tolist(), "RGB"), "numpy array")
    one_line_error(lambda: to_pixels(Frame(np.zeros((8, 8, 2), np.uint8), "RGB"), RGB), "(H, W, 3)")
    one_line_error(lambda: to_pixels(Frame(np.full((2, 2, 3), 300, np.int32), "RGB"), RGB), "[0, 255]")
    # gray arrays have no order to get wrong, and still need no Frame
    np.testing.assert_array_equal(to_pixels(np.full((8, 8, 1), 9, np.uint8), GRAY), np.full((1, 8, 8), 9))


def test_the_api_takes_frames_and_a_single_frame_is_one_image(tmp_path):
    spec = InputSpec(3, 4, 4)
    w = weight(0, spec)
    make_bundle(tmp_path / "b", w, spec=spec)
    rgb = np.random.default_rng(2).integers(0, 256, (4, 4, 3), dtype=np.uint8)
    bgr = rgb[..., ::-1]
    with FewShotModel.open(tmp_path / "b") as model:
        by_hand = (chw(rgb).astype(np.float64) / 255.0).reshape(1, -1) @ w.astype(np.float64)
        np.testing.assert_allclose(model.embed(Frame(bgr, "BGR")), by_hand, rtol=1e-5, atol=1e-5)
        model.enroll("thing", [Frame(bgr, "BGR"), Image.fromarray(rgb)])
        assert model.predict(Frame(bgr, "BGR"))[0].label == "thing"
        one_line_error(lambda: model.predict([rgb]), "channel order")
        one_line_error(lambda: model.predict(rgb), "channel order")  # one bare frame: refused, not split into rows
        one_line_error(lambda: model.enroll("more", np.stack([rgb, rgb])), "channel order")


# --- resize geometry ---------------------------------------------------------------------------------


def column_pattern(h: int, w: int) -> np.ndarray:
    """Gray (h, w): column j holds 20 * j."""
    return np.tile(np.arange(w, dtype=np.uint8) * 20, (h, 1))


def test_squash_resizes_the_whole_image_as_before():
    image = column_pattern(8, 12)
    pixels = to_pixels(image, InputSpec(1, 4, 4))  # 12 -> 4 columns: each the mean of 3
    np.testing.assert_array_equal(pixels[0, 0], [20, 80, 140, 200])


def test_center_crop_keeps_the_aspect_ratio_and_cuts_the_middle():
    # landscape 8 x 12 -> shorter side 4: 4 x 6 (box averages pairs of columns: 40 j + 10), centre 4 columns
    landscape = column_pattern(8, 12)
    pixels = to_pixels(landscape, InputSpec(1, 4, 4, crop_mode="center"))
    np.testing.assert_array_equal(pixels[0], np.tile([50, 90, 130, 170], (4, 1)))
    # portrait 12 x 8: 6 x 4 rows, centre rows 1..4 (rows of the transposed pattern)
    pixels = to_pixels(landscape.T, InputSpec(1, 4, 4, crop_mode="center"))
    np.testing.assert_array_equal(pixels[0], np.tile([[50], [90], [130], [170]], (1, 4)))
    # an odd margin rounds like torchvision's CenterCrop: (7 - 4) / 2 = 1.5 -> 2
    pixels = to_pixels(column_pattern(4, 7), InputSpec(1, 4, 4, crop_mode="center"))
    np.testing.assert_array_equal(pixels[0, 0], [40, 60, 80, 100])


def test_crop_pct_resizes_to_size_over_pct_then_crops():
    square = column_pattern(8, 8)
    # 2 / 0.5 = 4: 8 -> 4 columns (40 j + 10), centre 2 of 4 = columns 1 and 2
    for mode in ("center", "squash"):
        pixels = to_pixels(square, InputSpec(1, 2, 2, crop_mode=mode, crop_pct=0.5))
        np.testing.assert_array_equal(pixels[0], [[50, 90], [50, 90]])
    # a non-square target: 2 x 4 of a 12 x 12 image, centre mode: 12 -> 4 (box of 3: 60 j + 20), rows cut
    pixels = to_pixels(column_pattern(12, 12), InputSpec(1, 2, 4, crop_mode="center"))
    np.testing.assert_array_equal(pixels[0], np.tile([20, 80, 140, 200], (2, 1)))


# --- the spec in the manifest ------------------------------------------------------------------------


def test_new_spec_fields_round_trip_through_the_manifest(tmp_path):
    spec = InputSpec(
        3, 4, 4, mean=(0.5,), std=(0.25,), resize="bicubic", crop_mode="center", crop_pct=0.875, background=(0, 0, 0)
    )
    encoder = linear_encoder(weight(0, spec), ("N", 3, 4, 4))
    write_bundle(tmp_path / "b", {"encoder.onnx": encoder}, input_spec=spec, embedding=EmbeddingSpec(3))
    written = json.loads((tmp_path / "b" / "manifest.json").read_text())["input"]
    assert (written["crop_mode"], written["crop_pct"], written["background"]) == ("center", 0.875, [0, 0, 0])
    assert open_bundle(tmp_path / "b").manifest.input_spec == spec
    assert InputSpec.from_dict(spec.to_dict()) == spec


def test_old_manifests_keep_their_meaning():
    """A manifest without the new keys (0.1.0, the shipped bundle) means: the whole image resized, white
    under transparency (nothing there before was transparent on purpose: alpha was dropped)."""
    manifest = json.loads((default_bundle() / "manifest.json").read_text())
    assert not {"crop_mode", "crop_pct", "background"} & set(manifest["input"])
    spec = open_bundle(default_bundle()).manifest.input_spec
    assert spec == InputSpec(1, 28, 28, invert=True)
    assert (spec.crop_mode, spec.crop_pct, spec.background) == ("squash", 1.0, (255,))
    one_line_error(lambda: InputSpec.from_dict({**manifest["input"], "crop_mode": "zoom"}), "crop_mode")


def _pixels_as_in_0_1_0(glyph: np.ndarray) -> np.ndarray:
    """What 0.1.0's preprocessing gave the shipped bundle for an opaque gray image: box resize, invert."""
    return 255 - np.asarray(Image.fromarray(glyph).resize((28, 28), Image.Resampling.BOX))[None]


def test_the_shipped_bundle_sees_opaque_images_as_before_and_transparent_drawings_as_ink(tmp_path):
    glyph = glyphs.draw(5)
    with FewShotModel.open(default_bundle()) as model:
        spec = model.spec
        for source in (glyph, Image.fromarray(glyph), Image.fromarray(glyph).convert("RGB")):
            np.testing.assert_array_equal(to_pixels(source, spec), _pixels_as_in_0_1_0(glyph))
        # ink on a transparent page (a canvas drawing): before, it all came out as one black square
        drawing = np.zeros((*glyph.shape, 4), np.uint8)
        drawing[..., 3] = 255 - glyph
        path = save(Image.fromarray(drawing), tmp_path / "drawing.png")
        np.testing.assert_array_equal(to_pixels(path, spec), _pixels_as_in_0_1_0(glyph))
        np.testing.assert_allclose(model.embed(path), model.embed([glyph]), rtol=1e-6, atol=1e-6)


# --- bad inputs, and training reading through the same code --------------------------------------------


def test_bad_inputs_are_one_line_errors(tmp_path):
    (tmp_path / "cut.jpg").write_bytes(save(Image.fromarray(blocks()), tmp_path / "x.jpg").read_bytes()[:60])
    one_line_error(lambda: to_pixels(tmp_path / "cut.jpg", RGB), "not a readable image")
    one_line_error(lambda: to_pixels(Image.new("LAB", (4, 4)), GRAY), "LAB")
    for bad in (dict(crop_mode="fit"), dict(crop_pct=0.0), dict(crop_pct=1.5), dict(background=(1, 2)),
                dict(background=(256,)), dict(background=(0.5,)), dict(resize="area")):  # fmt: skip
        one_line_error(lambda bad=bad: InputSpec(3, 4, 4, **bad), next(iter(bad)))


def test_training_reads_photos_through_the_same_code(tmp_path, monkeypatch):
    monkeypatch.setenv("FEWSHOT_EDGE_CACHE", str(tmp_path / "cache"))
    folder = tmp_path / "set" / "things"
    folder.mkdir(parents=True)
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    save(Image.fromarray(np.rot90(blocks(16, 8)).copy()), folder / "turned.jpg", quality=95, exif=exif.tobytes())
    save(Image.fromarray(rgba_with_known_alpha()), folder / "cutout.png")
    save(Image.fromarray(SIXTEEN), folder / "depth.png")
    save(Image.fromarray(np.zeros((8, 8, 4), np.uint8), "CMYK"), folder / "print.jpg")
    ds = load_image_folders([tmp_path / "set"], size=8, cache=False)
    files = sorted(folder.iterdir())
    np.testing.assert_array_equal(ds.images, np.stack([to_pixels(f, ds.spec) for f in files]))
    assert (ds.images[files.index(folder / "cutout.png"), :, 0, 0] == 255).all()  # composited, not black


def test_training_and_calibration_images_are_cropped_as_the_spec_says(tmp_path):
    folder = tmp_path / "set" / "wide"
    folder.mkdir(parents=True)
    wide = np.zeros((8, 16, 3), np.uint8)
    wide[:, :4] = 255  # a white band on the left, outside a centre crop
    save(Image.fromarray(wide), folder / "wide.png")
    fit = dict(resize="bicubic", crop_mode="center", crop_pct=0.875)
    ds = load_image_folders([tmp_path / "set"], size=8, cache=False, **fit)
    assert (ds.spec.resize, ds.spec.crop_mode, ds.spec.crop_pct) == ("bicubic", "center", 0.875)
    np.testing.assert_array_equal(ds.images[0], to_pixels(folder / "wide.png", ds.spec))
    squashed = load_image_folders([tmp_path / "set"], size=8, cache=False)
    assert ds.images[0, :, :, 0].max() < 64 and squashed.images[0, :, :, 0].max() > 200
