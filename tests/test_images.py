"""client.data.images: real chest DICOMs, synthetic DICOMs with hand-computed values, bad files, PNG/JPEG."""
import io
import logging
import math

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from client.data.errors import Rejected
from client.data.images import read_header, read_image

# Values chosen around a window of centre 100, width 50: LINEAR maps (75, 124] linearly onto (0, 1].
WINDOW_PROBE = np.array([[50, 75, 100, 124, 200]], dtype=np.uint16)


def write_dicom(path, stored, syntax=None, fragments=None, **elements):
    """A minimal DX dataset holding `stored`; `syntax` compresses it, or labels the given `fragments`."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape[:2]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = stored.dtype.itemsize * 8
    ds.PixelRepresentation = int(stored.dtype.kind == "i")
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.HighBit = ds.BitsStored - 1
    if fragments is not None:
        ds.PixelData = encapsulate(fragments)
        ds.file_meta.TransferSyntaxUID = syntax
    else:
        ds.PixelData = np.ascontiguousarray(stored).tobytes()
        if syntax is not None:
            ds.compress(syntax)
    ds.save_as(path, enforce_file_format=True)
    return path


def gradient(bits=12, shape=(64, 64)):
    """A smooth, non-constant test image using the full range of `bits`."""
    rows, cols = np.indices(shape)
    return ((rows * 31 + cols * 17) % (1 << bits)).astype(np.uint16)


def _refuse_to_decode(ds):
    raise AssertionError("pixel data was decoded")


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if anything asks pydicom for pixels."""
    monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(_refuse_to_decode))


