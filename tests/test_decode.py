"""The one image decoder (data/decode.py): the same picture stored in every PIL mode decodes to the same
8-bit RGB pixels and gets the same prediction; 16-bit values are scaled, not clipped; transparency is
composited over white; EXIF orientation is applied. Training, eval, predict and analyze read through it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

pytest.importorskip("PIL", reason="needs pillow")
from PIL import Image  # noqa: E402

import hybridvit  # noqa: E402
from hybridvit.checkpoint import make_run_checkpoint  # noqa: E402
from hybridvit.cli import main  # noqa: E402
from hybridvit.data.decode import decode_image, to_rgb  # noqa: E402

SIZE = 32


def _gray_picture() -> np.ndarray:
    """A 32x32 8-bit grayscale picture with structure (a gradient, a bright square, a dark stripe)."""
    y, x = np.mgrid[0:SIZE, 0:SIZE]
    a = (x * 6 + y * 2) % 256
    a[8:16, 8:16] = 240
    a[:, 24:27] = 10
    return a.astype(np.uint8)


def _store_in_every_mode(folder) -> dict[str, str]:
    """The gray picture written in each mode PIL can store it in exactly, by value; mode -> file."""
    g = _gray_picture()
    folder.mkdir(parents=True, exist_ok=True)
    files = {}

    def save(mode: str, img: Image.Image, ext: str) -> None:
        assert img.mode == mode, (mode, img.mode)
        path = folder / f"{mode.replace(';', '_')}.{ext}"
        img.save(path)
        files[mode] = str(path)

    lum = Image.fromarray(g, mode="L")
    save("L", lum, "png")
    save("RGB", lum.convert("RGB"), "png")
    save("I;16", Image.fromarray(g.astype(np.uint16) * 257), "png")  # 16-bit: 128 -> 32896, mid-gray
    save("I", Image.fromarray(g.astype(np.int32) * 257), "tif")  # 16-bit data held in 32-bit integers
    save("F", Image.fromarray(g.astype(np.float32) / 255), "tif")  # floats in 0..1
    save("P", lum.convert("P", palette=Image.Palette.ADAPTIVE, colors=256), "png")
    save("LA", Image.merge("LA", (lum, Image.new("L", lum.size, 255))), "png")
    save("RGBA", lum.convert("RGBA"), "png")
    save("CMYK", lum.convert("RGB").convert("CMYK"), "tif")
    # EXIF orientation 6 (rotate 90 degrees clockwise to view): the stored pixels are turned the other way
    turned = lum.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    path = folder / "exif_rotated.png"
    turned.save(path, exif=exif)
    files["L+EXIF"] = str(path)
    return files


def test_every_mode_decodes_to_the_same_rgb_pixels(tmp_path):
    files = _store_in_every_mode(tmp_path / "modes")
    want = np.repeat(_gray_picture()[:, :, None], 3, axis=2)
    for mode, path in files.items():
        if mode == "P":  # an adaptive palette of 256 grays holds at most 256 of them: exact here
            assert Image.open(path).mode == "P"
        got = np.asarray(decode_image(path))
        assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE, 3), mode
        assert np.abs(got.astype(int) - want).max() <= 1, f"{mode}: {np.abs(got.astype(int) - want).max()}"


def test_16_bit_mid_gray_stays_mid_gray():
    img = Image.fromarray(np.full((4, 4), 32768, dtype=np.uint16))
    assert img.mode == "I;16"
    assert img.convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # what PIL's convert does: clipped
    assert to_rgb(img).getpixel((0, 0)) == (128, 128, 128)
    wide = Image.fromarray(np.array([[-1000, 3000]], dtype=np.int32))  # beyond 16 bits: its own range
    assert [to_rgb(wide).getpixel((i, 0))[0] for i in (0, 1)] == [0, 255]


def test_transparency_is_composited_over_white():
    rgba = Image.new("RGBA", (2, 1), (200, 0, 0, 255))
    rgba.putpixel((1, 0), (200, 0, 0, 0))  # fully transparent red: shown as the white background
    out = to_rgb(rgba)
    assert out.getpixel((0, 0)) == (200, 0, 0) and out.getpixel((1, 0)) == (255, 255, 255)
    half = to_rgb(Image.new("LA", (1, 1), (0, 128)))
    assert abs(half.getpixel((0, 0))[0] - 127) <= 1


def test_every_mode_gets_the_same_prediction(tmp_path, capsys):
    files = _store_in_every_mode(tmp_path / "modes")
    torch.manual_seed(0)
    model = hybridvit.create_model("fastervit_nano", num_classes=4, img_size=SIZE)
    ckpt = tmp_path / "run.pt"
    torch.save(make_run_checkpoint(model_name="fastervit_nano", model_kwargs={"img_size": SIZE}, num_classes=4,
                                   class_names=["a", "b", "c", "d"], pretrained_cfg=model.pretrained_cfg,
                                   state_dict=model.state_dict()), ckpt)
    out = tmp_path / "pred.json"
    assert main(["predict", "--pretrained", str(ckpt), *files.values(), "--topk", "9", "--json", str(out),
                 "--threads", "1", "--no-progress", "--batch-size", "3"]) == 0
    rows = json.loads(out.read_text())
    assert [r["image"] for r in rows] == list(files.values())
    assert {len(r["top"]) for r in rows} == {4}  # --topk 9 capped at the model's 4 classes
    preds = {r["image"]: {t["class"]: t["prob"] for t in r["top"]} for r in rows}
    ref = preds[files["RGB"]]
    for mode, path in files.items():
        assert preds[path].keys() == ref.keys()
        assert max(abs(preds[path][c] - ref[c]) for c in ref) < 2e-3, mode
    # the check can fail: a white image (what clipping makes of the 16-bit one) predicts differently
    white = tmp_path / "white.png"
    Image.new("RGB", (SIZE, SIZE), (255, 255, 255)).save(white)
    assert main(["predict", "--pretrained", str(ckpt), str(white), "--topk", "4", "--json", str(out), "--overwrite",
                 "--threads", "1"]) == 0
    w = {t["class"]: t["prob"] for t in json.loads(out.read_text())[0]["top"]}
    assert max(abs(w[c] - ref[c]) for c in ref) > 2e-3


def test_training_eval_predict_and_analyze_read_through_the_one_decoder():
    import inspect

    from hybridvit import deploy
    from hybridvit.analysis import load as analysis_load
    from hybridvit.data import folder
    from hybridvit.inference import predict

    # the folder dataset (training, eval) and read_image (predict, INT8 calibration) decode; the rest call them
    for module in (folder, analysis_load):
        src = inspect.getsource(module)
        assert "decode_image" in src and ".convert(\"RGB\")" not in src, module.__name__
    for module in (predict, deploy):
        src = inspect.getsource(module)
        assert "read_image" in src and ".convert(\"RGB\")" not in src and "Image.open" not in src, module.__name__