def regions(pixels):
    """Mean of both lungs, the mediastinum and the two top corners on a frontal chest image."""
    h, w = pixels.shape
    band = slice(int(h * 0.3), int(h * 0.6))
    lungs = np.concatenate([pixels[band, int(w * 0.2):int(w * 0.35)].ravel(),
                            pixels[band, int(w * 0.65):int(w * 0.8)].ravel()]).mean()
    mediastinum = pixels[band, int(w * 0.45):int(w * 0.55)].mean()
    corners = np.concatenate([pixels[:h // 10, :w // 10].ravel(), pixels[:h // 10, -w // 10:].ravel()]).mean()
    return lungs, mediastinum, corners


# ------------------------------------------------------------------------------------------ real files


@pytest.mark.parametrize("name, shape, bits", [
    ("cr-chest-mono1-10bit-nometa.dcm", (440, 440), 10),
    ("dx-chest-mono1-j2k-lossless.dcm", (2128, 2000), 12),
])
def test_monochrome1_chests_come_out_air_dark(shared_dicom_dir, name, shape, bits):
    image = read_image(shared_dicom_dir / name)
    assert image.pixels.dtype == np.float32 and image.pixels.shape == shape
    assert 0.0 <= image.pixels.min() and image.pixels.max() <= 1.0
    assert (image.photometric, image.view_position, image.bits_stored, image.source) == \
        ("MONOCHROME1", "PA", bits, "dicom")
    lungs, mediastinum, corners = regions(image.pixels)
    # Inverted once: aerated lung and the air-filled corners are darker than the mediastinum.
    assert lungs < mediastinum - 0.15
    assert corners < mediastinum - 0.15


def test_headerless_cr_is_read_as_implicit_little_endian(shared_dicom_dir):
    path = shared_dicom_dir / "cr-chest-mono1-10bit-nometa.dcm"
    image = read_image(path)
    header = read_header(path)
    assert (header.rows, header.columns, header.photometric) == (440, 440, "MONOCHROME1")
    # Its window 550/1024 is linear over all stored values, so after the single inversion the
    # output falls as the stored value rises.
    ds = pydicom.dcmread(path, force=True)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    stored = ds.pixel_array.astype(np.float64)
    assert np.corrcoef(stored.ravel(), image.pixels.ravel())[0, 1] < -0.99


def test_broken_j2k_is_rejected_as_undecodable(shared_dicom_dir):
    path = shared_dicom_dir / "dx-chest-mono1-j2k-broken.dcm"
    with pytest.raises(Rejected) as caught:
        read_image(path)
    assert caught.value.code == "undecodable_pixels"
    assert str(path) in caught.value.detail


def test_16bit_mono2_j2k_reads_with_its_off_range_window_ignored(shared_dicom_dir, caplog):
    path = shared_dicom_dir / "dx-chest-mono2-j2k-16bit.dcm"
    with caplog.at_level(logging.WARNING, logger="client.data.images"):
        image = read_image(path)
    assert image.pixels.shape == (1416, 1420)
    assert (image.photometric, image.bits_stored, image.pixel_spacing, image.view_position) == \
        ("MONOCHROME2", 16, (0.4, 0.4), None)
    # Its window (2725/5310) lies below every stored value (>= 32744): applied, it would give a blank
    # image, so the min-max stretch is used and said so.
    assert image.pixels.min() == 0.0 and image.pixels.max() == 1.0
    assert image.pixels.std() > 0.05
    assert "window 2725/5310" in caplog.text


# ------------------------------------------------------------------------- synthetic: value pipeline


@pytest.mark.parametrize("function, expected", [
    ("LINEAR", [0.0, 0.0, 25 / 49, 1.0, 1.0]),                       # (x - 75) / 49, clipped
    ("LINEAR_EXACT", [0.0, 0.0, 0.5, 0.98, 1.0]),                    # (x - 100) / 50 + 0.5, clipped
    ("SIGMOID", [1 / (1 + math.exp(4)), 1 / (1 + math.exp(2)), 0.5,  # 1 / (1 + exp(-4 (x - 100) / 50))
                 1 / (1 + math.exp(-1.92)), 1 / (1 + math.exp(-8))]),
])
def test_window_centre_and_width(tmp_path, function, expected):
    path = write_dicom(tmp_path / "w.dcm", WINDOW_PROBE, WindowCenter=100, WindowWidth=50,
                       VOILUTFunction=function)
    np.testing.assert_allclose(read_image(path).pixels[0], expected, atol=1e-6)


def test_first_of_several_windows_is_used(tmp_path):
    path = write_dicom(tmp_path / "w.dcm", WINDOW_PROBE, WindowCenter=[100, 3000], WindowWidth=[50, 10])
    np.testing.assert_allclose(read_image(path).pixels[0], [0.0, 0.0, 25 / 49, 1.0, 1.0], atol=1e-6)


def test_rescale_applies_before_the_window(tmp_path):
    stored = np.array([[400, 450, 500, 550, 600]], dtype=np.uint16)
    # modality = 2 x - 1000 -> -200, -100, 0, 100, 200; window 0.5/401 maps [-200, 200] onto [0, 1]
    path = write_dicom(tmp_path / "r.dcm", stored, RescaleSlope=2, RescaleIntercept=-1000,
                       WindowCenter=0.5, WindowWidth=401)
    np.testing.assert_allclose(read_image(path).pixels[0], [0.0, 0.25, 0.5, 0.75, 1.0], atol=1e-6)


def test_negative_rescale_slope_reverses_the_stretch(tmp_path):
    stored = np.array([[10, 12, 15, 20]], dtype=np.uint16)
    path = write_dicom(tmp_path / "r.dcm", stored, RescaleSlope=-1, RescaleIntercept=0)
    np.testing.assert_allclose(read_image(path).pixels[0], [1.0, 0.8, 0.5, 0.0], atol=1e-6)


def test_voi_lut_sequence_wins_over_window(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4, 10, 16]     # 4 entries, first maps stored value 10
    lut.add_new("LUTData", "US", [0, 100, 400, 1000])
    stored = np.array([[9, 10, 11, 12, 13, 20]], dtype=np.uint16)
    path = write_dicom(tmp_path / "v.dcm", stored, VOILUTSequence=[lut], WindowCenter=5, WindowWidth=2)
    np.testing.assert_allclose(read_image(path).pixels[0], [0.0, 0.0, 0.1, 0.4, 1.0, 1.0], atol=1e-6)


def test_modality_lut_sequence(tmp_path):
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.add_new("LUTData", "OW", np.array([0, 10, 20, 1000], "<u2").tobytes())
    lut.ModalityLUTType = "US"
    stored = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    path = write_dicom(tmp_path / "m.dcm", stored, ModalityLUTSequence=[lut])
    np.testing.assert_allclose(read_image(path).pixels[0], [0.0, 0.01, 0.02, 1.0], atol=1e-6)


def test_monochrome1_is_inverted_exactly_once(tmp_path):
    stored = gradient()
    window = dict(WindowCenter=1500, WindowWidth=2000)
    mono2 = read_image(write_dicom(tmp_path / "2.dcm", stored, BitsStored=12, **window)).pixels
    mono1 = read_image(write_dicom(tmp_path / "1.dcm", stored, BitsStored=12, PhotometricInterpretation="MONOCHROME1",
                                   **window)).pixels
    inverse = read_image(write_dicom(tmp_path / "1i.dcm", stored, BitsStored=12,
                                     PhotometricInterpretation="MONOCHROME1", PresentationLUTShape="INVERSE",
                                     **window)).pixels
    assert mono2.std() > 0.1
    np.testing.assert_allclose(mono1, 1.0 - mono2, atol=1e-6)
    np.testing.assert_array_equal(inverse, mono1)


def test_bits_above_bits_stored_are_ignored(tmp_path):
    clean = gradient(12)
    expected = read_image(write_dicom(tmp_path / "clean.dcm", clean, BitsStored=12)).pixels
    junk = clean | np.uint16(0xA000)
    np.testing.assert_array_equal(read_image(write_dicom(tmp_path / "junk.dcm", junk, BitsStored=12)).pixels,
                                  expected)


def test_signed_values_are_sign_extended_from_bits_stored(tmp_path):
    signed = np.array([[-100, -1, 0, 1, 100]], dtype=np.int16)
    expected = read_image(write_dicom(tmp_path / "full.dcm", signed, BitsStored=12)).pixels
    # The same 12-bit two's complement values with the upper four bits left zero by the writer.
    unextended = (signed.view(np.uint16) & 0x0FFF).view(np.int16)
    got = read_image(write_dicom(tmp_path / "cut.dcm", unextended, BitsStored=12)).pixels
    np.testing.assert_array_equal(got, expected)
    np.testing.assert_allclose(expected[0], [0.0, 99 / 200, 0.5, 101 / 200, 1.0], atol=1e-6)


@pytest.mark.parametrize("syntax", [RLELossless, JPEGLSLossless, JPEG2000Lossless], ids=lambda s: s.name)
def test_lossless_syntaxes_decode_to_the_native_pixels(tmp_path, syntax):
    stored = gradient(12)
    native = read_image(write_dicom(tmp_path / "native.dcm", stored, BitsStored=12)).pixels
    path = write_dicom(tmp_path / "packed.dcm", stored, syntax=syntax, BitsStored=12)
    assert pydicom.dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == syntax
    np.testing.assert_array_equal(read_image(path).pixels, native)


def test_baseline_jpeg_dicom(tmp_path):
    stored = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    encoded = io.BytesIO()
    Image.fromarray(stored).save(encoded, format="JPEG", quality=95)
    path = write_dicom(tmp_path / "jpeg.dcm", stored, syntax=JPEGBaseline8Bit, fragments=[encoded.getvalue()])
    pixels = read_image(path).pixels
    np.testing.assert_allclose(pixels, stored / 255.0, atol=0.03)  # lossy


@pytest.mark.filterwarnings("ignore:Invalid value for VR CS")  # the lower case is the point
def test_metadata(tmp_path):
    path = write_dicom(tmp_path / "m.dcm", gradient(), ViewPosition=" ap ", ImagerPixelSpacing=[0.2, 0.25])
    image = read_image(path)
    assert (image.view_position, image.pixel_spacing, image.bits_stored) == ("AP", (0.2, 0.25), 16)
    path = write_dicom(tmp_path / "n.dcm", gradient(), PixelSpacing=[0.1, 0.1], ImagerPixelSpacing=[0.2, 0.2])
    image = read_image(path)
    assert (image.view_position, image.pixel_spacing) == (None, (0.1, 0.1))


def test_read_header_does_not_decode(tmp_path, no_decoding):
    path = write_dicom(tmp_path / "h.dcm", gradient(shape=(48, 64)), ViewPosition="PA", PixelSpacing=[0.5, 0.5])
    header = read_header(path)
    assert (header.rows, header.columns, header.view_position, header.pixel_spacing) == (48, 64, "PA", (0.5, 0.5))
    with pytest.raises(Rejected) as caught:
        read_header(path, max_pixels=48 * 64 - 1)
    assert caught.value.code == "too_large"


# ------------------------------------------------------------------------------------------ rejections


def _multiframe(path):
    return write_dicom(path, np.zeros((128, 64), np.uint16), Rows=64, Columns=64, NumberOfFrames=2)


def _huge_claim(path):
    return write_dicom(path, np.zeros((1, 1), np.uint16), syntax=JPEG2000Lossless, fragments=[b"\xff" * 64],
                       Rows=20000, Columns=20000)


def _no_pixels(path):
    write_dicom(path, gradient())
    ds = pydicom.dcmread(path)
    del ds.PixelData
    ds.save_as(path)
    return path


def _truncated_native(path):
    write_dicom(path, gradient())
    data = path.read_bytes()
    path.write_bytes(data[: len(data) * 2 // 3])
    return path


def _truncated_j2k(path):
    write_dicom(path, gradient(12), syntax=JPEG2000Lossless, BitsStored=12)
    data = path.read_bytes()
    path.write_bytes(data[:-300])
    return path


def _random_bytes(path):
    path.write_bytes(b"\x01" + np.random.default_rng(0).bytes(4095))
    return path


def _empty(path):
    path.write_bytes(b"")
    return path


def _colour(path):
    return write_dicom(path, np.zeros((8, 8, 3), np.uint8), SamplesPerPixel=3, PhotometricInterpretation="RGB",
                       PlanarConfiguration=0)


def _constant(path):
    return write_dicom(path, np.full((8, 8), 7, np.uint16))


@pytest.mark.parametrize("make, code", [
    pytest.param(_multiframe, "unsupported_multiframe", id="multiframe"),
    pytest.param(_huge_claim, "too_large", id="20000x20000"),
    pytest.param(_no_pixels, "not_an_image", id="no-pixel-data"),
    pytest.param(_truncated_native, "truncated_file", id="truncated-native"),
    pytest.param(_truncated_j2k, "truncated_file", id="truncated-j2k"),
    pytest.param(_random_bytes, "not_dicom", id="random-bytes"),
    pytest.param(_empty, "empty_file", id="zero-bytes"),
    pytest.param(_colour, "unsupported_photometric", id="rgb"),
    pytest.param(_constant, "blank_image", id="constant"),
    pytest.param(lambda path: path, "file_not_found", id="missing"),
])
def test_bad_files_are_rejected_with_their_reason(tmp_path, monkeypatch, make, code):
    path = make(tmp_path / "bad.dcm")
    if code != "blank_image":  # everything else is refused from the header, before any decoding
        monkeypatch.setattr(pydicom.dataset.Dataset, "pixel_array", property(_refuse_to_decode))
    with pytest.raises(Rejected) as caught:
        read_image(path)
    assert caught.value.code == code
    assert str(path) in caught.value.detail


def test_pixel_limit_is_configurable(tmp_path):
    path = write_dicom(tmp_path / "small.dcm", gradient(shape=(32, 32)))
    assert read_image(path, max_pixels=32 * 32).pixels.shape == (32, 32)
    with pytest.raises(Rejected) as caught:
        read_image(path, max_pixels=32 * 32 - 1)
    assert caught.value.code == "too_large"


# ------------------------------------------------------------------------------------------ PNG / JPEG


def test_png_8_and_16_bit(tmp_path):
    Image.fromarray(np.array([[0, 51, 255]], np.uint8)).save(tmp_path / "8.png")
    Image.fromarray(np.array([[0, 13107, 65535]], np.uint16)).save(tmp_path / "16.png")
    for name, bits in (("8.png", 8), ("16.png", 16)):
        image = read_image(tmp_path / name)
        assert image.pixels.dtype == np.float32
        np.testing.assert_allclose(image.pixels[0], [0.0, 0.2, 1.0], atol=1e-6)
        assert (image.source, image.photometric, image.bits_stored, image.view_position) == ("png", "GRAY", bits, None)


def test_rgb_png_becomes_luma(tmp_path):
    rgb = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [0, 0, 0]]], np.uint8)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    # ITU-R 601-2 luma: 0.299 R + 0.587 G + 0.114 B
    np.testing.assert_allclose(read_image(tmp_path / "rgb.png").pixels[0], [0.299, 0.587, 0.114, 0.0], atol=1 / 255)


def test_jpeg(tmp_path):
    ramp = np.tile(np.linspace(0, 255, 64).astype(np.uint8), (64, 1))
    Image.fromarray(ramp).convert("RGB").save(tmp_path / "x.jpg", quality=95)
    image = read_image(tmp_path / "x.jpg")
    assert (image.source, image.bits_stored, image.pixels.shape) == ("jpeg", 8, (64, 64))
    np.testing.assert_allclose(image.pixels, ramp / 255.0, atol=0.03)  # lossy


def test_truncated_png(tmp_path):
    Image.fromarray(gradient(8).astype(np.uint8)).save(tmp_path / "t.png")
    data = (tmp_path / "t.png").read_bytes()
    (tmp_path / "t.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(Rejected) as caught:
        read_image(tmp_path / "t.png")
    assert caught.value.code == "truncated_file"
